"""Shifted patch masses: the fast dense kernel of exact scoring and of re-scoring.

For query patches q_u and every same-layout patch c_{n,v} of some candidate images it returns

    full[q, u, n] = sum_v exp(logit(u; n, v) - shift[q, u]),  logit = -||q_u - c_{n,v}||^2 / (2 sigma^2)

and ``agg``, the same over the ``topk`` largest terms, in the linear domain. One GEMM per layout
class yields the shifted logits directly: the query operand is [2 inv q, -inv, -inv ||q||^2 - shift]
and the candidate operand [c, ||c||^2, 1] (inv = 1 / (2 sigma^2)), so the only passes over the
logits are one clamp, one exp and one sum (dense.log_masses takes eight). The shift is a per-position
estimate of the largest logit (the nearest retrieved patch, or the first chunk's maximum): logits
more than FLOOR below it are clamped there (their weight is below float rounding of a normaliser that
holds the shifted maximum, and exp's underflow branch is ten times slower), and a logit that ends up
more than CEIL above it marks its rows for a recomputation with a raised shift (``ShiftedMasses``).

``topk``: a row (u, n) whose ``full`` is at most topk * TOPK_TAU has at most topk terms above TOPK_TAU,
so its top-k sum differs from its full sum by at most (V - topk) * TOPK_TAU (1e-12 of the shifted
maximum at V = 676): only the other rows are selected exactly.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .patches import LayoutGroup

FLOOR = {torch.float32: -80.0, torch.float64: -700.0}
CEIL = 60.0
TOPK_TAU = 1e-15


def _floor(dtype: torch.dtype) -> float:
    return FLOOR.get(dtype, -80.0)


@dataclass
class QueryOperand:
    """The query side of the GEMM: per layout class g, (Q * U_g, D + 2) = [2 inv q, -inv, -inv ||q||^2 - shift]."""

    mats: list[torch.Tensor]
    shift: torch.Tensor  # (Q, L)
    inv: float

    @classmethod
    def build(cls, queries: torch.Tensor, groups: list[LayoutGroup], inv: float, shift: torch.Tensor) -> "QueryOperand":
        """queries (Q, L, D) noised patch vectors; shift (Q, L) in the queries' dtype and device."""
        nq, npos, dim = queries.shape
        const = -inv * queries.square().sum(-1) - shift  # (Q, L)
        mats = []
        for group in groups:
            pos = group.positions.to(queries.device)
            q = queries[:, pos]  # (Q, U, D)
            a = torch.empty((nq, len(pos), dim + 2), dtype=queries.dtype, device=queries.device)
            a[..., :dim] = q * (2.0 * inv)
            a[..., dim] = -inv
            a[..., dim + 1] = const[:, pos]
            mats.append(a.view(nq * len(pos), dim + 2))
        return cls(mats, shift, inv)


def candidate_operand(candidates: torch.Tensor, groups: list[LayoutGroup]) -> list[torch.Tensor]:
    """candidates (n, L, D) patch vectors of s * y_n -> per layout class (n * V_g, D + 2) = [c, ||c||^2, 1]."""
    n, npos, dim = candidates.shape
    aug = torch.cat([candidates, candidates.square().sum(-1, keepdim=True),
                     torch.ones((n, npos, 1), dtype=candidates.dtype, device=candidates.device)], -1)  # (n, L, D + 2)
    return [aug.index_select(1, g.positions.to(candidates.device)).view(n * len(g), dim + 2) for g in groups]


def _mm_nt(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a (R, K) @ b (S, K)^T -> (R, S): oneDNN's fp32 kernel on the CPU where torch has it (1.3x MKL's
    on AVX-512 CPUs that MKL serves with AVX2 code; BENCHMARKS.md "bench_rescore"), else torch.mm."""
    if _ONEDNN and a.device.type == "cpu" and a.dtype == torch.float32:
        return torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "")
    return torch.mm(a, b.T)


def _has_onednn_linear() -> bool:
    try:
        x = torch.ones(2, 3)
        return bool(torch.backends.mkldnn.is_available()) and torch.equal(
            torch.ops.mkldnn._linear_pointwise(x, x, None, "none", [], ""), x @ x.T)
    except (AttributeError, RuntimeError):
        return False


_ONEDNN = _has_onednn_linear()


def _topk_sums(w: torch.Tensor, full: torch.Tensor, topk: int) -> torch.Tensor:
    """w (R, n, V) exp'd shifted logits, full (R, n) their sums -> (R, n) sums of the topk largest."""
    agg = full.clone()
    flat = agg.view(-1)
    rows = (flat > topk * TOPK_TAU).nonzero().squeeze(1)
    if not len(rows):
        return agg
    sel = w.view(-1, w.shape[-1]).index_select(0, rows)  # (r, V)
    many = (sel > TOPK_TAU).sum(-1) > topk
    if not many.any():
        return agg
    rows, sel = rows[many], sel[many]
    if sel.device.type == "cpu":
        arr = sel.numpy()
        arr.partition(arr.shape[-1] - topk, axis=-1)  # in place; numpy's introselect is 3.5x torch.topk here
        sums = sel[:, -topk:].sum(-1)
    else:
        sums = sel.topk(topk, dim=-1, sorted=False).values.sum(-1)
    flat.index_copy_(0, rows, sums)
    return agg


