"""Layout classes with their indexed positions, and the layout-coded id space.

Each layout class of a scale gets its own FAISS sub-index, so a query patch can only ever retrieve
candidates of its own layout (docs/scores.md section 2). Inside a class, vectors are added image by image and,
within an image, in the order of the class's indexed positions. The FAISS label of a vector is
therefore ``(image - first_image_of_shard) * width + j``, and the global layout-coded id is
``image * width + j``: decoding needs no stored id map, only the class's position list.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..scoring.patches import candidate_grid, layout_groups
from ..scoring.scales import Scale

STRIDE_RULE = (
    "nda_ann.scoring.patches.candidate_grid: a grid coordinate i (row or column) is kept iff its patch is "
    "clipped along that axis (a border coordinate) or i % stride == 0; a position (row, col) is "
    "indexed iff both its coordinates are kept. Border classes are thinned only along their free "
    "axis; stride 1 indexes every position."
)


@dataclass(frozen=True)
class ClassLayout:
    """One layout class of one scale.

    ``positions`` (L_g,) are all its grid positions (flat, row-major: what queries use);
    ``indexed`` (V_g,) the subset indexed as candidates under the candidate stride.
    """

    index: int
    key: tuple[tuple[int, int], tuple[int, int]]
    positions: np.ndarray
    indexed: np.ndarray

    @property
    def kind(self) -> str:
        """'interior' (no clipped pixel), 'edge' (clipped along one axis) or 'corner' (both)."""
        clipped = sum(part != (0, 0) for part in self.key)
        return ("interior", "edge", "corner")[clipped]

    @property
    def width(self) -> int:
        """V_g: indexed positions per image, the multiplier of the layout-coded id space."""
        return int(self.indexed.size)

    def decode(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Global layout-coded ids (any shape, -1 = missing) -> (image, flat position), -1 where missing."""
        ids = np.asarray(ids, dtype=np.int64)
        valid = ids >= 0
        if self.width == 0:
            return np.full(ids.shape, -1, np.int64), np.full(ids.shape, -1, np.int64)
        safe = np.where(valid, ids, 0)
        image = np.where(valid, safe // self.width, -1)
        position = np.where(valid, self.indexed[safe % self.width], -1)
        return image, position


INDEX_CLASSES = ("all", "interior")
INTERIOR_RULE = (
    "only the interior layout class is indexed (--classes interior): query patches that are clipped by "
    "the image border retrieve nothing, so candidate images come from interior patches alone; dense "
    "re-scoring still covers every position of every candidate"
)


def class_layouts(size: int, scale: Scale, stride: int = 1, classes: str = "all") -> list[ClassLayout]:
    """The layout classes of a size x size image at ``scale``, in ``layout_groups`` order.

    ``classes="interior"`` indexes no position of the border classes (their ``indexed`` is empty).
    """
    if stride < 1:
        raise ValueError(f"candidate stride must be >= 1, got {stride}")
    if classes not in INDEX_CLASSES:
        raise ValueError(f"classes must be one of {INDEX_CLASSES}, got {classes!r}")
    keep = candidate_grid(size, scale, stride).numpy()
    out = []
    for gi, group in enumerate(layout_groups(size, scale)):
        pos = group.positions.numpy().astype(np.int64)
        indexed = pos[keep[pos]] if classes == "all" or group.interior else pos[:0]
        out.append(ClassLayout(gi, group.key, pos, indexed))
    return out

