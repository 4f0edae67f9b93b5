"""Candidates sized by the measured outside mass: re-score in rounds until the estimated share of the
normaliser outside the re-scored images falls below a target, or the query's time is spent.

Round 1 re-scores the ``first`` best-ranked candidates; each later round doubles the count (or takes
what the remaining time allows at the per-image cost measured so far, less what the last round's known
logits and top-up took, since they follow each round, and the finish the caller plans for: pace.py),
in the candidate ranking's order. The outside-mass sample is drawn against round 1's candidates;
images that later become candidates leave it, which keeps it unbiased for those still outside
(outside.py). Its guided draws are the images most likely to become candidates, so it thins where
the outside mass is; ``topup`` draws a fresh sample against each later round's candidates, pooled
with what is left of the earlier ones (outside.top_up).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .known import retrieved_outside
from .outside import top_up
from .pace import Pace
from .rescore import Rescoring

MIN_ROUND = 32  # a round smaller than this (or a tenth of what is re-scored) is not worth its fixed cost


@dataclass
class RoundsRecord:
    """What the rounds reached for one query and timestep."""

    candidates: int
    outside: float  # estimated share of the normaliser outside the re-scored images (mean over scales)
    met: bool  # the outside target was reached
    rounds: int
    stopped_by: str  # "target", "time", "pool" or "fixed"
    seconds: float = 0.0  # the query's wall time at this timestep, its noising and search included
    before_rounds: float = 0.0  # of which before its first re-scored candidate (noising, search, tail distances, sample)


def grow(res: Rescoring, pool: np.ndarray, first: int, known_of: Callable[[np.ndarray], dict], sampled: dict,
         target: float | None, deadline: float | None,
         topup: Callable[[np.ndarray, dict, int], dict] | None = None, *, first_known: tuple[dict, float] | None = None,
         finish: float = 0.0, pace: Pace | None = None) -> tuple[dict, dict, RoundsRecord]:
    """Re-score ``pool`` (ranked ids, best first) in rounds into ``res``; ``known_of(cand)`` gives the
    known logits (known.py) for a sorted candidate set, ``topup(cand, known, round)`` a fresh outside
    sample against it (outside.sample_outside; None: none). ``first_known``: (the known logits of the
    first round's candidates, the seconds they took), when the caller has them already; ``finish``:
    seconds the deadline keeps for what follows the rounds; ``pace``: the running costs (pace.py), which
    the rounds update and plan with: per image, what follows a later round (its top-up included), and how
    much slower than planned a round ran.
    Returns the last round's known logits, the outside sample and the record."""
    m, rounds = min(first, len(pool)), 1
    t0 = time.perf_counter()
    res.add(pool[:m])
    per_image = (time.perf_counter() - t0) / max(m, 1)
    if pace is not None and m:
        pace.note("per_image", per_image)
    if first_known is not None:
        known, after = first_known
    else:
        t0 = time.perf_counter()
        known = known_of(res.cand())
        after = time.perf_counter() - t0  # what follows each round (its known logits and top-up): planned for
    while True:
        outside = float(res.outside(retrieved_outside(known), sampled).mean())
        if target is None and deadline is None:
            stopped = "fixed"
            break
        if target is not None and outside <= target:
            stopped = "target"
            break
        step, stopped = min(len(pool) - m, m), "pool"  # doubling, within the ranked pool
        if deadline is not None:
            follows = after if pace is None or pace.after is None else max(after, pace.after)  # round 1's has no top-up
            slower = 1.0 if pace is None or pace.overrun is None else pace.overrun
            affordable = int((deadline - time.perf_counter() - follows - finish) / max(per_image * slower, 1e-6))
            if affordable < step:
                step, stopped = affordable, "time"
        if step < max(MIN_ROUND, m // 10):
            break
        t0 = time.perf_counter()
        res.add(pool[m : m + step])
        took = time.perf_counter() - t0
        if pace is not None:  # how much slower than planned: the next round's images cost more or less than these
            pace.note("overrun", max(1.0, took / max(step * per_image, 1e-9)))
            pace.note("per_image", took / step)
        per_image = took / step
        m, rounds = m + step, rounds + 1
        t0 = time.perf_counter()
        known = known_of(res.cand())
        topped = topup is not None and (deadline is None or time.perf_counter() < deadline)  # a spent budget keeps the sample
        if topped:
            sampled = top_up(sampled, topup(res.cand(), known, rounds - 1))
        after = time.perf_counter() - t0
        if pace is not None and topped:
            pace.note("after", after)
    return known, sampled, RoundsRecord(m, outside, target is not None and outside <= target, rounds, stopped)
