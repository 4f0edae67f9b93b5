"""The noised patch vectors of a block of queries at one timestep, computed once and handed to
every stage (candidate search, re-ranking, known logits, outside sample, re-scoring)."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..scoring.patches import extract_patches
from ..scoring.scales import Scale
from ..scoring.schedule import NoiseSchedule, noise_images

Key = tuple[int, Scale]  # (noise draw, scale)


@dataclass
class NoisedBlock:
    """Queries ``block`` (B, C, H, W) noised at timestep ``t``: per draw (B, C, H, W) images and per
    (draw, scale) (B, L, D) float32 CPU patch vectors of x_t (docs/scores.md section 1: draw d uses seed + d)."""

    t: int
    s: float
    sigma2: float
    noisy: list[torch.Tensor]
    vectors: dict[Key, torch.Tensor]
    _placed: dict[tuple[int, str, torch.dtype], dict[Key, torch.Tensor]] = field(default_factory=dict, repr=False)

    @classmethod
    def make(cls, block: torch.Tensor, t: int, sched: NoiseSchedule, seed: int, draws: int, scales: list[Scale]) -> "NoisedBlock":
        s, sigma2 = sched.signal_and_noise(t)
        noisy = [noise_images(block, t, sched, seed, d) for d in range(draws)]
        vectors = {(d, sc): extract_patches(noisy[d], sc) for d in range(draws) for sc in scales}
        return cls(t, s, sigma2, noisy, vectors)

    @property
    def keys(self) -> list[Key]:
        return list(self.vectors)

    def search_vectors(self, key: Key) -> np.ndarray:
        """(B, L, D) float32: the patch vectors divided by s, in the space of the unscaled index."""
        return (self.vectors[key] / self.s).numpy()

    def of(self, b: int, device: torch.device, dtype: torch.dtype) -> dict[Key, torch.Tensor]:
        """Row ``b``'s patch vectors per (draw, scale), (1, L, D) on ``device`` in ``dtype`` (cached)."""
        tag = (b, str(device), dtype)
        if tag not in self._placed:
            if device.type == "cpu" and dtype == torch.float32:
                placed = {key: v[b : b + 1] for key, v in self.vectors.items()}
            else:  # cut again in the target dtype, so that f > 1 block sums round as that dtype does
                placed = {(d, sc): extract_patches(self.noisy[d][b : b + 1].to(device, dtype), sc) for d, sc in self.vectors}
            self._placed[tag] = placed
        return self._placed[tag]

    def mean_image(self, b: int) -> torch.Tensor:
        """(1, C, H, W): row ``b``'s noised image averaged over draws."""
        return torch.stack([x[b] for x in self.noisy]).mean(0, keepdim=True)
