"""Patch scales (patch size p, projection factor f) of docs/scores.md section 3."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence, Union

ScaleLike = Union["Scale", int, str, Sequence[int]]


@dataclass(frozen=True, order=True)
class Scale:
    """A p x p patch, projected onto f x f blocks with weight 1/f per pixel when f > 1."""

    patch: int
    factor: int = 1

    def __post_init__(self) -> None:
        if self.patch < 1:
            raise ValueError(f"patch size must be positive, got {self.patch}")
        if self.factor < 1:
            raise ValueError(f"projection factor must be positive, got {self.factor}")
        if self.patch % self.factor:
            raise ValueError(
                f"scale {self}: patch size {self.patch} is not a multiple of factor {self.factor} "
                f"(f = {self.factor} needs p divisible by {self.factor}, e.g. {self.patch + self.factor - self.patch % self.factor})"
            )

    def __str__(self) -> str:
        return f"{self.patch}" if self.factor == 1 else f"{self.patch}:{self.factor}"

    @classmethod
    def parse(cls, value: ScaleLike) -> "Scale":
        """Accept a Scale, 7, "7", "14:2", (14, 2)."""
        if isinstance(value, Scale):
            return value
        if isinstance(value, bool):
            raise ValueError(f"not a scale: {value!r}")
        if isinstance(value, int):
            return cls(value)
        if isinstance(value, str):
            parts = value.strip().split(":")
            try:
                nums = [int(x) for x in parts]
            except ValueError:
                raise ValueError(f"not a scale: {value!r}; write P or P:F, e.g. 7 or 14:2") from None
            if len(nums) not in (1, 2):
                raise ValueError(f"not a scale: {value!r}; write P or P:F, e.g. 7 or 14:2")
            return cls(*nums)
        nums = list(value)
        if len(nums) not in (1, 2):
            raise ValueError(f"not a scale: {value!r}; give (p,) or (p, f)")
        return cls(*(int(x) for x in nums))

    @property
    def pad(self) -> int:
        """r = (p - 1) // 2 zero pixels on every side ('same' padding)."""
        return (self.patch - 1) // 2

    def grid(self, size: int) -> int:
        """Patch positions per side on a size x size image: size for odd p, size - 1 for even p."""
        return size + 2 * self.pad - self.patch + 1

    def dim(self, channels: int) -> int:
        """Length of one patch vector: (p / f)^2 * C."""
        return (self.patch // self.factor) ** 2 * channels

    def check_fits(self, size: int) -> None:
        """Raise a ValueError if the patch is larger than a size x size image."""
        if self.patch > size:
            raise ValueError(f"scale {self}: patch size {self.patch} is larger than the {size}x{size} images")


def parse_scales(values: Iterable[ScaleLike]) -> list[Scale]:
    """Parse a list of scales; at least one, no duplicates."""
    scales = [Scale.parse(v) for v in values]
    if not scales:
        raise ValueError("at least one scale is needed, e.g. [7] or [(14, 1), (10, 2)]")
    if len(set(scales)) != len(scales):
        raise ValueError(f"duplicate scales in {[str(s) for s in scales]}")
    return scales
