"""The retrieved patches of non-candidate images, with exact logits: the known part of the
non-candidates' share of the softmax normaliser, and what the tail scores are made of."""
from __future__ import annotations

import numpy as np
import torch

from .candidates import Hits

# tail scores from an index with approximate distances (PCA, lossy SQ/PQ codes; not Flat, IVF-Flat
# or the default pixel codes): the TAIL_K nearest retrieved patches of each query patch are
# re-measured exactly from the store's pixels (they also enter the normaliser's known part).
# Measured at t = 100 with lossy SQ8 interior codes, M = 150: 32 -> 128 moved top-10 overlap /
# subset-sum Spearman 0.92 / 0.922 -> 0.93 / 0.939 at 20,000 crops and 0.98 / 0.987 -> 0.98 / 0.991
# at 5,000 for 3-5% more time; but on the million recipe (M = 400) it moved 100k only 0.521 -> 0.524
# and made a 1M query 1.69 -> 2.37 s (random reads across the 3 GB store), past the 2 s budget.
TAIL_K = 32
# ... and the tail scores (tail.py) take the other K - TAIL_K retrieved patches too, at their index
# distances plus the position's offset (``tail_known``): measured at 100k crops, t = 100, in one run
# (docs/benchmarks/scale.md, "tail from every retrieved patch"), subset-sum Spearman on
# indexes/stride2.toml 0.858 -> 0.922 under --time-budget 2 and 0.916 -> 0.950 with the defaults, on
# indexes/million.toml 0.738 -> 0.799 and 0.815 -> 0.848; top-10 overlap equal or higher; 0.045 s a query.
TAIL_RETRIEVED = ("all", "remeasured")

# (draw, scale) -> (logits (L, K') float64, image (L, K'), position (L, K'))
Known = dict


def non_candidate(image: np.ndarray, cand: np.ndarray, n: int) -> np.ndarray:
    """Bool mask, shaped like ``image`` (ids, -1 = none): a retrieved image that is not a candidate.
    A table look-up (1 ms for 1,024 x 1,024 ids where np.isin took 11 ms)."""
    is_cand = np.zeros(n + 1, dtype=bool)  # slot n stays False: id -1 reads it
    is_cand[cand] = True
    return ~is_cand[image] & (image >= 0)


def tail_distances(corpus, hits: Hits, patches: dict, exact_at: dict, s: float) -> dict:
    """Per (draw, scale) whose searcher's distances are not exact: (L, TAIL_K') float64 exact squared
    distances (unscaled, like the index) of each query patch's TAIL_K nearest retrieved patches, from the
    store's pixels (inf where none). They do not depend on the candidates, so rounds measure them once."""
    out = {}
    for (d, sc), (dist, image, position) in hits.items():
        if exact_at[sc]:
            continue
        kt = min(TAIL_K, dist.shape[-1])
        img, pos = image[:, :kt], position[:, :kt]
        exact = np.full(img.shape, np.inf, dtype=np.float64)
        u_idx, k_idx = np.nonzero(img >= 0)
        if len(u_idx):
            qv = patches[(d, sc)][0].double().cpu() / s  # (L, D), unscaled like the index
            y = corpus.patch_vectors(img[u_idx, k_idx], pos[u_idx, k_idx], sc).double()  # (E, D)
            exact[u_idx, k_idx] = (qv[torch.from_numpy(u_idx)] - y).square().sum(-1).numpy()
        out[(d, sc)] = exact
    return out


