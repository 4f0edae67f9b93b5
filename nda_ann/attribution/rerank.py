"""Optional re-ranking of a candidate pool by exact mass at a subset of query positions.

``rerank`` x M images (by retrieved mass) are scored at every border query position and at interior
positions on a stride-RERANK_STRIDE grid (about 14% of a full re-scoring per pooled image at p = 7,
32 x 32); the best M go on to the full re-scoring.
"""
from __future__ import annotations

import numpy as np
import torch

from ..scoring.dense import chunk_size
from ..scoring.patches import LayoutGroup, extract_patches
from ..scoring.scales import Scale

RERANK_STRIDE = 3


def proxy_groups(groups: list[LayoutGroup], grid: int) -> list[tuple[torch.Tensor, torch.Tensor, float]]:
    """Per layout class: (query positions used for re-ranking, candidate positions, weight):
    every position of a border class (weight 1), interior positions on a stride-RERANK_STRIDE
    grid, weighted by how many interior positions each stands for."""
    out = []
    for group in groups:
        pos = group.positions
        if group.interior:
            keep = ((pos // grid) % RERANK_STRIDE == 0) & ((pos % grid) % RERANK_STRIDE == 0)
            out.append((pos[keep], pos, len(pos) / max(int(keep.sum()), 1)))
        else:
            out.append((pos, pos, 1.0))
    return out


def proxy_scores(corpus, pool: np.ndarray, patches: dict, groups: dict[Scale, list[LayoutGroup]], scales: list[Scale],
                 weights: list[float], draws: int, s: float, sigma2: float, budget: int) -> np.ndarray:
    """(len(pool),) re-ranking score: each pooled image's exact softmax mass, normalised over the
    pool, summed over the ``proxy_groups`` query positions and fused over scales.
    ``patches``: the query's (1, L, D) noised patch vectors per (draw, scale), in the dense dtype."""
    inv = 1.0 / (2.0 * sigma2)
    total = torch.zeros(len(pool), dtype=torch.float64)
    size = corpus.shape[1]
    for sc, w in zip(scales, weights):
        pairs = proxy_groups(groups[sc], sc.grid(size))
        for d in range(draws):
            qp = patches[(d, sc)][0]  # (L, D)
            step = chunk_size(1, groups[sc], qp.dtype, budget)
            parts = []
            for lo in range(0, len(pool), step):
                cp = extract_patches(corpus.take(pool[lo : lo + step]).to(qp.device, qp.dtype) * s, sc)  # (b, L, D)
                c_norms = cp.square().sum(-1)  # (b, L)
                rows = []
                for qpos, cpos, _ in pairs:
                    if not len(qpos):
                        continue
                    c = cp[:, cpos].reshape(-1, cp.shape[-1])
                    logits = torch.addmm(c_norms[:, cpos].reshape(1, -1), qp[qpos], c.T, beta=-1.0, alpha=2.0).mul_(inv)
                    rows.append(torch.logsumexp(logits.view(len(qpos), cp.shape[0], len(cpos)), -1))  # (U', b)
                parts.append(torch.cat(rows, 0))
            # -||q_u||^2 / (2 sigma^2) is constant per query position: it cancels in the softmax over the pool
            row_w = torch.cat([torch.full((len(qpos),), wt, dtype=torch.float64) for qpos, _, wt in pairs if len(qpos)])
            total += w / draws * (torch.softmax(torch.cat(parts, 1).double(), dim=1).cpu() * row_w[:, None]).sum(0)
    return total.numpy()
