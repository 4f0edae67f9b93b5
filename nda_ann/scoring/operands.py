"""The two sides of the shifted-logit GEMM (masses.py), and which kernel path runs.

Query side, per layout class g: A_g (Q * U_g, D + 2) = [2 inv q, -inv, -inv ||q||^2 - shift].
Candidate side: [c, ||c||^2, 1] for every patch of the candidate images. Their product is the shifted
logit -||q - c||^2 / (2 sigma^2) - shift. The interior class (patches wholly inside the image, 66% of
the positions and 98% of the products at p = 7 on 32 x 32) is cut by ``unfold``; the border classes
are gathered and stacked in batches of equal size (one batched GEMM per batch).

Path ``conv`` (the CPU default, float32): the interior product is one convolution of the candidate
images (block sums for f > 1, channels-last) by the query rows as filters, the bias carrying the query
constant, run a few images at a time so that the passes over its output stay in cache
(masses.CONV_CACHE_BYTES). conv_layout.py takes it either as oneDNN's direct convolution, which never
cuts the candidates' patches (on an AMD EPYC it beat ``unfold`` with its copy; tools/bench_rescore.py),
or as the group's cut patches times the filters in one GEMM (1.5x faster on an Intel Xeon with AMX),
whichever it measures faster on this machine. The conv path never cuts the candidates' interior
rows (raised rows are convolved too); ``CandidateOperand.interior_rows`` cuts them on demand for a caller
that wants them.

Path ``screened`` (CPUs with AVX512-BF16 or AMX, CUDA GPUs; float32): the interior product is first
taken in bfloat16 (2.1x oneDNN's float32 rate on AVX512-BF16) only to find, per query position and
image, whether any term can lie within SCREEN_T of the shift; the exact float32 product is then taken
for those rows alone. The screen's operands are [2 inv q, k_hi, k_lo, 1, 1] and [c, 1, 1, e_hi, e_lo]
with k = -inv ||q||^2 - shift and e = -inv ||c||^2 split into two bfloat16 halves (so only the cross
term carries bfloat16 rounding, at most 2^-8 |2 inv q_u| |c_v| per product by Cauchy-Schwarz, plus the
output's). Path ``dense``: every product in the computation's dtype, the interior through ``unfold``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .conv_layout import interior_product
from .patches import LayoutGroup, patch_view
from .scales import Scale


def _cpu_has_bf16() -> bool:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return "avx512_bf16" in flags or "amx_bf16" in flags


_CPU_BF16 = _cpu_has_bf16()


PATHS = ("conv", "screened", "dense")


def kernel_path(device: torch.device, dtype: torch.dtype) -> str:
    """'conv', 'screened' or 'dense' for a computation on ``device`` in ``dtype``: float32 takes 'conv' on
    the CPU (measured fastest there at p = 7, 14 and 10:2, with or without AVX512-BF16; kernel.md) and on
    CUDA GPUs 'screened' from compute capability 8, else 'dense'; float64 always 'dense'.
    NDA_ANN_KERNEL=conv|screened|dense forces a float32 path (screened falls back to dense without
    bfloat16 products)."""
    if dtype != torch.float32:
        return "dense"
    bf16 = torch.cuda.get_device_capability(device)[0] >= 8 if device.type == "cuda" else _CPU_BF16
    forced = os.environ.get("NDA_ANN_KERNEL", "").lower()
    if forced in PATHS:
        return "dense" if forced == "screened" and not bf16 else forced
    if device.type == "cpu":
        return "conv"
    return "screened" if bf16 else "dense"


def describe_kernel(device: torch.device, dtype: torch.dtype) -> str:
    """One phrase for logs and summaries, e.g. 'conv (interior class as one float32 convolution ...)'."""
    path = kernel_path(device, dtype)
    if path == "conv":
        return ("conv (interior class as one float32 convolution of the candidates by the query patches, direct or "
                "unfolded as measured faster here)")
    if path == "screened":
        return "screened (bfloat16 screen of the interior class, exact float32 products where it matters)"
    return f"dense ({str(dtype).removeprefix('torch.')} products)"


def _split(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x float -> (hi, lo) bfloat16 with hi + lo = x to about 2^-16 relative."""
    hi = x.to(torch.bfloat16)
    return hi, (x - hi.to(x.dtype)).to(torch.bfloat16)


def interior_index(groups: list[LayoutGroup]) -> int | None:
    """Index of the interior class in ``groups`` (None if the patch never fits wholly inside)."""
    return next((i for i, g in enumerate(groups) if g.interior), None)


def border_batches(groups: list[LayoutGroup]) -> list[list[int]]:
    """The border classes (indices into ``groups``) in batches of equal size, one batched GEMM each
    (p = 7 on 32 x 32: 12 edge strips of 26 and 36 corners of 1; 14:2: 24 strips and 144 corners)."""
    by_size: dict[int, list[int]] = {}
    gi = interior_index(groups)
    for i, g in enumerate(groups):
        if i != gi:
            by_size.setdefault(len(g), []).append(i)
    return [by_size[size] for size in sorted(by_size)]


