"""Dense patch log-masses: the exact logits of query patches against every position of some images.

This is the shared core of the exact scorer (all N images) and of the index path's re-scoring
(the top M candidate images). Distances are taken between vectors whose out-of-image entries are
zero on both sides (same layout), so those entries cancel exactly; no mask constant is added.
"""
from __future__ import annotations

import torch

from .patches import LayoutGroup


def log_masses(
    queries: torch.Tensor,
    candidates: torch.Tensor,
    groups: list[LayoutGroup],
    inv_two_sigma2: float,
    topk: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query position and image, the log of the unnormalised softmax mass.

    queries: (Q, L, D) noised query patch vectors; candidates: (n, L, D) patch vectors of s * y_n,
    both over the same L grid positions. Returns ``(full, agg)``, each (Q, L, n):
    full[q, u, n] = logsumexp over same-layout v of -||q_u - c_{n,v}||^2 / (2 sigma^2) and
    agg the same over the ``topk`` largest terms (equal to full without topk).
    Peak extra memory: Q * |U_g| * n * |V_g| elements for the largest layout class.
    """
    qn_all = queries.square().sum(-1)  # (Q, L)
    cn_all = candidates.square().sum(-1)  # (n, L)
    nq, npos, _ = queries.shape
    n = candidates.shape[0]
    full = torch.empty((nq, npos, n), dtype=queries.dtype, device=queries.device)
    agg = torch.empty_like(full) if topk is not None else full
    for group in groups:
        pos = group.positions.to(queries.device)
        q = queries[:, pos]  # (Q, U, D)
        c = candidates[:, pos]  # (n, V, D)
        u, v = q.shape[1], c.shape[1]
        gram = q.reshape(nq * u, -1) @ c.reshape(n * v, -1).T  # (Q*U, n*V)
        d2 = qn_all[:, pos].reshape(-1, 1) + cn_all[:, pos].reshape(1, -1) - 2.0 * gram
        logits = d2.clamp_min_(0.0).mul_(-inv_two_sigma2).view(nq, u, n, v)
        full[:, pos] = torch.logsumexp(logits, dim=-1)
        if topk is not None:
            kept = logits if topk >= v else logits.topk(topk, dim=-1, sorted=False).values
            agg[:, pos] = torch.logsumexp(kept, dim=-1)
    return full, agg


def chunk_size(n_queries: int, groups: list[LayoutGroup], dtype: torch.dtype, budget_bytes: int) -> int:
    """How many candidate images one ``log_masses`` call may take within ``budget_bytes``.

    The logits of the largest layout class dominate: Q * |U|^2 elements per image, with about
    three live copies (gram, logits, topk).
    """
    largest = max(len(g) for g in groups)
    per_image = 3 * n_queries * largest * largest * torch.finfo(dtype).bits // 8
    return max(1, budget_bytes // max(per_image, 1))
