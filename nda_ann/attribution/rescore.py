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

from ..scoring.dense import chunk_size
from ..scoring.masses import MassScan, max_logits
from ..scoring.operands import kernel_path
from ..scoring.patches import LayoutGroup, extract_patches
from ..scoring.scales import Scale

# candidate images whose largest logits give the shift where no nearest retrieved patch does (a lower
# bound of each position's maximum is enough: a chunk holding a logit CEIL above it is recomputed)
SHIFT_SAMPLE = 16


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
            topk: int | None, budget: int, shift_hint: dict | None = None) -> Rescored:
    """Exact re-scoring of one query (``patches``: its (1, L, D) noised patch vectors per (draw,
    scale), on the device and in the dtype of the computation) against every position of the
    candidate images ``cand`` (M,) sorted.

    ``retrieved_out`` / ``sampled`` (per (draw, scale), (L,) logs): the non-candidates' known and
    estimated shares of the normaliser; ignored when every image is a candidate. ``shift_hint`` (per
    (draw, scale), (L,)): a lower bound of each position's largest logit (the nearest retrieved
    patch's, from exact distances); without one, the first chunk's maxima are used
    (scoring/masses.py).
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
            hint = None if shift_hint is None else shift_hint.get((d, sc))
            z_in, aggs, shift = _scan(corpus, cand, qp, sc, groups[sc], s, inv, topk, step, hint)
            log_z_in = (z_in.log() + shift.double()).to(qp.dtype)  # (L,)
            log_z_out = retrieved_out[(d, sc)].to(log_z_in) if m < n else torch.full_like(log_z_in, -math.inf)
            if m < n and (d, sc) in sampled:
                log_z_out = torch.logaddexp(log_z_out, sampled[(d, sc)].to(log_z_out))
            log_z = torch.logaddexp(log_z_in, log_z_out)
            log_zs[(d, sc)] = log_z
            outside[si] += float(torch.exp(log_z_out - log_z).mean()) / draws
            a = (aggs * torch.exp(shift - log_z)[:, None]).double().cpu()  # (L, M)
            scores += w / draws * a.sum(0)
            per_pos.setdefault(sc, []).append(w / draws * a)
    keep = scores.numpy() > 0
    return Rescored(cand[keep], scores.numpy()[keep], {sc: sum(parts) for sc, parts in per_pos.items()}, outside, log_zs)


def _scan(corpus, cand: np.ndarray, qp: torch.Tensor, sc: Scale, groups: list[LayoutGroup], s: float, inv: float,
          topk: int | None, step: int, hint: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One query's shifted masses over the candidates, chunk by chunk: (z_in (L,) the candidates'
    shifted normaliser, aggs (L, M) shifted per-image masses, shift (L,))."""
    scan, z_in, aggs = None, None, []
    screened = kernel_path(qp.device, qp.dtype) == "screened"
    for lo in range(0, len(cand), step):
        imgs = corpus.take(cand[lo : lo + step]).to(qp.device, qp.dtype) * s
        if scan is None:
            shift = None if hint is None else hint.to(qp.device, qp.dtype)
            if shift is None or not torch.isfinite(shift).all():  # a lower bound from a few images
                first = max_logits(qp, imgs[:SHIFT_SAMPLE], sc, groups, inv)[0]
                shift = first if shift is None else torch.maximum(first, shift)
            scan = MassScan(qp, groups, inv, shift[None], topk, sc, screened)
        full, agg, rescale = scan.add(imgs)
        if rescale is not None and z_in is not None:
            z_in = z_in * rescale[0].double()
            aggs = [a * rescale[0][:, None] for a in aggs]
        part = full[0].sum(-1, dtype=torch.float64)
        z_in = part if z_in is None else z_in + part
        aggs.append(agg[0])
    return z_in, torch.cat(aggs, -1), scan.shift[0]
