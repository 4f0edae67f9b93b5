"""The linear datamodeling score (docs/scores.md section 7) and its bootstrap confidence intervals.

For query q and subsets S_1..S_M: LDS_q = Spearman_j( loss_j(q), -sum_{n in S_j} score_n(q) ).
A method that gives high scores to the images whose presence lowers the query's loss gets a
positive LDS. LDS = mean over queries of LDS_q.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.stats import rankdata

__all__ = ["predictions", "spearman_columns", "lds_per_query", "LdsResult", "lds_with_intervals", "paired_difference"]


def predictions(masks: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """(M, Q) predicted losses up to an increasing affine map: -masks (M, N) @ scores (Q, N)^T."""
    return -(masks.astype(np.float64) @ np.asarray(scores, dtype=np.float64).T)


def spearman_columns(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman correlation of each column pair of a, b (M, Q), ties averaged -> (Q,).

    A column that is constant on either side carries no ranking information and gets 0.
    """
    ra = rankdata(a, axis=0)
    rb = rankdata(b, axis=0)
    ra -= ra.mean(0)
    rb -= rb.mean(0)
    num = (ra * rb).sum(0)
    den = np.sqrt((ra * ra).sum(0) * (rb * rb).sum(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)
    return np.clip(rho, -1.0, 1.0)


def lds_per_query(losses: np.ndarray, masks: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """(Q,) LDS of each query: losses (M, Q) measured, masks (M, N) subsets, scores (Q, N)."""
    losses = np.asarray(losses, dtype=np.float64)
    if losses.shape != (masks.shape[0], scores.shape[0]):
        raise ValueError(f"losses {losses.shape} must be (subsets {masks.shape[0]}, queries {scores.shape[0]})")
    if masks.shape[1] != scores.shape[1]:
        raise ValueError(f"masks cover {masks.shape[1]} images, scores {scores.shape[1]}")
    return spearman_columns(losses, predictions(masks, scores))


@dataclass
class LdsResult:
    """Mean LDS with 95% percentile intervals from resampling queries and from resampling subsets."""

    lds: float
    per_query: np.ndarray
    ci_queries: tuple[float, float]
    ci_subsets: tuple[float, float]

    def to_dict(self) -> dict:
        return {"lds": self.lds, "ci_queries": list(self.ci_queries), "ci_subsets": list(self.ci_subsets), "per_query": self.per_query.tolist()}


def lds_with_intervals(losses: np.ndarray, masks: np.ndarray, scores: np.ndarray, *, bootstrap: int = 2000, seed: int = 0, level: float = 0.95) -> LdsResult:
    """LDS and its intervals. Queries: resample the per-query LDS values with replacement.
    Subsets: resample the M subsets (models) with replacement and recompute every query's Spearman."""
    per_query = lds_per_query(losses, masks, scores)
    rng = np.random.default_rng(seed)
    q, m = len(per_query), masks.shape[0]
    lo, hi = (1 - level) / 2 * 100, (1 + level) / 2 * 100
    boot_q = per_query[rng.integers(q, size=(bootstrap, q))].mean(1)
    preds = predictions(masks, scores)
    boot_s = np.empty(bootstrap)
    for b in range(bootstrap):
        pick = rng.integers(m, size=m)
        boot_s[b] = spearman_columns(losses[pick], preds[pick]).mean()
    return LdsResult(
        float(per_query.mean()), per_query,
        (float(np.percentile(boot_q, lo)), float(np.percentile(boot_q, hi))),
        (float(np.percentile(boot_s, lo)), float(np.percentile(boot_s, hi))),
    )


def paired_difference(per_query_a: np.ndarray, per_query_b: np.ndarray, *, bootstrap: int = 2000, seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """Mean of LDS_q(a) - LDS_q(b) over the same queries, with a percentile interval from
    resampling queries (paired: both methods see the same resampled queries)."""
    d = np.asarray(per_query_a, dtype=np.float64) - np.asarray(per_query_b, dtype=np.float64)
    rng = np.random.default_rng(seed)
    boot = d[rng.integers(len(d), size=(bootstrap, len(d)))].mean(1)
    lo, hi = np.percentile(boot, [(1 - level) / 2 * 100, (1 + level) / 2 * 100])
    return float(d.mean()), float(lo), float(hi)
