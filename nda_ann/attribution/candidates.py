"""Stage 1: candidate images from the retrieved patches (docs/scores.md section 5).

``hits`` (one query) maps (draw, scale) to (dist, image, position), each (L, K): the unscaled squared
distances of the K nearest same-layout training patches of each query patch, their image ids and grid
positions (inf / -1 / -1 where missing).
"""
from __future__ import annotations

import numpy as np
import torch

from ..corpus.thumbnails import nearest_thumbnails, thumbnails
from ..scoring.scales import Scale

Hits = dict[tuple[int, Scale], tuple[np.ndarray, np.ndarray, np.ndarray]]


def sum_by_image(image: np.ndarray, weight: np.ndarray, n: int) -> np.ndarray:
    """(n,) sum of ``weight`` per image id; ``image`` holds ids or -1 (none, whose weight must be 0).
    Shifting the ids by one (-1 -> a bin that is dropped) spares masking: 4 ms where the masked
    version took 9 ms for 1,024 x 1,024 weights."""
    return np.bincount(image.ravel() + 1, weights=weight.ravel(), minlength=n + 1)[1:]


def softmax_over_retrieved(dist: np.ndarray, s: float, sigma2: float) -> torch.Tensor:
    """(L, K) unscaled squared distances -> (L, K) float64 softmax weights over the K (inf -> 0)."""
    logits = -torch.from_numpy(dist).double() * (s * s) / (2 * sigma2)
    return torch.softmax(logits, dim=-1).nan_to_num_(0.0)


def candidate_mass(hits: Hits, scales: list[Scale], weights: list[float], draws: int, n: int, s: float, sigma2: float) -> np.ndarray:
    """(n,) softmax mass (over the K retrieved) each training image receives, fused over scales
    (``weights``) and averaged over noise draws."""
    mass = np.zeros(n)
    for (d, sc), (dist, image, _) in hits.items():
        w = softmax_over_retrieved(dist, s, sigma2).numpy()  # 0 where image is -1
        mass += weights[scales.index(sc)] / draws * sum_by_image(image, w, n)
    return mass


def select_candidates(mass: np.ndarray, m: int, thumbs: np.ndarray | None = None, query_thumb: torch.Tensor | None = None,
                      thumb_share: float = 0.0) -> np.ndarray:
    """(<= m,) sorted candidate ids: round(m * share) nearest by thumbnail (``thumbs`` (N, T),
    ``query_thumb`` (T,)), the rest by ``mass`` (N,), largest first."""
    chosen: list[int] = []
    seen: set[int] = set()
    n_thumb = int(round(m * thumb_share))
    if n_thumb:
        for i in nearest_thumbnails(thumbs, query_thumb, n_thumb).tolist():
            if i not in seen:
                seen.add(i)
                chosen.append(i)
    for i in np.argsort(-mass, kind="stable").tolist():
        if len(chosen) >= m:
            break
        if i not in seen:
            seen.add(i)
            chosen.append(i)
    return np.sort(np.asarray(chosen, dtype=np.int64))


def ranked_candidates(mass: np.ndarray, m: int, thumbs: np.ndarray | None = None, query_thumb: torch.Tensor | None = None,
                      thumb_share: float = 0.0) -> np.ndarray:
    """(<= m,) candidate ids, best first, for re-scoring in rounds: every prefix of length k holds about
    round(k * share) nearest images by thumbnail and the rest by ``mass``, as ``select_candidates(k)``."""
    by_mass = np.argsort(-mass, kind="stable")[: m + int(round(m * thumb_share))]
    by_thumb = nearest_thumbnails(thumbs, query_thumb, int(round(m * thumb_share))) if thumb_share > 0 else np.zeros(0, dtype=np.int64)
    out, seen, ti, mi = [], set(), 0, 0
    while len(out) < m and (ti < len(by_thumb) or mi < len(by_mass)):
        take_thumb = ti < len(by_thumb) and (ti < round((len(out) + 1) * thumb_share) or mi >= len(by_mass))
        i = int(by_thumb[ti] if take_thumb else by_mass[mi])
        ti, mi = (ti + 1, mi) if take_thumb else (ti, mi + 1)
        if i not in seen:
            seen.add(i)
            out.append(i)
    return np.asarray(out, dtype=np.int64)


def query_thumbnail(mean_noisy: torch.Tensor, s: float) -> torch.Tensor:
    """(T,) thumbnail of the query (1, C, H, W) noised image mean, rescaled by 1 / s like the corpus'."""
    return thumbnails(mean_noisy / s)[0]
