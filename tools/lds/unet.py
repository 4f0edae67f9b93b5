"""A compact DDPM noise-prediction U-Net (Ho et al. 2020, section 4), small enough to train on a CPU.

Three resolution levels by default (16 -> 8 -> 4 for 16x16 images), one residual block per level,
GroupNorm + SiLU, a sinusoidal timestep embedding added inside every residual block, skip
connections by concatenation. No attention: at these sizes it buys little and costs time.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["UNetConfig", "UNet", "timestep_embedding"]


@dataclass(frozen=True)
class UNetConfig:
    """Architecture of the U-Net; stored with every checkpoint so it can be rebuilt exactly."""

    channels: int = 3
    base: int = 32
    mults: tuple[int, ...] = (1, 2, 2)
    blocks: int = 1
    groups: int = 8

    def to_dict(self) -> dict:
        return asdict(self)


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """(B,) integer timesteps -> (B, dim) sinusoidal features (Vaswani et al. 2017, section 3.5)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


class ResBlock(nn.Module):
    """GN-SiLU-conv, + timestep projection, GN-SiLU-conv, plus a (1x1 if needed) skip."""

    def __init__(self, cin: int, cout: int, tdim: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(min(groups, cin), cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.temb = nn.Linear(tdim, cout)
        self.norm2 = nn.GroupNorm(min(groups, cout), cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb(temb)[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return h + self.skip(x)


class UNet(nn.Module):
    """eps_theta(x_t, t): (B, C, H, W) float images and (B,) int timesteps -> (B, C, H, W).

    H and W must be divisible by 2 ** (len(mults) - 1).
    """

    def __init__(self, config: UNetConfig = UNetConfig()):
        super().__init__()
        self.config = config
        c, b, g = config.channels, config.base, config.groups
        self.tdim = 4 * b
        self.time = nn.Sequential(nn.Linear(b, self.tdim), nn.SiLU(), nn.Linear(self.tdim, self.tdim))
        self.stem = nn.Conv2d(c, b, 3, padding=1)
        widths = [b * m for m in config.mults]
        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        skips = [b]
        cur = b
        for level, w in enumerate(widths):
            for _ in range(config.blocks):
                self.down.append(ResBlock(cur, w, self.tdim, g))
                cur = w
                skips.append(cur)
            if level < len(widths) - 1:
                self.downsample.append(nn.Conv2d(cur, cur, 3, stride=2, padding=1))
                skips.append(cur)
        self.mid = nn.ModuleList([ResBlock(cur, cur, self.tdim, g), ResBlock(cur, cur, self.tdim, g)])
        self.up = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for level, w in reversed(list(enumerate(widths))):
            for _ in range(config.blocks + 1):
                self.up.append(ResBlock(cur + skips.pop(), w, self.tdim, g))
                cur = w
            if level > 0:
                self.upsample.append(nn.Conv2d(cur, cur, 3, padding=1))
        self.out_norm = nn.GroupNorm(min(g, cur), cur)
        self.out = nn.Conv2d(cur, c, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        temb = self.time(timestep_embedding(t, cfg.base))
        h = self.stem(x)
        hs = [h]
        blocks = iter(self.down)
        for level in range(len(cfg.mults)):
            for _ in range(cfg.blocks):
                h = next(blocks)(h, temb)
                hs.append(h)
            if level < len(cfg.mults) - 1:
                h = self.downsample[level](h)
                hs.append(h)
        for block in self.mid:
            h = block(h, temb)
        blocks = iter(self.up)
        for i, level in enumerate(reversed(range(len(cfg.mults)))):
            for _ in range(cfg.blocks + 1):
                h = next(blocks)(torch.cat([h, hs.pop()], dim=1), temb)
            if level > 0:
                h = self.upsample[i](F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return self.out(F.silu(self.out_norm(h)))
