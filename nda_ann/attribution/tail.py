"""Tail scores: non-candidates score the exact weights of their retrieved patches.

A lower bound of their exact score (only retrieved patches count; topk is not applied to them),
instead of the 0 of docs/scores.md section 5's estimator. On by default (measured: at t = 100, M = 200 on 3,000
crops, subset-sum Spearman 0.982 -> 0.997 and relative L1 0.18 -> 0.04; BENCHMARKS.md).
"""
from __future__ import annotations

import numpy as np
import torch

from ..scoring.scales import Scale
from .candidates import sum_by_image
from .known import Known


def tail_scores(known: Known, log_z: dict, scales: list[Scale], weights: list[float], draws: int, n: int,
                tail_parts: dict | None = None) -> np.ndarray:
    """(n,) the retrieved non-candidate patches' weights under the re-scoring normaliser ``log_z``
    (per (draw, scale), (L,)), summed per image, fused over scales and draws. With ``tail_parts``
    given, appends (weights (L, K'), image ids (L, K')) per scale to it, for the heatmaps."""
    extra = np.zeros(n)
    for (d, sc), (logits, img, _) in known.items():
        w = torch.from_numpy(logits).sub(log_z[(d, sc)].double().cpu()[:, None]).exp_().numpy()  # 0 where img is -1
        w *= weights[scales.index(sc)] / draws
        extra += sum_by_image(img, w, n)
        if tail_parts is not None:
            tail_parts.setdefault(sc, []).append((w, img))
    return extra
