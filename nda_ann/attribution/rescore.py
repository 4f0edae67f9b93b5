"""Stage 2: exact dense re-scoring of the candidate images (SPEC section 4, step 2).

Every query patch against every same-layout position of the M candidates, from the store's pixels;
the non-candidates enter the softmax normaliser through the known mass of their retrieved patches
(known.py) plus the sampled estimate of the rest (outside.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..scoring.dense import chunk_size, log_masses
from ..scoring.patches import LayoutGroup, extract_patches
from ..scoring.scales import Scale


@dataclass
class Rescored:
    """One query's re-scored candidates: ``ids`` (M',) with ``scores`` (M',) > 0; ``per_pos[scale]``
    (L, M) weighted masses per query position and candidate (columns in the order of ``cand``);
    ``outside`` (S,) mean share of the normaliser outside the candidates per scale; ``log_z[(draw,
    scale)]`` (L,) log normaliser per query position."""

    ids: np.ndarray
    scores: np.ndarray
    per_pos: dict[Scale, torch.Tensor]
    outside: np.ndarray
    log_z: dict


def rescore(corpus, cand: np.ndarray, patches: dict, groups: dict[Scale, list[LayoutGroup]], scales: list[Scale],
            weights: list[float], draws: int, s: float, sigma2: float, retrieved_out: dict, sampled: dict,
            topk: int | None, budget: int) -> Rescored:
    """Exact re-scoring of one query (``patches``: its (1, L, D) noised patch vectors per (draw,
    scale), on the device and in the dtype of the computation) against every position of the
    candidate images ``cand`` (M,) sorted.

    ``retrieved_out`` / ``sampled`` (per (draw, scale), (L,) logs): the non-candidates' known and
    estimated shares of the normaliser; ignored when every image is a candidate.
    """
    n, m = corpus.count, len(cand)
    inv = 1.0 / (2.0 * sigma2)
    scores = torch.zeros(m, dtype=torch.float64)
    per_pos: dict[Scale, list[torch.Tensor]] = {}
    outside = np.zeros(len(scales))
    log_zs: dict = {}
    for si, (sc, w) in enumerate(zip(scales, weights)):
        for d in range(draws):
            qp = patches[(d, sc)]
            step = chunk_size(1, groups[sc], qp.dtype, budget)
            fulls, aggs = [], []
            for lo in range(0, m, step):
                imgs = corpus.take(cand[lo : lo + step]).to(qp.device, qp.dtype) * s
                full, agg = log_masses(qp, extract_patches(imgs, sc), groups[sc], inv, topk)
                fulls.append(torch.logsumexp(full, -1))
                aggs.append(agg[0])
            log_z_in = torch.logsumexp(torch.stack(fulls), 0)[0]  # (L,)
            log_z_out = retrieved_out[(d, sc)].to(log_z_in) if m < n else torch.full_like(log_z_in, -math.inf)
            if m < n and (d, sc) in sampled:
                log_z_out = torch.logaddexp(log_z_out, sampled[(d, sc)].to(log_z_out))
            log_z = torch.logaddexp(log_z_in, log_z_out)
            log_zs[(d, sc)] = log_z
            outside[si] += float(torch.exp(log_z_out - log_z).mean()) / draws
            a = torch.exp(torch.cat(aggs, -1) - log_z[:, None]).double().cpu()  # (L, M)
            scores += w / draws * a.sum(0)
            per_pos.setdefault(sc, []).append(w / draws * a)
    keep = scores.numpy() > 0
    return Rescored(cand[keep], scores.numpy()[keep], {sc: sum(parts) for sc, parts in per_pos.items()}, outside, log_zs)
