"""The settings of one attribution run: one typed object, validated once, recorded in summary.json.

The defaults come from measured curves; each constant names the BENCHMARKS.md section behind it.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Sequence

from ..scoring.schedule import NoiseSchedule
from .known import TAIL_RETRIEVED

Mode = Literal["rescore", "fast"]

# Default M by noise level, from the measured curves (BENCHMARKS.md "defaults_t100_3000" / "_5000",
# "defaults_t300_*", "outside_5000"), tail scores on, 18 queries. At t = 100 (sigma^2 = 0.10)
# M = 150 gives top-10 overlap 0.99 / 1.00 and subset-sum Spearman 0.998 / 0.996 on 3,000 / 5,000
# crops (M = 120: 0.995 on 5,000, on the target's edge; M = 200: 0.997 for a third more dense work).
# At t = 300 (sigma^2 = 0.61) on 5,000 crops M = 500 gives 0.94 / 0.87 (the 57% of the mass outside
# the M caps subset-sum even with exact candidates and normaliser) and M = 1,000 0.97 / 0.92.
DEFAULT_CANDIDATES = 150            # sigma^2 < BROAD_SIGMA2
DEFAULT_CANDIDATES_BROAD = 1000     # sigma^2 >= BROAD_SIGMA2
BROAD_SIGMA2 = 0.3
# re-ranking of a candidate pool (``rerank`` x M images, by retrieved mass) by their exact mass at a
# subset of query positions (rerank.py). Off by default: measured on 5,000 crops with a stride-4 index
# at t = 100, M = 200 (BENCHMARKS.md, "rerank_5000"), x 4 moved subset-sum Spearman 0.945 -> 0.960 but
# top-10 overlap 0.87 -> 0.85, for 55% more dense work.
# At 100k crops (million recipe) it raises candidate recall at M = 500 only from 0.781 to 0.821, where a
# perfect re-ranking of the same pool would reach 0.912 (docs/benchmarks/scale.md, tools/bench_recall.py).
DEFAULT_RERANK = 1
# non-candidate images sampled per query, scale and noise draw to estimate the non-candidates' share of
# the normaliser, half of them drawn towards the images whose patches were retrieved (GUIDE_SHARE). The
# default estimator scores each sampled image at every position (outside_images.py), so a sampled image
# costs about what a re-scored candidate does. Measured at 100k crops (million recipe, M = 300): mean
# error of the estimated outside share -0.12 with 64 images, -0.05 with 256, against -0.16 for the earlier
# pair sampler's 512 (docs/benchmarks/outside.md).
DEFAULT_OUTSIDE_SAMPLE = 128
# the sampled part of the outside mass, Gaussian-smoothed over neighbouring query positions (standard
# deviation in positions; 0 = off) where few draws carry it: the per-position estimate is heavy-tailed, and the share, a concave
# function of it, reads low (outside.smoothed_share; only the share reads it: the normaliser keeps the plain estimate).
# 1.0 from docs/benchmarks/outside.md: 100k crops on million.toml -0.123 -> -0.065; +0.056 on a 600-image corpus.
DEFAULT_OUTSIDE_SMOOTHING = 1.0
# non-candidate images drawn afresh in each later round of the rounds, against that round's candidates, and
# pooled with the earlier sample (rounds.py; 0 = off): the first sample's guided draws are the images that
# become candidates, so it thins where the outside mass is. Measured at 100k crops on million.toml
# (docs/benchmarks/outside.md): error of the outside share -0.065 -> -0.043, top-10 / subset-sum 0.7875 / 0.815
# -> 0.80 / 0.822, 14% more time. The same under a time budget, where its images come out of the candidates':
# with the conv kernel the rounds reach M = 900 in 2 s at 100k, and the top-up took the error from -0.065
# (worst -0.220) to -0.044 (-0.140) on crops, -0.015 (-0.129) to -0.010 (-0.041) on photos, fidelity equal
# or higher (it was off under a budget while the rounds stopped near M = 200 there).
DEFAULT_OUTSIDE_TOPUP = 64
# Non-candidates' tail scores scaled to the estimated outside mass: subset-sum Spearman at t = 100 / 300 (topk 100,
# docs/benchmarks/scale.md) never lower than unscaled, and higher where much mass is outside the M (5k photos,
# t = 300: 0.930 -> 0.969; 20k crops 0.991 -> 0.994).
DEFAULT_TAIL = "scaled"
GUIDE_SHARE = 0.5
# rounds (rounds.py): the first round's candidates, and the most a query may reach when ``candidates``
# does not say. By default (no ``candidates``, no target, no budget) M is sized by the outside mass:
# rounds until DEFAULT_MAX_OUTSIDE, at most ADAPTIVE_CAP (deterministic: no time budget unless asked).
# Chosen from the measured curves (docs/benchmarks/scale.md): at t = 100 an outside share of 0.3 is
# reached near M = 150 at 5k images, where fidelity is already 1.00 / 0.996 (docs/benchmarks/fidelity.md),
# and grows M with the corpus; the cap bounds a query near 2 s at 100k-1M on two cores.
ADAPTIVE_FIRST = 128
ADAPTIVE_CAP = 1000
DEFAULT_MAX_OUTSIDE = 0.3


def default_candidates(sigma2: float) -> int:
    """The default M at noise variance sigma^2 (more candidates where the posterior is broad)."""
    return DEFAULT_CANDIDATES if sigma2 < BROAD_SIGMA2 else DEFAULT_CANDIDATES_BROAD


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or int(value) != value or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


@dataclass
class AttributionSettings:
    """Every knob of one attribution run (recorded in summary.json). Build with ``create``."""

    timesteps: list[int]
    k: int = 1024
    candidates: int | None = None  # None: default_candidates(sigma^2) per timestep
    nprobe: int | None = None
    topk: int | None = None
    alpha: float | None = None
    seed: int = 0
    noise_draws: int = 1
    schedule: str = "linear"
    mode: str = "rescore"
    thumbnail_share: float | None = None
    outside_sample: int = DEFAULT_OUTSIDE_SAMPLE
    precision: str = "float32"
    maps: int = 8
    tail: bool | str = "scaled"  # "scaled": retrieved weights scaled to the outside mass; True: unscaled; False: 0
    tail_retrieved: str = "all"  # "all": every retrieved patch in the tail; "remeasured": the TAIL_K re-measured only
    rerank: int = DEFAULT_RERANK
    outside_estimator: str = "images"  # "images": each sampled image at every position; "pairs": one position each
    outside_smoothing: float = DEFAULT_OUTSIDE_SMOOTHING  # sampled outside mass smoothed over query positions (std, positions)
    outside_topup: int = DEFAULT_OUTSIDE_TOPUP  # images drawn afresh for the outside sample in each later round
    max_outside: float | None = None  # re-score in rounds until the estimated outside share is below it
    time_budget: float | None = None  # seconds per query (all timesteps) for those rounds
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def create(cls, timesteps: int | Sequence[int], sched: NoiseSchedule, *, tail: bool | str | None = None,
               rerank: int | None = None, outside_sample: int | None = None, **kw: Any) -> "AttributionSettings":
        """Validate user values (None means the default) and return the settings."""
        ts = [timesteps] if isinstance(timesteps, int) else list(timesteps)
        if not ts:
            raise ValueError("at least one timestep is needed, e.g. timesteps=[100]")
        if len(set(ts)) != len(ts):
            raise ValueError(f"duplicate timesteps in {ts}: give each once")
        ts = [sched.check_timestep(t) for t in ts]
        mode = kw.get("mode", "rescore")
        if mode not in ("rescore", "fast"):
            raise ValueError(f"mode must be 'rescore' or 'fast', got {mode!r}")
        kw["k"] = _positive_int("k", kw.get("k", 1024))
        kw["noise_draws"] = _positive_int("noise_draws", kw.get("noise_draws", 1))
        if kw.get("candidates") is not None:
            kw["candidates"] = _positive_int("candidates", kw["candidates"])
        if kw.get("topk") is not None:
            kw["topk"] = _positive_int("topk", kw["topk"])
        if kw.get("nprobe") is not None:
            kw["nprobe"] = _positive_int("nprobe", kw["nprobe"])
        maps = kw.get("maps", 8)
        if isinstance(maps, bool) or int(maps) != maps or maps < 0:
            raise ValueError(f"maps must be a non-negative integer, got {maps!r}")
        share = kw.get("thumbnail_share")
        if share is not None and not 0.0 <= float(share) <= 1.0:
            raise ValueError(f"thumbnail_share must lie in [0, 1], got {share}")
        outside_sample = DEFAULT_OUTSIDE_SAMPLE if outside_sample is None else outside_sample
        if isinstance(outside_sample, bool) or int(outside_sample) != outside_sample or outside_sample < 0:
            raise ValueError(f"outside_sample must be a non-negative integer, got {outside_sample!r}")
        rerank = _positive_int("rerank", DEFAULT_RERANK if rerank is None else rerank)
        if kw.get("outside_estimator", "images") not in ("images", "pairs"):
            raise ValueError(f"outside_estimator must be 'images' or 'pairs', got {kw['outside_estimator']!r}")
        smoothing = kw.get("outside_smoothing")
        smoothing = DEFAULT_OUTSIDE_SMOOTHING if smoothing is None else smoothing
        if isinstance(smoothing, bool) or not float(smoothing) >= 0.0:
            raise ValueError(f"outside_smoothing is a standard deviation in query positions, >= 0; got {smoothing!r}")
        kw["outside_smoothing"] = float(smoothing)
        topup = kw.get("outside_topup")
        if topup is None:
            topup = DEFAULT_OUTSIDE_TOPUP
        if isinstance(topup, bool) or int(topup) != topup or topup < 0:
            raise ValueError(f"outside_topup must be a non-negative integer (images per round), got {topup!r}")
        kw["outside_topup"] = int(topup)
        target, budget = kw.get("max_outside"), kw.get("time_budget")
        if target is None and budget is None and kw.get("candidates") is None and rerank == 1 and mode == "rescore":
            kw["max_outside"] = target = DEFAULT_MAX_OUTSIDE  # the default: M sized by the outside mass
        if target is not None and not 0.0 < float(target) <= 1.0:
            raise ValueError(f"max_outside is a share of the normaliser, in (0, 1]; got {target!r}")
        if budget is not None and not float(budget) > 0.0:
            raise ValueError(f"time_budget must be a positive number of seconds, got {budget!r}")
        if (target is not None or budget is not None) and rerank > 1:
            raise ValueError("rerank sizes a fixed candidate pool; it does not combine with max_outside / time_budget rounds")
        if tail not in (None, True, False, "scaled"):
            raise ValueError(f"tail must be True, False or 'scaled', got {tail!r}")
        tail = (DEFAULT_TAIL if tail is None else tail) if mode == "rescore" else False
        if kw.get("tail_retrieved", "all") not in TAIL_RETRIEVED:
            raise ValueError(f"tail_retrieved must be one of {', '.join(map(repr, TAIL_RETRIEVED))}, got {kw['tail_retrieved']!r}")
        return cls(ts, tail=tail, rerank=rerank, outside_sample=int(outside_sample), **kw)

    @property
    def adaptive(self) -> bool:
        """Whether candidates are re-scored in rounds (rounds.py) rather than a fixed M."""
        return self.mode == "rescore" and (self.max_outside is not None or self.time_budget is not None)

    def candidates_at(self, t: int, sched: NoiseSchedule) -> int:
        """M at timestep t: the user's, else ``default_candidates(sigma^2)``; in rounds the cap on M."""
        if self.adaptive:
            return self.candidates if self.candidates is not None else ADAPTIVE_CAP
        return self.candidates if self.candidates is not None else default_candidates(sched.signal_and_noise(t)[1])

    def thumbnail_share_at(self, t: int, sched: NoiseSchedule) -> float:
        """Share of the M candidates taken from the thumbnail search at t (default: by noise level)."""
        if self.thumbnail_share is not None:
            return self.thumbnail_share
        return 0.5 if sched.signal_and_noise(t)[1] >= BROAD_SIGMA2 else 0.0

    def record(self) -> dict[str, Any]:
        """The settings as recorded in summary.json (``extra`` merged in)."""
        out = asdict(self)
        out.update(out.pop("extra"))
        return out
