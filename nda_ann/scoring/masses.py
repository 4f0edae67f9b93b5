"""Shifted patch masses: the dense kernel of exact scoring and of re-scoring.

For query patches q_u and every same-layout patch c_{n,v} of some candidate images it returns

    full[q, u, n] = sum_v exp(logit(u; n, v) - shift[q, u]),  logit = -||q_u - c_{n,v}||^2 / (2 sigma^2)

and ``agg``, the same over the ``topk`` largest terms, in the linear domain. One GEMM per layout class
yields the shifted logits directly (operands.py), so the only passes over them are one clamp, one exp
and one sum (dense.log_masses, the previous kernel, takes eight). The shift is a per-position lower
bound of the largest logit (the nearest retrieved patch, or a few images' maxima): logits more than
FLOOR below it are clamped there (their weight is below float rounding of a normaliser that holds the
maximum, and exp's underflow branch is ten times slower); a logit more than CEIL above it marks its
row, which is recomputed with the shift raised to the chunk's maximum (``MassScan``).

``topk``: a row (u, n) whose ``full`` is at most topk * TOPK_TAU has at most topk terms above TOPK_TAU,
so its top-k sum differs from its full sum by at most (V - topk) * TOPK_TAU: only other rows are selected.
Screened path (operands.py): an interior row is computed exactly only if its bfloat16 maximum exceeds
-(SCREEN_T + SCREEN_ERR + err_u), err_u the row's bound of its cross term's bfloat16 error and SCREEN_ERR
one of the output's rounding (0.125 under 64) and the constants' halves; the rows left at 0 hold terms
below exp(-SCREEN_T) (1e-20) of the shift's each.
"""
from __future__ import annotations

import math

import torch

from .operands import CandidateOperand, QueryOperand, interior_index
from .patches import LayoutGroup
from .scales import Scale

FLOOR = {torch.float32: -80.0, torch.float64: -700.0}
CEIL = 60.0
TOPK_TAU = 1e-15
SCREEN_T = 46.0
SCREEN_ERR = 1.0
SCREEN_DENSE_SHARE = 0.6  # kept rows above this share of a chunk: the dense product is cheaper


def _floor(dtype: torch.dtype) -> float:
    return FLOOR.get(dtype, -80.0)