class QueryOperand:
    """Query side, derived from ``aug`` (Q, L, D + 2) = [2 inv q, -inv, -inv ||q||^2 - shift]:
    ``interior`` (Q * U, D + 2) rows of the interior class, ``batched[b]`` (k_b, Q * V_b, D + 2) per
    batch of border classes; screened path: ``screen`` (Q * U, D + 4) bfloat16 interior rows and
    ``screen_err`` (Q * U,) 2^-8 |2 inv q_u| (times max |c| it bounds the rows' bfloat16 error)."""

    def __init__(self, queries: torch.Tensor, groups: list[LayoutGroup], inv: float, shift: torch.Tensor,
                 screened: bool = False):
        """queries (Q, L, D) noised patch vectors; shift (Q, L) in their dtype and device (kept, not copied)."""
        self.groups, self.inv, self.shift, self.screened = groups, inv, shift, screened
        self.screen_rest = 0  # chunks left that skip the screen (masses._interior_screened)
        self.aug = torch.cat([queries * (2.0 * inv), torch.full_like(queries[..., :1], -inv),
                              (-inv * queries.square().sum(-1) - shift)[..., None]], -1)
        self.refresh()

    def refresh(self) -> None:
        """(Re-)derive the class operands from ``aug`` (after a shift changed)."""
        nq, _, width = self.aug.shape
        gi = interior_index(self.groups)
        self.interior = None if gi is None else self.aug[:, self.groups[gi].positions].reshape(-1, width)
        self.batched = []
        for batch in border_batches(self.groups):
            k, u = len(batch), len(self.groups[batch[0]])
            pos = torch.cat([self.groups[i].positions for i in batch])
            self.batched.append(self.aug[:, pos].view(nq, k, u, width).transpose(0, 1).reshape(k, nq * u, width))
        self._conv = None
        self.screen = self.screen_err = None
        if self.screened and self.interior is not None and screens(self.groups, width - 2):
            cross = self.interior[:, :-2]  # 2 inv q
            hi, lo = _split(self.interior[:, -1:])  # -inv ||q||^2 - shift
            one = torch.ones_like(hi)
            self.screen = torch.cat([cross.to(torch.bfloat16), hi, lo, one, one], 1)
            self.screen_err = cross.norm(dim=1) * 2.0**-8

    def conv_filters(self, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The interior rows as ``filters_of`` them (the ``conv`` path; cached until ``refresh``)."""
        if self._conv is None:
            self._conv = filters_of(self.interior, channels)
        return self._conv

    def raise_shift(self, q_idx: torch.Tensor, pos: torch.Tensor, delta: torch.Tensor) -> None:
        """Raise the shift of rows (q_idx, pos) by ``delta``; call ``refresh`` once after the last raise."""
        self.aug[q_idx, pos, -1] -= delta
        self.shift[q_idx, pos] += delta


def _with_norms(vec: torch.Tensor, norms: torch.Tensor, augment: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """vec (..., D), norms (...,) its squared norms -> ([vec, ||vec||^2, 1], None) when augmented, else (vec, norms)."""
    if augment:
        out = torch.empty(vec.shape[:-1] + (vec.shape[-1] + 2,), dtype=vec.dtype, device=vec.device)
        out[..., :-2] = vec
        out[..., -2] = norms
        out[..., -1] = 1.0
        return out, None
    return vec.contiguous(), norms


def patch_norms(images: torch.Tensor, scale: Scale, padded: bool) -> torch.Tensor:
    """(n, G, G) squared norms of the patch vectors at every position (``padded``: 'same' padding, all
    positions; else the interior positions only): a box sum of squared (block-summed) pixels, far cheaper
    than reducing the cut patches."""
    r, f, m = scale.pad, scale.factor, scale.patch // scale.factor
    x = F.pad(images, (r, r, r, r)) if padded else images
    if f > 1:
        x = F.avg_pool2d(x, f, stride=1) * f
    ones = torch.ones((1, x.shape[1], m, m), dtype=x.dtype, device=x.device)
    return F.conv2d(x.square(), ones, dilation=f)[:, 0]


def filters_of(rows: torch.Tensor, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Query rows (r, D + 2) of the augmented operand -> convolution filters (r, C, m, m) = 2 inv q and
    their bias (r,) = -inv ||q||^2 - shift (the ``conv`` path; D = C m^2)."""
    dim = rows.shape[1] - 2
    m = int(round((dim // channels) ** 0.5))
    return rows[:, :dim].reshape(-1, channels, m, m).contiguous(), rows[:, -1].contiguous()


def _cut_interior(pooled: torch.Tensor, norms: torch.Tensor, m: int, f: int, augment: bool
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """pooled (n, C, H', W') block sums, norms (n, V) -> (interior (n * V, D'), interior_norms (n * V,) or None)."""
    n = pooled.shape[0]
    cols = F.unfold(pooled, m, dilation=f).transpose(1, 2)  # (n, V, D): the patches wholly inside, row-major
    interior, flat_norms = _with_norms(cols, norms, augment)
    return interior.view(n * cols.shape[1], -1), None if flat_norms is None else flat_norms.reshape(-1)


@dataclass
class ConvInterior:
    """The interior class of n candidates as convolution input (path ``conv``): ``pooled`` (n, C, H', W')
    channels-last block sums / f, ``norms`` (n, 1, G_i, G_i) the interior patches' squared norms."""

    pooled: torch.Tensor
    norms: torch.Tensor
    patch: int  # m = p / f, the filter size
    factor: int  # f, the convolution's dilation
    augment: bool  # how ``CandidateOperand.interior_rows`` cuts the rows if asked

    def shifted(self, filters: tuple[torch.Tensor, torch.Tensor], inv: float, lo: int = 0, hi: int | None = None) -> torch.Tensor:
        """(n', r, G_i, G_i) shifted logits of images lo:hi for the query rows behind ``filters``
        (``filters_of``): the product (conv_layout.py: direct convolution or unfolded GEMM, whichever is
        faster here), less the candidates' norm term; channels-last memory."""
        weight, bias = filters
        return interior_product(self.pooled[lo:hi], weight, bias, self.factor).sub_(inv * self.norms[lo:hi])


@dataclass
class CandidateOperand:
    """Candidate side for n images. ``interior`` (n * V, D') image-major; ``border[b]`` (k_b, n * V_b, D')
    per batch of border classes (``border_batches``). D' = D + 2, [c, ||c||^2, 1], where the logits
    outnumber the operand (Q * U > D: the product then yields the shifted logits); else D' = D with
    ||c||^2 in ``interior_norms`` (n * V,) / ``border_norms[b]`` (k_b, n * V_b), added to the product.
    Screened path: ``screen`` (n * V, D + 4) bfloat16 and ``c_max`` the largest |c| of the chunk."""

    n: int
    border: list[torch.Tensor]
    interior: torch.Tensor | None
    interior_norms: torch.Tensor | None = None
    border_norms: list[torch.Tensor | None] | None = None
    screen: torch.Tensor | None = None
    c_max: float = 0.0
    conv: ConvInterior | None = None

    def interior_rows(self) -> torch.Tensor | None:
        """``interior`` (n * V, D'), cut on first use where the ``conv`` path skipped it (then also
        ``interior_norms``)."""
        if self.interior is None and self.conv is not None:
            c = self.conv
            self.interior, self.interior_norms = _cut_interior(c.pooled, c.norms.reshape(self.n, -1), c.patch, c.factor, c.augment)
        return self.interior

    @classmethod
    def build(cls, images: torch.Tensor, scale: Scale, groups: list[LayoutGroup], inv: float, rows: int = 1,
              screened: bool = False, conv: bool = False) -> "CandidateOperand":
        """images (n, C, H, W) of s * y_n, in the dtype and on the device of the computation; ``rows``
        the queries Q of the operand it meets; ``conv``: keep the interior class as ``ConvInterior``."""
        n, dim = images.shape[0], scale.dim(images.shape[1])
        gi = interior_index(groups)
        out = cls(n, [], None, border_norms=[])
        if gi is not None:
            f, m = scale.factor, scale.patch // scale.factor
            pooled = images if f == 1 else F.avg_pool2d(images, f, stride=1) * f  # block sums / f
            norm_map = patch_norms(images, scale, padded=False)  # (n, G_i, G_i)
            augment = rows * len(groups[gi]) > dim
            if conv:
                out.conv = ConvInterior(pooled.contiguous(memory_format=torch.channels_last), norm_map[:, None], m, f, augment)
            else:
                norms = norm_map.view(n, -1)  # (n, V)
                out.interior, out.interior_norms = _cut_interior(pooled, norms, m, f, augment)
                if screened and screens(groups, dim):
                    cols = out.interior[:, :dim].reshape(n, -1, dim)
                    norms = norms[..., None]
                    hi, lo = _split(-inv * norms)
                    one = torch.ones_like(hi)
                    out.screen = torch.cat([cols.to(torch.bfloat16), one, one, hi, lo], -1).view(-1, dim + 4)
                    out.c_max = float(norms.max().sqrt())
        batches = border_batches(groups)
        if batches:
            view = patch_view(images, scale)  # (n, G, G, C, m, m)
            grid = view.shape[1]
            all_norms = patch_norms(images, scale, padded=True)  # (n, G, G)
            img = torch.arange(n, device=images.device)[None, :, None]
            for batch in batches:
                k, u = len(batch), len(groups[batch[0]])
                pos = torch.stack([groups[i].positions for i in batch]).to(images.device)[:, None, :]  # (k, 1, u)
                vec = view[img, pos // grid, pos % grid].reshape(k, n * u, dim)  # gathered batch-major
                b, norms = _with_norms(vec, all_norms[img, pos // grid, pos % grid].reshape(k, n * u), rows * u > dim)
                out.border.append(b)
                out.border_norms.append(norms)
        return out


def screens(groups: list[LayoutGroup], dim: int) -> bool:
    """Whether the screened path screens this scale: when its interior class has more positions than a
    patch has entries (p = 7: 676 > 147, 10:2: 529 > 75; not p = 14: 361 < 588, where the product is
    cheap next to cutting the operands)."""
    gi = interior_index(groups)
    return gi is not None and len(groups[gi]) > dim
