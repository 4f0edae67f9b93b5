"""Fidelity of approximate scores against exact ones (docs/scores.md section 7)."""
from __future__ import annotations

import numpy as np


def rankdata(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n with ties given their average rank: (n,) -> (n,) float64."""
    x = np.asarray(x)
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.arange(1, len(x) + 1)
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return (sums / counts)[inverse]


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation of two (n,) vectors (nan when either is constant)."""
    ra, rb = rankdata(a), rankdata(b)
    ra -= ra.mean()
    rb -= rb.mean()
    denom = np.sqrt((ra * ra).sum() * (rb * rb).sum())
    return float((ra * rb).sum() / denom) if denom > 0 else float("nan")


def top_overlap(approx: np.ndarray, exact: np.ndarray, n: int = 10) -> float:
    """|top-n(approx) & top-n(exact)| / n (ties broken by lower id)."""
    def top(x):
        return set(np.lexsort((np.arange(len(x)), -x))[:n].tolist())

    return len(top(approx) & top(exact)) / n


def random_subsets(n_images: int, n_subsets: int = 64, fraction: float = 0.5, seed: int = 0) -> np.ndarray:
    """(n_subsets, n_images) bool masks of fixed random subsets of round(fraction * N) images."""
    rng = np.random.default_rng(seed)
    size = int(round(fraction * n_images))
    masks = np.zeros((n_subsets, n_images), dtype=bool)
    for s in range(n_subsets):
        masks[s, rng.choice(n_images, size=size, replace=False)] = True
    return masks


def subset_sum_spearman(approx: np.ndarray, exact: np.ndarray, subsets: np.ndarray | None = None) -> float:
    """Spearman, over fixed random 50% subsets S, of sum_S approx vs sum_S exact (the LDS quantity)."""
    masks = random_subsets(len(exact)) if subsets is None else subsets
    return spearman(masks @ approx, masks @ exact)


def relative_l1(approx: np.ndarray, exact: np.ndarray) -> float:
    """||approx - exact||_1 / ||exact||_1."""
    return float(np.abs(approx - exact).sum() / np.abs(exact).sum())


def fidelity(approx: np.ndarray, exact: np.ndarray, subsets: np.ndarray | None = None) -> dict[str, float]:
    """All docs/scores.md section 7 metrics for one query's (N,) score vectors."""
    return {
        "top10_overlap": top_overlap(approx, exact, 10),
        "spearman": spearman(approx, exact),
        "subset_sum_spearman": subset_sum_spearman(approx, exact, subsets),
        "relative_l1": relative_l1(approx, exact),
    }


def fidelity_table(approx: np.ndarray, exact: np.ndarray) -> list[dict[str, float]]:
    """Per (timestep, query) metrics of (T, Q, N) score arrays, with t index and query index."""
    subsets = random_subsets(exact.shape[-1])
    rows = []
    for ti in range(exact.shape[0]):
        for q in range(exact.shape[1]):
            rows.append({"t_index": ti, "query": q, **fidelity(approx[ti, q], exact[ti, q], subsets)})
    return rows
