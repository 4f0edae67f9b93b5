"""DDPM noise schedules and the seeded, device-independent noising of docs/scores.md section 1."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

ScheduleName = Literal["linear", "scaled_linear", "squaredcos_cap_v2"]
SCHEDULES: tuple[str, ...] = ("linear", "scaled_linear", "squaredcos_cap_v2")


def _cosine_betas(steps: int, max_beta: float = 0.999) -> torch.Tensor:
    """Betas of the squared-cosine schedule (Nichol & Dhariwal 2021, eq. 17), as diffusers builds them."""

    def alpha_bar(u: float) -> float:
        return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [min(1 - alpha_bar((i + 1) / steps) / alpha_bar(i / steps), max_beta) for i in range(steps)]
    return torch.tensor(betas, dtype=torch.float32)


@dataclass(frozen=True)
class NoiseSchedule:
    """A DDPM schedule of ``steps`` steps; ``alpha_bar(t)`` for t in [0, steps).

    ``beta_start``/``beta_end`` apply to ``linear`` and ``scaled_linear`` (diffusers' names and
    formulas; Stable Diffusion's scaled_linear uses 0.00085 and 0.012).
    """

    name: str = "linear"
    steps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02

    def __post_init__(self) -> None:
        if self.name not in SCHEDULES:
            raise ValueError(f"unknown noise schedule {self.name!r}; choose one of {', '.join(SCHEDULES)}")
        if self.steps < 1:
            raise ValueError(f"a schedule needs at least one step, got steps={self.steps}")

    def betas(self) -> torch.Tensor:
        """(steps,) float32 betas."""
        if self.name == "linear":
            return torch.linspace(self.beta_start, self.beta_end, self.steps, dtype=torch.float32)
        if self.name == "scaled_linear":
            return torch.linspace(self.beta_start**0.5, self.beta_end**0.5, self.steps, dtype=torch.float32) ** 2
        return _cosine_betas(self.steps)

    def alphas_cumprod(self) -> torch.Tensor:
        """(steps,) float32 cumulative products alpha_bar_t = prod_{i<=t} (1 - beta_i)."""
        return torch.cumprod(1.0 - self.betas(), dim=0)

    def check_timestep(self, t: int) -> int:
        """Return ``t`` as an int, or raise a ValueError naming the valid range."""
        if isinstance(t, bool) or int(t) != t or not 0 <= int(t) < self.steps:
            raise ValueError(f"timestep {t!r} is outside the {self.name} schedule's range 0..{self.steps - 1}")
        return int(t)

    def alpha_bar(self, t: int) -> float:
        """alpha_bar_t as a Python float (from the float32 cumulative product)."""
        return float(self.alphas_cumprod()[self.check_timestep(t)])

    def signal_and_noise(self, t: int) -> tuple[float, float]:
        """(s, sigma^2) at t: s = sqrt(alpha_bar_t), sigma^2 = 1 - alpha_bar_t."""
        a = self.alpha_bar(t)
        return math.sqrt(a), 1.0 - a


def noise(shape: tuple[int, int, int], t: int, seed: int = 0, draw: int = 0) -> torch.Tensor:
    """The fixed noise eps of docs/scores.md section 1: (C, H, W) float32 on the CPU.

    The same for every query at timestep ``t``; draw ``d`` of several uses seed + d.
    """
    generator = torch.Generator("cpu").manual_seed((seed + draw) * 1000 + int(t))
    return torch.randn(tuple(shape), generator=generator, dtype=torch.float32)


def noise_images(
    images: torch.Tensor, t: int, schedule: NoiseSchedule, seed: int = 0, draw: int = 0
) -> torch.Tensor:
    """x_t = s * x + sigma * eps for a batch: images (Q, C, H, W) in [-1, 1] -> (Q, C, H, W)."""
    s, sigma2 = schedule.signal_and_noise(t)
    eps = noise(tuple(images.shape[1:]), t, seed, draw).to(device=images.device, dtype=images.dtype)
    return s * images + math.sqrt(sigma2) * eps
