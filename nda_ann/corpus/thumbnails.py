"""Image-level candidates: nearest neighbours of the query's low-resolution thumbnail (docs/scores.md section 5).

At larger t the posterior is broad and whole-image likeness matters; an 8 x 8 thumbnail search
adds candidates that the patch retrieval alone misses.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .inputs import CorpusView

THUMB_SIDE = 8


def thumbnails(images: torch.Tensor, side: int = THUMB_SIDE) -> torch.Tensor:
    """(B, C, H, W) -> (B, C * side * side) block means."""
    return F.adaptive_avg_pool2d(images, side).flatten(1)


def corpus_thumbnails(corpus: CorpusView, side: int = THUMB_SIDE, batch: int = 4096) -> np.ndarray:
    """(N, C * side * side) float16 thumbnails of every image, computed in streamed batches."""
    out = np.empty((corpus.count, corpus.shape[0] * side * side), dtype=np.float16)
    for lo in range(0, corpus.count, batch):
        hi = min(lo + batch, corpus.count)
        out[lo:hi] = thumbnails(corpus.rows(lo, hi), side).numpy().astype(np.float16)
    return out


def nearest_thumbnails(thumbs: np.ndarray, query: torch.Tensor, n: int, chunk: int = 1 << 18) -> np.ndarray:
    """Ids of the n images whose thumbnails are nearest (L2) to ``query`` (D,), nearest first."""
    q = query.to(torch.float32)
    best_d = torch.empty(0)
    best_i = torch.empty(0, dtype=torch.int64)
    for lo in range(0, len(thumbs), chunk):
        t = torch.from_numpy(thumbs[lo : lo + chunk].astype(np.float32))
        d = (t - q).square().sum(1)
        kk = min(n, len(d))
        dv, di = d.topk(kk, largest=False)
        best_d = torch.cat([best_d, dv])
        best_i = torch.cat([best_i, di + lo])
        if len(best_d) > n:
            keep = best_d.topk(n, largest=False).indices
            best_d, best_i = best_d[keep], best_i[keep]
    order = torch.argsort(best_d, stable=True)
    return best_i[order].numpy()
