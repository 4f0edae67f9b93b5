"""Train the DDPM (eps-prediction, Ho et al. 2020 eq. 14) on a subset, save it atomically, sample with DDIM."""
from __future__ import annotations

import logging
import math
import os
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nda_ann.scoring.schedule import NoiseSchedule

from .config import LdsConfig
from .unet import UNet, UNetConfig

__all__ = ["build_model", "train_model", "save_checkpoint", "load_checkpoint", "ddim_sample"]

log = logging.getLogger("tools.lds.train")


def build_model(config: LdsConfig, channels: int) -> UNet:
    return UNet(UNetConfig(channels=channels, base=config.unet_base, mults=tuple(config.unet_mults), blocks=config.unet_blocks))


def _lr_at(step: int, config: LdsConfig) -> float:
    """Linear warm-up, then cosine decay to zero (so the final weights are not a noisy SGD iterate)."""
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    progress = (step - config.warmup) / max(1, config.steps - config.warmup)
    return config.lr * 0.5 * (1 + math.cos(math.pi * progress))


def train_model(images: torch.Tensor, config: LdsConfig, model_index: int, device: torch.device) -> tuple[UNet, dict[str, Any]]:
    """Train a fresh U-Net on ``images`` (n, C, H, W) in [-1, 1] for ``config.steps`` steps.

    ``model_index`` (-1 for the full model, j for subset j) seeds the run unless
    ``config.shared_seed``: then every model starts from the same weights and draws the same
    stream of timesteps and noise, so models differ only through their data.
    Returns the model (eval mode, on ``device``) and a record of the run.
    """
    seed = config.train_seed if config.shared_seed else config.train_seed * 100003 + model_index + 1
    torch.manual_seed(seed)
    model = build_model(config, images.shape[1]).to(device)
    gen = torch.Generator("cpu").manual_seed(seed)
    alphas = NoiseSchedule(config.schedule).alphas_cumprod().to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    data = images.to(device)
    n = data.shape[0]
    order = torch.randperm(n, generator=gen)
    cursor = 0
    start = time.time()
    losses = []
    model.train()
    for step in range(config.steps):
        if cursor + config.batch > n:  # new epoch
            order, cursor = torch.randperm(n, generator=gen), 0
        take = order[cursor : cursor + config.batch] if config.batch <= n else torch.randint(n, (config.batch,), generator=gen)
        cursor += config.batch
        x0 = data[take.to(device)]
        t = torch.randint(len(alphas), (x0.shape[0],), generator=gen)
        eps = torch.randn(x0.shape, generator=gen).to(device)
        a = alphas[t.to(device)][:, None, None, None]
        xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
        loss = (model(xt, t.to(device)) - eps).square().mean()
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, config)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    model.eval()
    tail = losses[-max(1, len(losses) // 10):]
    record = {
        "model_index": model_index,
        "train_images": n,
        "seed": seed,
        "steps": config.steps,
        "final_train_loss": float(np.mean(tail)) if tail else float("nan"),
        "seconds": time.time() - start,
        "params": sum(p.numel() for p in model.parameters()),
    }
    return model, record


def save_checkpoint(path: Path, model: UNet, record: dict[str, Any], subset: np.ndarray | None) -> None:
    """torch.save to a hidden temporary file in the same folder, then os.replace (atomic)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    payload = {
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "unet": model.config.to_dict(),
        "record": record,
        "subset": None if subset is None else np.flatnonzero(subset).tolist(),
    }
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def load_checkpoint(path: Path, config: LdsConfig, channels: int, subset: np.ndarray | None, device: torch.device) -> tuple[UNet, dict[str, Any]]:
    """Rebuild a saved model; the stored subset must be the one expected, else the file is stale."""
    payload = torch.load(path, map_location="cpu", weights_only=False)
    expected = None if subset is None else np.flatnonzero(subset).tolist()
    if payload.get("subset") != expected:
        raise ValueError(f"{path} was trained on a different subset than this configuration draws; delete it to retrain")
    model = build_model(config, channels)
    if model.config.to_dict() != payload["unet"]:
        raise ValueError(f"{path} holds a U-Net {payload['unet']}, the configuration builds {model.config.to_dict()}")
    model.load_state_dict(payload["state_dict"])
    return model.to(device).eval(), payload["record"]


@torch.no_grad()
def ddim_sample(model: UNet, count: int, shape: tuple[int, int, int], config: LdsConfig, device: torch.device) -> torch.Tensor:
    """Deterministic DDIM (eta = 0; Song et al. 2021 eq. 12) from seeded Gaussian noise.

    Returns (count, C, H, W) float32 on the CPU, clamped to [-1, 1]. Noise is drawn on the CPU from
    ``config.sample_seed`` so the samples do not depend on the device's generator.
    """
    alphas = NoiseSchedule(config.schedule).alphas_cumprod().double()
    steps = np.unique(np.round(np.linspace(len(alphas) - 1, 0, config.ddim_steps)).astype(np.int64))[::-1]
    x = torch.randn((count,) + tuple(shape), generator=torch.Generator("cpu").manual_seed(config.sample_seed)).to(device)
    for i, t in enumerate(steps):
        a_t = float(alphas[t])
        a_prev = float(alphas[steps[i + 1]]) if i + 1 < len(steps) else 1.0
        eps = model(x, torch.full((count,), int(t), device=device, dtype=torch.long))
        x0 = ((x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)).clamp(-1, 1)
        eps = (x - math.sqrt(a_t) * x0) / math.sqrt(1 - a_t)  # consistent with the clamped x0
        x = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps
    return x.clamp(-1, 1).float().cpu()
