"""The two sides of the shifted-logit GEMM (masses.py), and which kernel path runs.

Query side, per layout class g: A_g (Q * U_g, D + 2) = [2 inv q, -inv, -inv ||q||^2 - shift].
Candidate side: [c, ||c||^2, 1] for every patch of the candidate images. Their product is the shifted
logit -||q - c||^2 / (2 sigma^2) - shift. The interior class (patches wholly inside the image, 66% of
the positions and 98% of the products at p = 7 on 32 x 32) is cut by ``unfold`` into (n, D + 2, V)
per image, the layout a batched GEMM takes as it is; the border classes are gathered per class.

Path ``screened`` (CPUs with AVX512-BF16 or AMX, CUDA GPUs; float32): the interior product is first
taken in bfloat16 (2.1x oneDNN's float32 rate on AVX512-BF16) only to find, per query position and
image, whether any term can lie within SCREEN_T of the shift; the exact float32 product is then taken
for those rows alone. The screen's operands are [2 inv q, k_hi, k_lo, 1, 1] and [c, 1, 1, e_hi, e_lo]
with k = -inv ||q||^2 - shift and e = -inv ||c||^2 split into two bfloat16 halves (so only the cross
term carries bfloat16 rounding, at most 2^-8 |2 inv q_u| |c_v| per product by Cauchy-Schwarz, plus the
output's). Path ``dense``: every product in the computation's dtype.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

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


def kernel_path(device: torch.device, dtype: torch.dtype) -> str:
    """'screened' or 'dense' for a computation on ``device`` in ``dtype`` (NDA_ANN_KERNEL=dense forces dense)."""
    if os.environ.get("NDA_ANN_KERNEL", "").lower() == "dense" or dtype != torch.float32:
        return "dense"
    if device.type == "cuda":
        return "screened" if torch.cuda.get_device_capability(device)[0] >= 8 else "dense"
    return "screened" if _CPU_BF16 else "dense"


def describe_kernel(device: torch.device, dtype: torch.dtype) -> str:
    """One phrase for logs and summaries, e.g. 'screened (bf16 screen, float32 exact)'."""
    if kernel_path(device, dtype) == "screened":
        return "screened (bfloat16 screen of the interior class, exact float32 products where it matters)"
    return f"dense ({str(dtype).removeprefix('torch.')} products)"


def _split(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x float -> (hi, lo) bfloat16 with hi + lo = x to about 2^-16 relative."""
    hi = x.to(torch.bfloat16)
    return hi, (x - hi.to(x.dtype)).to(torch.bfloat16)


def interior_index(groups: list[LayoutGroup]) -> int | None:
    """Index of the interior class in ``groups`` (None if the patch never fits wholly inside)."""
    return next((i for i, g in enumerate(groups) if g.interior), None)


@dataclass
class QueryOperand:
    """Query side: per class (Q * U_g, D + 2); ``screen`` (Q * U, D + 4) bfloat16 interior rows and
    ``screen_err`` (Q * U,) 2^-8 |2 inv q_u| (times max |c| it bounds the rows' bfloat16 error)."""

    mats: list[torch.Tensor]
    shift: torch.Tensor  # (Q, L)
    inv: float
    screen: torch.Tensor | None = None
    screen_err: torch.Tensor | None = None

    @classmethod
    def build(cls, queries: torch.Tensor, groups: list[LayoutGroup], inv: float, shift: torch.Tensor,
              screened: bool = False) -> "QueryOperand":
        """queries (Q, L, D) noised patch vectors; shift (Q, L) in their dtype and device."""
        nq, _, dim = queries.shape
        const = -inv * queries.square().sum(-1) - shift  # (Q, L)
        mats = []
        for group in groups:
            pos = group.positions.to(queries.device)
            a = torch.empty((nq, len(pos), dim + 2), dtype=queries.dtype, device=queries.device)
            a[..., :dim] = queries[:, pos] * (2.0 * inv)
            a[..., dim] = -inv
            a[..., dim + 1] = const[:, pos]
            mats.append(a.view(nq * len(pos), dim + 2))
        out = cls(mats, shift, inv)
        if screened and interior_index(groups) is not None:
            out.refresh_screen(groups)
        return out

    def refresh_screen(self, groups: list[LayoutGroup]) -> None:
        """(Re-)derive the bfloat16 interior rows from the float ones (after the shift changed)."""
        a = self.mats[interior_index(groups)]
        cross = a[:, :-2]  # 2 inv q
        hi, lo = _split(a[:, -1:])  # -inv ||q||^2 - shift
        one = torch.ones_like(hi)
        self.screen = torch.cat([cross.to(torch.bfloat16), hi, lo, one, one], 1)
        self.screen_err = cross.norm(dim=1) * 2.0**-8


@dataclass
class CandidateOperand:
    """Candidate side for n images: ``border[g]`` (n * V_g, D + 2) per border class (None for the
    interior), ``interior`` (n, D + 2, V) float (unfold's layout, which batched GEMMs take as it is);
    screened path: ``screen`` (n, D + 4, V) bfloat16 and ``c_max`` the largest |c| of the chunk."""

    n: int
    border: list[torch.Tensor | None]
    interior: torch.Tensor | None
    screen: torch.Tensor | None = None
    c_max: float = 0.0

    @classmethod
    def build(cls, images: torch.Tensor, scale: Scale, groups: list[LayoutGroup], inv: float,
              screened: bool = False) -> "CandidateOperand":
        """images (n, C, H, W) of s * y_n, in the dtype and on the device of the computation."""
        n = images.shape[0]
        gi = interior_index(groups)
        interior = screen = None
        c_max = 0.0
        if gi is not None:
            f, m = scale.factor, scale.patch // scale.factor
            pooled = images if f == 1 else F.avg_pool2d(images, f, stride=1) * f  # block sums / f
            cols = F.unfold(pooled, m, dilation=f)  # (n, D, V): the patches wholly inside, row-major
            norms = cols.square().sum(1, keepdim=True)  # (n, 1, V)
            interior = torch.cat([cols, norms, torch.ones_like(norms)], 1)
            if screened:
                hi, lo = _split(-inv * norms)
                one = torch.ones_like(hi)
                screen = torch.cat([cols.to(torch.bfloat16), one, one, hi, lo], 1)
                c_max = float(norms.max().sqrt())
        border_groups = [g for i, g in enumerate(groups) if i != gi]
        border: list[torch.Tensor | None] = [None] * len(groups)
        if border_groups:
            view = patch_view(images, scale)  # (n, G, G, C, m, m)
            grid = view.shape[1]
            pos = torch.cat([g.positions for g in border_groups]).to(images.device)
            vec = view[:, pos // grid, pos % grid].reshape(n, len(pos), -1)  # (n, Lb, D)
            aug = torch.cat([vec, vec.square().sum(-1, keepdim=True), torch.ones_like(vec[..., :1])], -1)
            lo = 0
            for i, g in enumerate(groups):
                if i == gi:
                    continue
                border[i] = aug[:, lo : lo + len(g)].reshape(n * len(g), -1)
                lo += len(g)
        return cls(n, border, interior, screen, c_max)
