"""Patch vectors and layout classes (docs/scores.md sections 2 and 3).

A patch's layout is the set of its pixels outside the image. Because every image of a store has the
same size, the layout depends only on the position, and splits into a row part and a column part.
Patches of one layout class compete only with each other.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .scales import Scale


def axis_layouts(size: int, scale: Scale) -> list[tuple[int, int]]:
    """Per position along one axis: (pixels clipped before, pixels clipped after)."""
    p, r = scale.patch, scale.pad
    out = []
    for i in range(scale.grid(size)):
        first, last = i - r, i - r + p - 1
        out.append((max(0, -first), max(0, last - (size - 1))))
    return out


@dataclass(frozen=True)
class LayoutGroup:
    """One layout class: its key and the flat indices (i * grid + j) of its positions, sorted."""

    key: tuple[tuple[int, int], tuple[int, int]]
    positions: torch.Tensor  # (V_g,) int64

    @property
    def interior(self) -> bool:
        return self.key == ((0, 0), (0, 0))

    def __len__(self) -> int:
        return int(self.positions.numel())


def layout_groups(size: int, scale: Scale) -> list[LayoutGroup]:
    """The layout classes of a size x size image at one scale, in a fixed order (sorted by key).

    The position lists partition range(grid * grid).
    """
    scale.check_fits(size)
    axis = axis_layouts(size, scale)
    g = len(axis)
    by_key: dict[tuple, list[int]] = {}
    for i, row in enumerate(axis):
        for j, col in enumerate(axis):
            by_key.setdefault((row, col), []).append(i * g + j)
    return [LayoutGroup(k, torch.tensor(v, dtype=torch.int64)) for k, v in sorted(by_key.items())]


def layout_of_positions(size: int, scale: Scale) -> torch.Tensor:
    """(grid * grid,) int64: the index in ``layout_groups(size, scale)`` of each position's class."""
    out = torch.empty(scale.grid(size) ** 2, dtype=torch.int64)
    for gi, group in enumerate(layout_groups(size, scale)):
        out[group.positions] = gi
    return out


def extract_patches(images: torch.Tensor, scale: Scale) -> torch.Tensor:
    """Patch vectors of every position: images (B, C, H, W) -> (B, grid * grid, (p / f)^2 * C).

    Out-of-image pixels are zero; for f > 1 each channel of the p x p patch is projected onto
    f x f blocks with weight 1/f per pixel (block sum / f), an orthonormal projection.
    Positions are row-major over the grid; entries are ordered (channel, block row, block col).
    """
    view = patch_view(images, scale)
    b, g, _, c, m, _ = view.shape
    return view.reshape(b, g * g, c * m * m)  # one copy


def patch_view(images: torch.Tensor, scale: Scale) -> torch.Tensor:
    """A strided view (B, G, G, C, m, m) of the padded (and, for f > 1, block-summed) images:
    [b, i, j] is the patch vector at grid position (i, j), m = p / f. Indexing it gathers patches."""
    if images.ndim != 4:
        raise ValueError(f"expected images of shape (B, C, H, W), got {tuple(images.shape)}")
    b, c, h, w = images.shape
    if h != w:
        raise ValueError(f"images must be square, got {h}x{w}")
    scale.check_fits(h)
    p, r, f = scale.patch, scale.pad, scale.factor
    padded = F.pad(images, (r, r, r, r))
    if f > 1:
        padded = F.avg_pool2d(padded, kernel_size=f, stride=1) * f  # block sums / f, at every offset
    g, m = scale.grid(h), p // f
    sb, sc, sh, sw = padded.stride()
    return padded.as_strided((b, g, g, c, m, m), (sb, sh, sw, sc, f * sh, f * sw))


def candidate_grid(size: int, scale: Scale, stride: int) -> torch.Tensor:
    """(grid * grid,) bool: the positions an index on a stride-``stride`` candidate grid keeps.

    Position (i, j) is kept when each coordinate is either a border coordinate (its patch is
    clipped on that axis) or a multiple of ``stride``; so every layout class keeps at least one
    position and border classes are thinned only along their free axis. stride 1 keeps all.
    """
    if stride < 1:
        raise ValueError(f"candidate stride must be at least 1, got {stride}")
    axis = axis_layouts(size, scale)
    keep_axis = torch.tensor([lay != (0, 0) or i % stride == 0 for i, lay in enumerate(axis)])
    return (keep_axis[:, None] & keep_axis[None, :]).flatten()