def shifted_masses(query: QueryOperand, cand: list[torch.Tensor], groups: list[LayoutGroup], n: int,
                   topk: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(full, agg, hit) for ``n`` candidate images (``cand``: ``candidate_operand``): full and agg
    (Q, L, n) shifted masses (``agg is full`` without topk); hit (Q, L) bool: rows where a logit
    exceeded the shift by more than CEIL (their values are clamped there: recompute with a higher shift)."""
    nq, npos = query.shift.shape
    dtype, dev = query.shift.dtype, query.shift.device
    full = torch.empty((nq, npos, n), dtype=dtype, device=dev)
    agg = torch.empty_like(full) if topk is not None else full
    hit = torch.zeros((nq, npos), dtype=torch.bool, device=dev)
    floor = _floor(dtype)
    for group, a, b in zip(groups, query.mats, cand):
        pos = group.positions.to(dev)
        u, v = len(pos), b.shape[0] // n
        logits = _mm_nt(a, b)  # (Q * U, n * V): shifted logits
        logits.clamp_(floor, CEIL).exp_()
        w = logits.view(nq * u, n, v)
        f = w.sum(-1)  # (Q * U, n)
        full[:, pos] = f.view(nq, u, n)
        if topk is not None:
            agg[:, pos] = (f if topk >= v else _topk_sums(w, f, topk)).view(nq, u, n)
        hit[:, pos] = (f.amax(-1) >= 0.5 * torch.exp(torch.tensor(CEIL, dtype=dtype))).view(nq, u)
    return full, agg, hit


def max_logits(queries: torch.Tensor, candidates: torch.Tensor, groups: list[LayoutGroup], inv: float) -> torch.Tensor:
    """(Q, L): the largest logit of each query position over the candidates (n, L, D) of its layout class."""
    nq, npos, _ = queries.shape
    out = torch.empty((nq, npos), dtype=queries.dtype, device=queries.device)
    norms_c = candidates.square().sum(-1)
    norms_q = queries.square().sum(-1)
    for group in groups:
        pos = group.positions.to(queries.device)
        q = queries[:, pos].reshape(-1, queries.shape[-1])
        c = candidates[:, pos].reshape(-1, candidates.shape[-1])
        best = torch.addmm(norms_c[:, pos].reshape(1, -1), q, c.T, beta=-1.0, alpha=2.0).amax(-1)  # (Q * U,)
        out[:, pos] = best.view(nq, len(pos)) * inv - norms_q[:, pos] * inv
    return out


class MassScan:
    """Shifted masses of a block of queries over candidate chunks, one ``add`` per chunk.

    Where a chunk holds a logit more than CEIL above the shift, the shift of those rows is raised to
    that chunk's exact maximum, the chunk is recomputed, and ``add`` returns the factor (Q, L) by
    which the caller must multiply what it accumulated from earlier chunks (None when unchanged).
    """

    def __init__(self, queries: torch.Tensor, groups: list[LayoutGroup], inv: float, shift: torch.Tensor, topk: int | None = None):
        self.queries, self.groups, self.inv, self.topk = queries, groups, inv, topk
        self.operand = QueryOperand.build(queries, groups, inv, shift.to(queries.dtype))

    @property
    def shift(self) -> torch.Tensor:
        """(Q, L) the current shift."""
        return self.operand.shift

    def add(self, candidates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """candidates (n, L, D) -> (full (Q, L, n), agg (Q, L, n), rescale (Q, L) or None)."""
        n = candidates.shape[0]
        cand = candidate_operand(candidates, self.groups)
        full, agg, hit = shifted_masses(self.operand, cand, self.groups, n, self.topk)
        if not hit.any():
            return full, agg, None
        old = self.shift
        new = torch.where(hit, torch.maximum(old, max_logits(self.queries, candidates, self.groups, self.inv)), old)
        self.operand = QueryOperand.build(self.queries, self.groups, self.inv, new)
        full, agg, _ = shifted_masses(self.operand, cand, self.groups, n, self.topk)
        return full, agg, torch.exp(old - new)
