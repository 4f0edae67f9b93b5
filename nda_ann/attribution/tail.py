"""Tail scores: non-candidates score the weights of their retrieved patches.

Exact weights where the index keeps exact distances (or with ``tail_retrieved="remeasured"``): then a
lower bound of their exact score (only retrieved patches count; topk is not applied to them), instead
of the 0 of docs/scores.md section 5's estimator. On indexes with PCA or lossy codes the patches past
the re-measured ones enter at their offset index distance (known.tail_known): an estimate, not a bound.
On by default (measured: at t = 100, M = 200 on 3,000 crops, subset-sum Spearman 0.982 -> 0.997 and
relative L1 0.18 -> 0.04; BENCHMARKS.md).
"""
from __future__ import annotations

import numpy as np
import torch

from ..scoring.scales import Scale
from .candidates import sum_by_image
from .known import Known

# the most a position's retrieved weights are scaled up by (tail="scaled"). Measured by setting it, at 20k photos on
# the stride-1 default index, t = 100, topk 100, 8 queries, subset-sum Spearman at M = 32 / 128: cap 3 0.9835 / 0.9852,
# 10 0.9846 / 0.9854, 30 0.981 / 0.983, none 0.978 / 0.981 (top-10 0.975 throughout; Ice Lake Xeon, ninth session).
SCALE_CAP = 10.0


def tail_scores(known: Known, log_z: dict, scales: list[Scale], weights: list[float], draws: int, n: int,
                tail_parts: dict | None = None, log_z_out: dict | None = None) -> np.ndarray:
    """(n,) the retrieved non-candidate patches' weights under the re-scoring normaliser ``log_z``
    (per (draw, scale), (L,)), summed per image, fused over scales and draws. With ``tail_parts``
    given, appends (weights (L, K'), image ids (L, K')) per scale to it, for the heatmaps.
    ``log_z_out`` (per (draw, scale), (L,), the non-candidates' estimated share): scale each position's
    retrieved weights up to it (at most SCALE_CAP times), so that the tail holds the estimated outside
    mass, spread over the retrieved non-candidates in proportion to their weights."""
    extra = np.zeros(n)
    for (d, sc), (logits, img, _) in known.items():
        lz = log_z[(d, sc)].double().cpu()
        w = torch.from_numpy(logits).sub(lz[:, None]).exp_()  # 0 where img is -1
        if log_z_out is not None:
            retrieved = w.sum(-1)  # (L,)
            target = torch.exp(log_z_out[(d, sc)] - lz)
            w *= torch.where(retrieved > 0, (target / retrieved.clamp_min(1e-300)).clamp(1.0, SCALE_CAP), torch.ones_like(retrieved))[:, None]
        w = w.numpy()
        w *= weights[scales.index(sc)] / draws
        extra += sum_by_image(img, w, n)
        if tail_parts is not None:
            tail_parts.setdefault(sc, []).append((w, img))
    return extra