def _mm_nt(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a (R, K) @ b (S, K)^T -> (R, S): oneDNN's fp32 kernel on the CPU where torch has it (1.4x MKL's
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


def _exp_rows(logits: torch.Tensor, topk: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (R, V) shifted, overwritten -> (full (R,), agg (R,)) sums of exp over all / the topk largest."""
    w = logits.clamp_(_floor(logits.dtype), CEIL).exp_()
    full = w.sum(-1)
    if topk is None or topk >= w.shape[-1]:
        return full, full
    return full, _topk_rows(w, full, topk)


def _topk_rows(w: torch.Tensor, full: torch.Tensor, topk: int) -> torch.Tensor:
    """w (R, V) exp'd shifted logits, full (R,) their sums -> (R,) sums of the topk largest of each row."""
    agg = full.clone()
    rows = (full > topk * TOPK_TAU).nonzero().squeeze(1)
    if not len(rows):
        return agg
    sel = w.index_select(0, rows)  # (r, V)
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
    agg.index_copy_(0, rows, sums)
    return agg


def _topk_sums(w: torch.Tensor, full: torch.Tensor, topk: int) -> torch.Tensor:
    """w (R, n, V), full (R, n) -> (R, n) topk sums (``_topk_rows`` over the flattened rows)."""
    return _topk_rows(w.reshape(-1, w.shape[-1]), full.reshape(-1), topk).view(full.shape)


def _hit(full: torch.Tensor) -> torch.Tensor:
    """Rows (...,) of full (..., n) where a term reached CEIL (clamped there)."""
    return full.amax(-1) >= 0.5 * math.exp(CEIL)


def _interior_dense(a: torch.Tensor, bt: torch.Tensor, topk: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """a (R, K), bt (n, K, V) -> full, agg (R, n)."""
    logits = torch.matmul(a, bt)  # (n, R, V)
    n, r, v = logits.shape
    full, agg = _exp_rows(logits.view(n * r, v), topk)
    return full.view(n, r).T, agg.view(n, r).T


def _interior_screened(query: QueryOperand, a: torch.Tensor, cand: CandidateOperand, topk: int | None):
    """The interior class through the bfloat16 screen: full, agg (R, n), exact where kept, 0 elsewhere."""
    rowmax = torch.matmul(query.screen, cand.screen).amax(-1).float()  # (n, R)
    keep = rowmax > -(SCREEN_T + SCREEN_ERR) - query.screen_err * cand.c_max
    if keep.float().mean() > SCREEN_DENSE_SHARE:
        return _interior_dense(a, cand.interior, topk)
    full = torch.zeros(keep.shape, dtype=a.dtype, device=a.device)  # (n, R)
    agg = torch.zeros_like(full) if topk is not None else full
    pairs = keep.nonzero()  # (p, 2): (image, row), image-major
    counts = keep.sum(1).tolist()
    lo = 0
    for j, c in enumerate(counts):
        if not c:
            continue
        rows = pairs[lo : lo + c, 1]
        lo += c
        f, g = _exp_rows(a.index_select(0, rows) @ cand.interior[j], topk)
        full[j, rows] = f
        if agg is not full:
            agg[j, rows] = g
    return full.T, agg.T


def shifted_masses(query: QueryOperand, cand: CandidateOperand, groups: list[LayoutGroup], topk: int | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(full, agg, hit) for the candidates' ``cand.n`` images: full and agg (Q, L, n) shifted masses
    (``agg is full`` without topk); hit (Q, L) bool: rows where a logit exceeded the shift by more than
    CEIL (their values are clamped there: ``MassScan`` recomputes them with a higher shift)."""
    nq, npos = query.shift.shape
    n = cand.n
    full = torch.empty((nq, npos, n), dtype=query.shift.dtype, device=query.shift.device)
    agg = torch.empty_like(full) if topk is not None else full
    hit = torch.zeros((nq, npos), dtype=torch.bool, device=full.device)
    gi = interior_index(groups)
    for i, (group, a) in enumerate(zip(groups, query.mats)):
        pos = group.positions.to(full.device)
        u = len(pos)
        if i == gi:
            f, g = (_interior_screened(query, a, cand, topk) if query.screen is not None and cand.screen is not None
                    else _interior_dense(a, cand.interior, topk))  # (Q * U, n)
        else:
            b = cand.border[i]
            f, g = _exp_rows(_mm_nt(a, b).view(nq * u * n, -1), topk)
            f, g = f.view(nq * u, n), g.view(nq * u, n)
        full[:, pos] = f.reshape(nq, u, n)
        if agg is not full:
            agg[:, pos] = g.reshape(nq, u, n)
        hit[:, pos] = _hit(f).view(nq, u)
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
    """Shifted masses of a block of queries over candidate chunks, one ``add`` per chunk of images.

    Where a chunk holds a logit more than CEIL above the shift, the shift of those rows is raised to
    that chunk's exact maximum and those rows alone are recomputed; ``add`` then returns the factor
    (Q, L) by which the caller must multiply what it accumulated from earlier chunks (None when
    unchanged). ``screened``: operands.kernel_path's choice for this device and dtype.
    """

    def __init__(self, queries: torch.Tensor, groups: list[LayoutGroup], inv: float, shift: torch.Tensor,
                 topk: int | None, scale: Scale, screened: bool = False):
        self.queries, self.groups, self.inv, self.topk, self.scale = queries, groups, inv, topk, scale
        self.screened = screened
        self.operand = QueryOperand.build(queries, groups, inv, shift.to(queries.dtype).clone(), screened)

    @property
    def shift(self) -> torch.Tensor:
        """(Q, L) the current shift."""
        return self.operand.shift

    def add(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """images (n, C, H, W) of s * y_n -> (full (Q, L, n), agg (Q, L, n), rescale (Q, L) or None)."""
        cand = CandidateOperand.build(images, self.scale, self.groups, self.inv, self.screened)
        full, agg, hit = shifted_masses(self.operand, cand, self.groups, self.topk)
        if not hit.any():
            return full, agg, None
        old = self.shift.clone()
        for gi, group in enumerate(self.groups):
            self._raise_rows(gi, group, hit, cand, full, agg)
        self.operand.refresh_screen(self.groups)
        return full, agg, torch.exp(old - self.shift)

    def _raise_rows(self, gi: int, group: LayoutGroup, hit: torch.Tensor, cand: CandidateOperand,
                    full: torch.Tensor, agg: torch.Tensor) -> None:
        """Recompute, in place, the rows of class ``gi`` that ``hit`` marks, with their shift raised to
        this chunk's largest logit (only those rows: a GEMM of their query rows against the chunk)."""
        pos = group.positions.to(hit.device)
        q_idx, u_idx = hit[:, pos].nonzero(as_tuple=True)
        if not len(q_idx):
            return
        a = self.operand.mats[gi]
        rows = q_idx * len(pos) + u_idx
        sub = a.index_select(0, rows)
        if cand.border[gi] is not None:
            logits = _mm_nt(sub, cand.border[gi]).view(len(rows), cand.n, -1)  # (r, n, V), under the old shift
        else:
            logits = torch.matmul(sub, cand.interior).transpose(0, 1)  # (r, n, V)
        delta = logits.amax((1, 2))  # > CEIL: the new shift is old + delta
        logits = (logits - delta[:, None, None]).reshape(len(rows) * cand.n, -1)
        f, g = _exp_rows(logits, self.topk)
        full[q_idx, pos[u_idx]] = f.view(len(rows), cand.n)
        if agg is not full:
            agg[q_idx, pos[u_idx]] = g.view(len(rows), cand.n)
        a[rows, -1] -= delta  # the operand's constant column carries -shift
        self.operand.shift[q_idx, pos[u_idx]] += delta
