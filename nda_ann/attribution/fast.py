"""``mode="fast"``: the truncated softmax over the K retrieved patches, with no re-scoring."""
from __future__ import annotations

import numpy as np

from ..scoring.scales import Scale
from .candidates import Hits, softmax_over_retrieved


def topk_per_image(w: np.ndarray, img: np.ndarray, topk: int) -> tuple[np.ndarray, np.ndarray]:
    """Keep, per query position (row) and image, only the ``topk`` largest weights: (L, K) weights
    and ids -> (L, K) weights (others 0) and ids, reordered by image within each row."""
    order = np.lexsort((-w, img), axis=-1)
    w_sorted = np.take_along_axis(w, order, -1)
    i_sorted = np.take_along_axis(img, order, -1)
    first = np.concatenate([np.ones((len(img), 1), bool), i_sorted[:, 1:] != i_sorted[:, :-1]], 1)
    run_start = np.maximum.accumulate(np.where(first, np.arange(img.shape[1])[None], 0), axis=1)
    rank = np.arange(img.shape[1])[None] - run_start
    return np.where(rank < topk, w_sorted, 0.0), i_sorted


def fast_scores(hits: Hits, scales: list[Scale], weights: list[float], draws: int, n: int, s: float, sigma2: float,
                topk: int | None) -> tuple[np.ndarray, np.ndarray]:
    """(ids, scores) of the images retrieved for one query: softmax over each query patch's K
    retrieved patches, summed per image (the ``topk`` largest per position), fused over scales."""
    acc = np.zeros(n)
    for (d, sc), (dist, image, _) in hits.items():
        w = softmax_over_retrieved(dist, s, sigma2).numpy()  # (L, K)
        img = image
        if topk is not None:
            w, img = topk_per_image(w, img, topk)
        ok = img >= 0
        acc += weights[scales.index(sc)] / draws * np.bincount(img[ok], weights=w[ok], minlength=n)
    ids = np.nonzero(acc)[0]
    return ids, acc[ids]
