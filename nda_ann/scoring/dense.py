"""Dense patch log-masses: the exact logits of query patches against every position of some images.

This is the shared core of the exact scorer (all N images) and of the index path's re-scoring
(the top M candidate images). Distances are taken between vectors whose out-of-image entries are
zero on both sides (same layout), so those entries cancel exactly; no mask constant is added.
"""
from __future__ import annotations

import torch

from .patches import LayoutGroup

# exp(-80) ~ 2e-35: terms that far below their row's maximum are below float64 rounding of the
# row sum (which holds a term equal to 1), and clamping keeps exp off its slow underflow path.
_FLOOR = -80.0


def logsumexp_(x: torch.Tensor) -> torch.Tensor:
    """logsumexp over the last dim, overwriting ``x``: (..., V) -> (...)."""
    top = x.amax(-1, keepdim=True)
    total = x.sub_(top).clamp_min_(_FLOOR).exp_().sum(-1)
    return total.log_().add_(top.squeeze(-1))


def largest_(x: torch.Tensor, k: int) -> torch.Tensor:
    """The k largest entries of each row of ``x`` (..., V), in no order, as a new tensor (..., k).

    On the CPU numpy's introselect (3.5x faster than torch.topk on rows of 676 logits, 2 cores),
    run in place: it reorders the entries within each row of ``x`` (a row keeps its set of values,
    so a logsumexp over it is unchanged), which spares a copy of ``x``. torch.topk elsewhere.
    """
    if x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) and x.is_contiguous():
        v = x.shape[-1]
        x.detach().numpy().partition(v - k, axis=-1)
        return x[..., v - k :].clone()
    return x.topk(k, dim=-1, sorted=False).values


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
    agg the same over the ``topk`` largest terms (``agg is full`` without topk).
    Peak extra memory: about (1 + topk / |V_g|) * Q * |U_g| * n * |V_g| elements for the largest
    layout class.
    """
    nq, npos, _ = queries.shape
    n = candidates.shape[0]
    full = torch.empty((nq, npos, n), dtype=queries.dtype, device=queries.device)
    agg = torch.empty_like(full) if topk is not None else full
    cand_norms = candidates.square().sum(-1)  # (n, L)
    query_norms = queries.square().sum(-1)  # (Q, L)
    for group in groups:
        pos = group.positions.to(queries.device)
        q = queries[:, pos].reshape(-1, queries.shape[-1])  # (Q*U, D)
        c = candidates[:, pos]  # (n, V, D)
        u, v = len(pos), c.shape[1]
        c = c.reshape(n * v, -1)
        c_norms = cand_norms[:, pos].reshape(1, -1)
        # -||q - c||^2 / (2 s2) = (2 <q, c> - ||c||^2) / (2 s2) - ||q||^2 / (2 s2); the last term is
        # constant over candidates, so it is added after the reductions.
        logits = torch.addmm(c_norms, q, c.T, beta=-1.0, alpha=2.0)  # (Q*U, n*V)
        logits.mul_(inv_two_sigma2)
        logits = logits.view(nq * u, n, v)
        offset = query_norms[:, pos] * inv_two_sigma2  # (Q, U)
        kept = largest_(logits, topk) if topk is not None and topk < v else None  # before logsumexp_ overwrites logits
        full[:, pos] = logsumexp_(logits).view(nq, u, n) - offset[..., None]
        if topk is not None:
            agg[:, pos] = full[:, pos] if kept is None else logsumexp_(kept).view(nq, u, n) - offset[..., None]
    return full, agg


def chunk_size(n_queries: int, groups: list[LayoutGroup], dtype: torch.dtype, budget_bytes: int) -> int:
    """How many candidate images one ``log_masses`` call may take within ``budget_bytes``.

    The logits of the largest layout class dominate: Q * |U|^2 elements per image, with about
    two live copies (logits and the exp inside logsumexp, or the topk values).
    """
    largest = max(len(g) for g in groups)
    per_image = 2 * n_queries * largest * largest * torch.finfo(dtype).bits // 8
    return max(1, budget_bytes // max(per_image, 1))