def known_logits(corpus, cand: np.ndarray, hits: Hits, patches: dict, exact_at: dict, s: float, sigma2: float,
                 tail: dict | None = None) -> Known:
    """Per (draw, scale): (logits (L, K') float64, image (L, K'), position (L, K')) of the retrieved
    patches of non-candidates, from exact distances; entries that are not such patches hold
    -inf / -1 / -1.

    Where the searcher's distances are exact (``exact_at[scale]``: Flat, IVF-Flat, pixel codes), all
    K retrieved as they are. Otherwise (PCA, lossy codes, which misjudge them) the ``TAIL_K`` nearest
    of each query patch that belong to non-candidates, re-measured from the store's pixels
    (``tail``: ``tail_distances`` of these hits, measured once; None: measured here).
    ``patches``: the query's (1, L, D) noised patch vectors per (draw, scale).
    """
    out = {}
    n = corpus.count
    scale_logit = -(s * s) / (2 * sigma2)
    if tail is None:
        tail = tail_distances(corpus, hits, patches, exact_at, s)
    for (d, sc), (dist, image, position) in hits.items():
        if exact_at[sc]:
            keep = non_candidate(image, cand, n)
            out[(d, sc)] = (np.where(keep, dist.astype(np.float64) * scale_logit, -np.inf), np.where(keep, image, -1), np.where(keep, position, -1))
            continue
        exact = tail[(d, sc)]
        img, pos = image[:, : exact.shape[1]], position[:, : exact.shape[1]]
        keep = non_candidate(img, cand, n)
        out[(d, sc)] = (np.where(keep, exact * scale_logit, -np.inf), np.where(keep, img, -1), np.where(keep, pos, -1))
    return out


def tail_known(known: Known, hits: Hits, tail: dict | None, cand: np.ndarray, n: int, s: float, sigma2: float) -> Known:
    """Per (draw, scale): ``known`` (known_logits of these hits and candidates ``cand``) with, where its
    distances were re-measured (the keys of ``tail``, tail_distances), the other K - TAIL_K retrieved
    non-candidate patches appended: logits from their index distance plus the position's offset, the
    median over its TAIL_K re-measured patches of (exact - index) distance. PCA drops each difference's
    residual energy, which the offset restores on average (the codes' own error stays); no appended
    distance is taken below the position's nearest re-measured one. Shapes (L, K) per key; the
    normaliser's known part keeps the re-measured patches only (retrieved_outside of ``known``)."""
    if not tail:
        return known
    out = dict(known)
    scale_logit = -(s * s) / (2 * sigma2)
    for key, exact in tail.items():
        dist, image, position = hits[key]
        kt = exact.shape[1]
        if key not in known or image.shape[1] <= kt:
            continue
        approx = np.asarray(dist, dtype=np.float64)
        offset = _row_median(exact - approx[:, :kt])  # (L,), nan where nothing was re-measured
        nearest = exact.min(1)  # (L,), inf where nothing was re-measured
        rest = np.maximum(approx[:, kt:] + np.nan_to_num(offset, nan=0.0)[:, None], np.where(np.isfinite(nearest), nearest, 0.0)[:, None])
        keep = non_candidate(image[:, kt:], cand, n) & np.isfinite(rest)
        logits, img, pos = known[key]
        out[key] = (np.concatenate([logits, np.where(keep, rest * scale_logit, -np.inf)], 1),
                    np.concatenate([img, np.where(keep, image[:, kt:], -1)], 1),
                    np.concatenate([pos, np.where(keep, position[:, kt:], -1)], 1))
    return out


def _row_median(x: np.ndarray) -> np.ndarray:
    """(L,) the median of each row of x (L, K) over its finite entries; nan where there are none."""
    valid = np.isfinite(x)
    count = valid.sum(1)
    srt = np.sort(np.where(valid, x, np.inf), axis=1)
    rows = np.arange(len(x))
    lo, hi = srt[rows, np.maximum(count - 1, 0) // 2], srt[rows, np.minimum(count // 2, x.shape[1] - 1)]  # equal for odd counts
    return np.where(count > 0, 0.5 * (lo + hi), np.nan)


def retrieved_outside(known: Known) -> dict:
    """Per (draw, scale): (L,) log of the softmax mass of the retrieved patches of non-candidates.

    A known lower bound of the non-candidates' share of the normaliser at each query position
    (-inf where nothing outside the candidates was retrieved); the sample (outside.py) estimates
    the rest.
    """
    return {key: torch.logsumexp(torch.from_numpy(logits), -1) for key, (logits, _, _) in known.items()}
