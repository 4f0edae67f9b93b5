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

``topk``: a row (u, n) with at most topk terms above TOPK_TAU (always so where its ``full`` is at most
topk * TOPK_TAU; else they are counted) has a top-k sum that differs from its full sum by at most
(V - topk) * TOPK_TAU (6e-8 of the shifted maximum, whose term the normaliser holds, at V = 676; over
1,024 positions 6e-5 of one image's score at most): only the other rows are selected.
Conv path (operands.py): the interior class comes from one convolution whose output (n, R, G_i, G_i),
less the candidates' norms, takes the same clamp, exp and sum passes; only rows topk selects are gathered.
Screened path (operands.py): an interior row is computed exactly only if its bfloat16 maximum exceeds
-(SCREEN_T + SCREEN_ERR + err_u), err_u the row's bound of its cross term's bfloat16 error and SCREEN_ERR
one of the output's rounding (0.125 under 64) and the constants' halves; the rows left at 0 hold terms
below exp(-SCREEN_T) (1e-20) of the shift's each.
"""
from __future__ import annotations

import functools
import math
from concurrent.futures import ThreadPoolExecutor

import torch

from .operands import PATHS, CandidateOperand, ConvInterior, QueryOperand, border_batches, filters_of, interior_index
from .patches import LayoutGroup
from .scales import Scale

FLOOR = {torch.float32: -80.0, torch.float64: -700.0}
CEIL = 60.0
TOPK_TAU = 1e-10
SCREEN_T = 46.0
SCREEN_ERR = 1.0
SCREEN_DENSE_SHARE = 0.6  # kept rows above this share of a chunk: the dense product is cheaper
SCREEN_REST = 4  # chunks that skip the screen after one where it kept too many rows
PARALLEL_ROWS = 1_000  # rows from which topk selection is split over threads (1,000 rows of 676: about 1 ms)
CONV_CACHE_BYTES = 4 << 20  # one convolution's output on the conv path: small enough to stay in a last-level cache


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


def _needs_topk(full: torch.Tensor, topk: int, count_above) -> torch.Tensor:
    """Rows (bool, full's shape) whose topk sum can differ from their full sum by more than (V - topk)
    TOPK_TAU: those with more than topk terms above TOPK_TAU. ``count_above()`` gives that count per row;
    it is called only if some row's sum exceeds topk * TOPK_TAU (no other row can have that many)."""
    need = full > topk * TOPK_TAU
    if bool(need.any()):
        need &= count_above() > topk
    return need


def _topk_rows(w: torch.Tensor, full: torch.Tensor, topk: int) -> torch.Tensor:
    """w (R, V) exp'd shifted logits (reordered in place), full (R,) their sums -> (R,) sums of the topk
    largest of each row; rows whose sum is at most topk * TOPK_TAU keep their full sum (the terms are not
    counted here, as ``_needs_topk`` does in cache on the conv path: over a w larger than the cache the
    count costs more than the selection it saves)."""
    agg = full.clone()
    rows = (full > topk * TOPK_TAU).nonzero().squeeze(1)
    if not len(rows):
        return agg
    v = w.shape[-1]
    if w.device.type == "cpu" and w.is_contiguous():
        if len(rows) > len(full) // 2:  # most rows: select in place, no copy
            _partition(w.numpy(), v - topk)
            agg.index_copy_(0, rows, w[rows, v - topk :].sum(-1))
            return agg
        agg.index_copy_(0, rows, _topk_of(w.index_select(0, rows), topk))
        return agg
    agg.index_copy_(0, rows, w.index_select(0, rows).topk(topk, dim=-1, sorted=False).values.sum(-1))
    return agg


def _topk_of(rows: torch.Tensor, topk: int) -> torch.Tensor:
    """rows (r, V) contiguous, reordered in place -> (r,) the sums of each row's topk largest."""
    if rows.device.type != "cpu":
        return rows.topk(topk, dim=-1, sorted=False).values.sum(-1)
    v = rows.shape[-1]
    arr = rows.numpy()
    _partition(arr, v - topk)
    return torch.from_numpy(arr[:, v - topk :]).sum(-1)


def _partition(arr, kth: int) -> None:
    """numpy's in-place introselect of every row of arr (R, V) at kth (3.5x torch.topk on rows of 676),
    split over torch's threads (numpy releases the GIL while it selects)."""
    threads = torch.get_num_threads()
    if threads < 2 or len(arr) < PARALLEL_ROWS:
        arr.partition(kth, axis=-1)
        return
    bounds = [len(arr) * i // threads for i in range(threads + 1)]
    list(_pool(threads).map(lambda i: arr[bounds[i] : bounds[i + 1]].partition(kth, axis=-1), range(threads)))


@functools.lru_cache(maxsize=4)
def _pool(threads: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(threads, thread_name_prefix="nda-ann-topk")


def _topk_sums(w: torch.Tensor, full: torch.Tensor, topk: int) -> torch.Tensor:
    """w (R, n, V), full (R, n) -> (R, n) topk sums (``_topk_rows`` over the flattened rows)."""
    return _topk_rows(w.reshape(-1, w.shape[-1]), full.reshape(-1), topk).view(full.shape)


def _hit(full: torch.Tensor) -> torch.Tensor:
    """Rows (...,) of full (..., n) where a term reached CEIL (clamped there)."""
    return full.amax(-1) >= 0.5 * math.exp(CEIL)


def shifted_logits(a: torch.Tensor, b: torch.Tensor, norms: torch.Tensor | None, inv: float) -> torch.Tensor:
    """a (..., R, D + 2) query rows, b (..., S, D') candidate rows -> (..., R, S) shifted logits: the
    product itself when b is augmented (D' = D + 2), else a[:D] b^T + a's constant - inv ||c||^2."""
    if norms is None:
        return _mm_nt(a, b) if a.dim() == 2 else torch.bmm(a, b.transpose(-1, -2))
    dim = b.shape[-1]
    logits = _mm_nt(a[:, :dim].contiguous(), b) if a.dim() == 2 else torch.bmm(a[..., :dim], b.transpose(-1, -2))
    logits += a[..., dim + 1 :]
    return logits.sub_(inv * norms[..., None, :])


def _interior_dense(a: torch.Tensor, cand: CandidateOperand, inv: float, topk: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """a (R, D + 2) -> full, agg (R, n) over the candidates' interior class."""
    n = cand.n
    logits = shifted_logits(a, cand.interior, cand.interior_norms, inv)  # (R, n * V)
    r = a.shape[0]
    full, agg = _exp_rows(logits.view(r * n, -1), topk)
    return full.view(r, n), agg.view(r, n)


def _interior_conv(query: QueryOperand, cand: CandidateOperand, topk: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """full, agg (R, n) over the candidates' interior class, R = Q * U: per group of a few images, one
    convolution by the query rows (``conv_filters``) gives (n', R, G_i, G_i) shifted logits but the
    candidates' norm term, taken off in place; then the clamp, exp and sum passes, and topk on the rows it
    changes. The groups keep each output near CONV_CACHE_BYTES, so that those passes run in cache (2.5x
    faster with topk, 1.75x without, than over one large output on this project's CPU: kernel.md)."""
    c = cand.conv
    filters = query.conv_filters(c.pooled.shape[1])
    r, g = filters[0].shape[0], c.norms.shape[-1]
    step = max(1, CONV_CACHE_BYTES // (r * g * g * c.pooled.element_size()))
    full = torch.empty((cand.n, r), dtype=c.pooled.dtype, device=c.pooled.device)
    agg = full if topk is None or topk >= g * g else torch.empty_like(full)
    for lo in range(0, cand.n, step):
        hi = min(lo + step, cand.n)
        out = c.shifted(filters, query.inv, lo, hi)  # (n', R, G_i, G_i)
        out.clamp_(_floor(out.dtype), CEIL).exp_()
        full[lo:hi] = f = out.sum((2, 3))  # (n', R)
        if agg is full:
            continue
        agg[lo:hi] = f
        rows = _needs_topk(f, topk, lambda: _count_above(out, TOPK_TAU)).nonzero(as_tuple=True)
        if len(rows[0]):
            agg[lo + rows[0], rows[1]] = _topk_of(out[rows].reshape(len(rows[0]), -1), topk)  # only those rows, (r', V)
    return full.T, agg.T


def _count_above(out: torch.Tensor, tau: float) -> torch.Tensor:
    """(n, R) how many of each row's terms in out (n, R, G, G) exceed tau, through float passes (a
    boolean sum over the channels-last layout is several times slower); a term equal to tau counts 1/2."""
    v = out.shape[2] * out.shape[3]
    return (torch.sub(out, tau).sign_().sum((2, 3)) + v) * 0.5


def _conv_logits(c: ConvInterior, inv: float, rows: torch.Tensor) -> torch.Tensor:
    """rows (r, D + 2) query rows -> (r, n, V) shifted logits over the interior class of ``c``'s n images."""
    out = c.shifted(filters_of(rows, c.pooled.shape[1]), inv)  # (n, r, G_i, G_i)
    return out.transpose(0, 1).reshape(rows.shape[0], c.pooled.shape[0], -1)


def _interior_screened(query: QueryOperand, a: torch.Tensor, cand: CandidateOperand, topk: int | None):
    """The interior class through the bfloat16 screen: full, agg (R, n), exact where kept, 0 elsewhere.
    Where the screen keeps most rows (candidates alike the query, as re-scored top candidates are), the
    dense product is cheaper: the next SCREEN_REST chunks then skip the screen."""
    if query.screen_rest > 0:
        query.screen_rest -= 1
        return _interior_dense(a, cand, query.inv, topk)
    n, r = cand.n, a.shape[0]
    rowmax = torch.mm(query.screen, cand.screen.T).view(r, n, -1).amax(-1).float()  # (R, n)
    keep = (rowmax > (-(SCREEN_T + SCREEN_ERR) - query.screen_err * cand.c_max)[:, None]).T  # (n, R)
    if keep.float().mean() > SCREEN_DENSE_SHARE:
        query.screen_rest = SCREEN_REST
        return _interior_dense(a, cand, query.inv, topk)
    v = cand.interior.shape[0] // n
    full = torch.zeros((n, r), dtype=a.dtype, device=a.device)
    agg = torch.zeros_like(full) if topk is not None else full
    pairs = keep.nonzero()  # (p, 2): (image, row), image-major
    counts = keep.sum(1).tolist()
    lo = 0
    for j, c in enumerate(counts):
        if not c:
            continue
        rows = pairs[lo : lo + c, 1]
        lo += c
        # MKL: on a few rows oneDNN's kernel was slower (2.1 s against 1.3 s in 1,000 images x 4 queries)
        sub = a.index_select(0, rows)
        norms = None if cand.interior_norms is None else cand.interior_norms[j * v : (j + 1) * v]
        f, g = _exp_rows(shifted_logits(sub, cand.interior[j * v : (j + 1) * v], norms, query.inv), topk)
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
    if gi is not None:
        pos = groups[gi].positions.to(full.device)
        a = query.interior
        if cand.conv is not None:
            f, g = _interior_conv(query, cand, topk)  # (Q * U, n)
        elif query.screen is not None and cand.screen is not None:
            f, g = _interior_screened(query, a, cand, topk)
        else:
            f, g = _interior_dense(a, cand, query.inv, topk)
        _put(full, agg, hit, pos, f, g)
    for batch, a, b, norms in zip(border_batches(groups), query.batched, cand.border, cand.border_norms):
        k, u = len(batch), len(groups[batch[0]])
        logits = shifted_logits(a, b, norms, query.inv)  # (k, Q * u, n * u)
        f, g = _exp_rows(logits.view(-1, u), topk)
        # (k, Q, u, n) -> (Q, k * u, n), positions in batch order
        f, g = (x.view(k, nq, u, n).transpose(0, 1).reshape(nq * k * u, n) for x in (f, g))
        pos = torch.cat([groups[i].positions for i in batch]).to(full.device)
        _put(full, agg, hit, pos, f, g)
    return full, agg, hit


def _put(full: torch.Tensor, agg: torch.Tensor, hit: torch.Tensor, pos: torch.Tensor, f: torch.Tensor, g: torch.Tensor) -> None:
    """Write one class's (or batch's) rows f, g (Q * |pos|, n) at positions ``pos`` of full, agg (Q, L, n)."""
    nq, n = full.shape[0], full.shape[-1]
    full[:, pos] = f.reshape(nq, len(pos), n)
    if agg is not full:
        agg[:, pos] = g.reshape(nq, len(pos), n)
    hit[:, pos] = _hit(f).view(nq, len(pos))


def max_logits(queries: torch.Tensor, images: torch.Tensor, scale: Scale, groups: list[LayoutGroup], inv: float) -> torch.Tensor:
    """(Q, L): the largest logit of each query position (queries (Q, L, D)) over the same-layout
    patches of ``images`` (n, C, H, W) of s * y_n."""
    nq, npos, _ = queries.shape
    op = QueryOperand(queries, groups, inv, torch.zeros((nq, npos), dtype=queries.dtype, device=queries.device))
    cand = CandidateOperand.build(images, scale, groups, inv, nq)
    out = torch.empty((nq, npos), dtype=queries.dtype, device=queries.device)
    gi = interior_index(groups)
    if gi is not None:
        best = shifted_logits(op.interior, cand.interior, cand.interior_norms, inv).amax(-1)  # (Q * U,)
        out[:, groups[gi].positions.to(out.device)] = best.view(nq, -1)
    for batch, a, b, norms in zip(border_batches(groups), op.batched, cand.border, cand.border_norms):
        k, u = len(batch), len(groups[batch[0]])
        best = shifted_logits(a, b, norms, inv).amax(-1).view(k, nq, u)  # (k, Q, u)
        pos = torch.cat([groups[i].positions for i in batch]).to(out.device)
        out[:, pos] = best.transpose(0, 1).reshape(nq, k * u)
    return out


class MassScan:
    """Shifted masses of a block of queries over candidate chunks, one ``add`` per chunk of images.

    Where a chunk holds a logit more than CEIL above the shift, the shift of those rows is raised to
    that chunk's exact maximum and those rows alone are recomputed; ``add`` then returns the factor
    (Q, L) by which the caller must multiply what it accumulated from earlier chunks (None when
    unchanged). ``path``: operands.kernel_path's choice for this device and dtype ('conv', 'screened' or
    'dense').
    """

    def __init__(self, queries: torch.Tensor, groups: list[LayoutGroup], inv: float, shift: torch.Tensor,
                 topk: int | None, scale: Scale, path: str = "dense"):
        if path not in PATHS:
            raise ValueError(f"kernel path must be one of {', '.join(PATHS)}, got {path!r}")
        self.queries, self.groups, self.inv, self.topk, self.scale = queries, groups, inv, topk, scale
        self.path = path
        self.operand = QueryOperand(queries, groups, inv, shift.to(queries.dtype).clone(), path == "screened")

    @property
    def shift(self) -> torch.Tensor:
        """(Q, L) the current shift."""
        return self.operand.shift

    def add(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """images (n, C, H, W) of s * y_n -> (full (Q, L, n), agg (Q, L, n), rescale (Q, L) or None)."""
        cand = CandidateOperand.build(images, self.scale, self.groups, self.inv, self.queries.shape[0],
                                      self.path == "screened", self.path == "conv")
        full, agg, hit = shifted_masses(self.operand, cand, self.groups, self.topk)
        if not hit.any():
            return full, agg, None
        old = self.shift.clone()
        gi = interior_index(self.groups)
        classes = ([] if gi is None else [(gi, None, None)]) + [
            (i, bi, ci) for bi, batch in enumerate(border_batches(self.groups)) for ci, i in enumerate(batch)]
        for i, bi, ci in classes:
            if bi is None and cand.conv is not None:
                logits_of = functools.partial(_conv_logits, cand.conv, self.inv)
            else:
                b = cand.interior if bi is None else cand.border[bi][ci]
                norms = cand.interior_norms if bi is None else (None if cand.border_norms[bi] is None else cand.border_norms[bi][ci])
                logits_of = functools.partial(shifted_logits, b=b, norms=norms, inv=self.inv)
            self._raise_rows(self.groups[i].positions.to(hit.device), hit, logits_of, cand.n, full, agg)
        self.operand.refresh()
        return full, agg, torch.exp(old - self.shift)

    def _raise_rows(self, pos: torch.Tensor, hit: torch.Tensor, logits_of, n: int, full: torch.Tensor, agg: torch.Tensor) -> None:
        """Recompute, in place, the rows at class positions ``pos`` that ``hit`` marks, with their shift
        raised to this chunk's largest logit (only those rows: a product of their query rows with the chunk,
        ``logits_of(rows (r, D + 2))`` -> (r, n * V) shifted logits, the class's product on this path)."""
        q_idx, u_idx = hit[:, pos].nonzero(as_tuple=True)
        if not len(q_idx):
            return
        at = pos[u_idx]
        sub = self.operand.aug[q_idx, at]  # (r, D + 2)
        logits = logits_of(sub).reshape(len(q_idx), n, -1)  # (r, n, V), under the old shift
        delta = logits.amax((1, 2))  # > CEIL: the new shift is old + delta
        f, g = _exp_rows((logits - delta[:, None, None]).reshape(len(q_idx) * n, -1), self.topk)
        full[q_idx, at] = f.view(len(q_idx), n)
        if agg is not full:
            agg[q_idx, at] = g.view(len(q_idx), n)
        self.operand.raise_shift(q_idx, at, delta)
