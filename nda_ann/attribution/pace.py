"""What a time budget plans with: the costs of one Attributor's earlier queries.

Under ``time_budget`` a query spends part of its seconds before its rounds can measure anything (the
search, the tail distances, the first candidates' known logits and the outside sample) and part after
the last round (the final normaliser and the tail's scores). The rounds size each later round from
the per-image cost they measure (rounds.py), but the first round was always ``ADAPTIVE_FIRST``
images and the finish was not planned: on a CPU where the search and the sample take most of the
budget the query ran past it (an Intel Xeon with AMX, 100k crops, ``indexes/stride2.toml``: median
2.15 s under a 2 s budget; an Ice Lake Xeon, 20k crops: 1.43 s under 1 s, 2.16 s under 2 s). ``Pace`` keeps those costs from the queries before (the warm-up's included), so that
the first round takes only what the rest of the budget pays for, the last round leaves the finish its
time, and a later round plans for the top-up that follows it and for running slower than the round
before it measured. A fresh Attributor knows nothing yet: its first query plans as before.
"""
from __future__ import annotations

from dataclasses import dataclass
from statistics import median

# weight of the newest measurement in each running cost (the rest: the earlier queries')
NEWEST = 0.5


@dataclass
class Pace:
    """Running costs in seconds, None until measured: ``per_image`` one re-scored candidate image,
    ``setup`` from sizing the first round to starting it, ``after`` what follows a later round (its known
    logits and the outside sample's top-up), ``finish`` after the last round; and ``overrun`` (>= 1),
    how much longer than planned a round took (a later round's images cost more than the earlier
    round's measured: up to 1.7x on the same query at 20k crops)."""

    per_image: float | None = None
    setup: float | None = None
    after: float | None = None
    finish: float | None = None
    overrun: float | None = None

    def note(self, name: str, seconds: float) -> None:
        """Fold one measurement of cost ``name`` into its running value."""
        old = getattr(self, name)
        setattr(self, name, seconds if old is None else (1.0 - NEWEST) * old + NEWEST * seconds)

    def first_round(self, cap: int, remaining: float | None, least: int) -> int:
        """The first round's size: ``cap`` images, or fewer where the earlier queries' costs say that
        ``cap`` would run past the ``remaining`` seconds (None: no budget), but at least ``least``
        (a query re-scores something, or its scores would rest on the retrieved distances alone)."""
        if remaining is None or self.per_image is None:
            return cap
        left = remaining - (self.setup or 0.0) - (self.finish or 0.0)
        return max(min(least, cap), min(cap, int(left / max(self.per_image, 1e-9))))


# a query counts as past its budget beyond this share over it (the rounds plan to end on it; the 2 cores are shared)
OVERRUN_TOLERANCE = 0.1


def overrun_warning(records: dict, per_query: float) -> str | None:
    """A warning for the queries that ran past ``per_query`` seconds (the budget per query and timestep),
    None when every one kept it. ``records`` maps (t index, query) to rounds.RoundsRecord. Names the
    slowest and, where the time before the first round alone passed the budget (the search, the tail
    distances, the outside sample), says that no rounds can keep it on this index and machine."""
    late = [r for r in records.values() if r.seconds > per_query * (1 + OVERRUN_TOLERANCE)]
    if not late:
        return None
    text = (f"{len(late)} of {len(records)} queries ran past the time budget of {per_query:.2f} s per query and timestep "
            f"(slowest {max(r.seconds for r in late):.2f} s)")
    fixed = [r.before_rounds for r in late if r.before_rounds > per_query]
    if fixed:
        text += (f"; {len(fixed)} spent {median(fixed):.2f} s (median) before their first round, on the index search, the "
                 "tail distances and the outside sample, so this index cannot answer within the budget on this machine: "
                 "a smaller k or nprobe, a smaller outside_sample, an index with fewer vectors per image "
                 "(indexes/stride2.toml) or more cores would")
    return text
