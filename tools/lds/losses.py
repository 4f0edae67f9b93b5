"""The measured quantity of LDS: each model's diffusion loss on each query, at fixed timesteps and noise."""
from __future__ import annotations

import numpy as np
import torch

from nda_ann.scoring.schedule import NoiseSchedule

from .unet import UNet

__all__ = ["loss_timesteps", "fixed_noise", "diffusion_losses"]


def loss_timesteps(count: int, steps: int = 1000) -> np.ndarray:
    """``count`` timesteps evenly spread over [0, steps): floor((k + 0.5) * steps / count)."""
    if count < 1:
        raise ValueError(f"need at least one loss timestep, got {count}")
    return np.floor((np.arange(count) + 0.5) * steps / count).astype(np.int64)


def fixed_noise(n_images: int, n_timesteps: int, draws: int, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """(n_images, n_timesteps, draws, C, H, W) float32 noise; image i's noise depends on (seed, i) only."""
    out = torch.empty((n_images, n_timesteps, draws) + tuple(shape))
    for i in range(n_images):
        out[i] = torch.randn((n_timesteps, draws) + tuple(shape), generator=torch.Generator("cpu").manual_seed(seed * 1_000_003 + i))
    return out


@torch.no_grad()
def diffusion_losses(model: UNet, images: torch.Tensor, timesteps: np.ndarray, noise: torch.Tensor, schedule: str = "linear", batch: int = 512) -> np.ndarray:
    """(Q,) mean over timesteps and draws of ||eps - eps_theta(sqrt(a) x + sqrt(1 - a) eps, t)||^2 / D.

    images (Q, C, H, W); noise (Q, T, draws, C, H, W) from ``fixed_noise``.
    """
    device = next(model.parameters()).device
    alphas = NoiseSchedule(schedule).alphas_cumprod()
    q, nt, nd = noise.shape[:3]
    ts = torch.as_tensor(timesteps, dtype=torch.long)
    # one row per (query, timestep, draw)
    x0 = images[:, None, None].expand_as(noise).reshape((-1,) + tuple(images.shape[1:]))
    eps = noise.reshape(x0.shape)
    t = ts[None, :, None].expand(q, nt, nd).reshape(-1)
    a = alphas[t][:, None, None, None]
    xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
    out = torch.empty(len(t))
    for lo in range(0, len(t), batch):
        hi = min(lo + batch, len(t))
        pred = model(xt[lo:hi].to(device), t[lo:hi].to(device)).float().cpu()
        out[lo:hi] = (pred - eps[lo:hi]).square().flatten(1).mean(1)
    return out.view(q, nt * nd).mean(1).double().numpy()
