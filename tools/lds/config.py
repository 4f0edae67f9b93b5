"""Settings of one LDS evaluation: a typed, frozen record saved as config.json next to its results.

Named configurations:

- ``cpu-small`` (default): 256 real 16x16 photo crops, 20 random 50% subsets, a 0.26M-parameter
  U-Net trained 1,500 steps per model; 24 generated + 24 held-out queries. About 35 minutes on
  two idle CPU cores, 60-70 minutes when other jobs share them (measured: 61 min, load 5-9).
- ``gpu-cifar``: a CIFAR-sized setting, 5,000 32x32 images, 64 subsets, a ~6M-parameter U-Net;
  sized for one GPU (hours), not run on a CPU.
- ``toy``: 8x8 images, 3 subsets, a few training steps; for the tests (seconds).

Every field that changes a number in the results lives here (and therefore in config.json and in
the results folder's fingerprint); run-time choices that do not (threads, device, progress bars)
are arguments of ``run.py``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["LdsConfig", "CONFIGS", "get_config", "apply_overrides"]


@dataclass(frozen=True)
class LdsConfig:
    name: str
    # data --------------------------------------------------------------------------------
    size: int = 16  # image side
    n_train: int = 256
    n_heldout: int = 24  # held-out real queries
    n_generated: int = 24  # queries sampled from the full model
    data_seed: int = 0
    corpus: str = "photos"  # "photos" (nda_ann.corpus.demo_corpus) or a path to an .npz with uint8 'train' and 'heldout'
    # subsets -----------------------------------------------------------------------------
    n_subsets: int = 20
    subset_fraction: float = 0.5
    subset_seed: int = 0
    # model and training --------------------------------------------------------------------
    unet_base: int = 16
    unet_mults: tuple[int, ...] = (1, 2, 2)
    unet_blocks: int = 1
    steps: int = 1500
    batch: int = 64
    lr: float = 2e-3
    warmup: int = 100
    weight_decay: float = 0.0
    train_seed: int = 0
    shared_seed: bool = True  # every model starts from the same init and draws the same t/noise stream
    schedule: str = "linear"
    # generated queries -------------------------------------------------------------------
    ddim_steps: int = 50
    sample_seed: int = 1
    # measured loss -----------------------------------------------------------------------
    loss_timesteps: int = 20  # evenly spaced over the schedule: (k + 0.5) * steps / loss_timesteps
    loss_draws: int = 4  # fixed noise draws per query and timestep
    loss_seed: int = 2
    # exact NDA ---------------------------------------------------------------------------
    nda_default_t: int = 100
    nda_default_scale: str = "5"
    nda_two_scale: tuple[str, ...] = ("5+8:2", "7+6:2")  # "A+B": alpha = 0.5 fusion of two scales
    nda_sweep_t: tuple[int, ...] = (10, 25, 50, 100, 200, 400)
    nda_sweep_p: tuple[int, ...] = (3, 5, 7, 9)
    nda_topk: int | None = 25  # the paper's 100 of 1,024 positions, scaled to 16x16
    nda_noise_draws: int = 1
    nda_seed: int = 0
    # index NDA (Attributor + TorchFlatSearch, default k and M) ------------------------------
    index_k: int = 1024
    index_candidates: tuple[int, ...] = (200, 26)  # M = 200 (the default when the figures were measured), and M = N / 10
    # baselines ---------------------------------------------------------------------------
    trak: bool = True
    trak_dim: int = 256
    trak_timesteps: int = 10
    trak_reg: float = 1e-2  # lambda, relative to the mean eigenvalue of Phi^T Phi
    trak_seed: int = 3
    random_seed: int = 4
    # evaluation --------------------------------------------------------------------------
    bootstrap: int = 2000
    bootstrap_seed: int = 5

    def fingerprint(self) -> str:
        """12 hex digits identifying every setting (the results folder is checked against it)."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LdsConfig":
        kwargs = {}
        for f in dataclasses.fields(cls):
            if f.name in data:
                v = data[f.name]
                kwargs[f.name] = tuple(v) if isinstance(v, list) else v
        return cls(**kwargs)

    def validate(self) -> "LdsConfig":
        if self.size % (2 ** (len(self.unet_mults) - 1)):
            raise ValueError(f"size {self.size} must be divisible by 2^{len(self.unet_mults) - 1} for the U-Net")
        if not 0 < self.subset_fraction < 1:
            raise ValueError(f"subset_fraction must lie in (0, 1), got {self.subset_fraction}")
        if self.n_subsets < 2:
            raise ValueError(f"Spearman over subsets needs at least 2 subsets, got {self.n_subsets}")
        if self.n_heldout + self.n_generated < 1:
            raise ValueError("at least one query is needed")
        if max(self.nda_sweep_p + (0,)) > self.size:
            raise ValueError(f"patch sizes {self.nda_sweep_p} exceed the {self.size}x{self.size} images")
        return self


CONFIGS: dict[str, LdsConfig] = {
    "cpu-small": LdsConfig(name="cpu-small"),
    "gpu-cifar": LdsConfig(
        name="gpu-cifar",
        size=32,
        n_train=5000,
        n_heldout=100,
        n_generated=100,
        n_subsets=64,
        unet_base=64,
        unet_mults=(1, 2, 2),
        unet_blocks=2,
        steps=20000,
        batch=128,
        lr=2e-4,
        warmup=500,
        loss_draws=8,
        loss_timesteps=50,
        nda_default_scale="7",
        nda_two_scale=("14+10:2",),
        nda_sweep_p=(3, 5, 7, 9, 11, 15),
        nda_topk=100,
        index_candidates=(200, 500),
        trak_dim=2048,
        trak_timesteps=10,
        bootstrap=2000,
    ),
    "toy": LdsConfig(
        name="toy",
        size=8,
        n_train=24,
        n_heldout=3,
        n_generated=3,
        n_subsets=3,
        unet_base=8,
        unet_mults=(1, 2),
        steps=6,
        batch=8,
        warmup=2,
        ddim_steps=4,
        loss_timesteps=4,
        loss_draws=1,
        nda_default_t=100,
        nda_default_scale="3",
        nda_two_scale=("3+4:2",),
        nda_sweep_t=(50, 100),
        nda_sweep_p=(3, 5),
        nda_topk=4,
        index_k=16,
        index_candidates=(12,),
        trak_dim=16,
        trak_timesteps=2,
        bootstrap=50,
    ),
}


def _convert(current: Any, text: str, name: str) -> Any:
    if isinstance(current, bool):
        if text.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"{name} takes true or false, got {text!r}")
        return text.lower() in ("true", "1")
    if isinstance(current, tuple):
        items = [s for s in text.split(",") if s.strip()]
        kind = type(current[0]) if current else str
        return tuple(kind(s.strip()) for s in items)
    if current is None:
        return None if text.lower() == "none" else int(text)
    if isinstance(current, int):
        return None if text.lower() == "none" else int(text)
    if isinstance(current, float):
        return float(text)
    return text


def apply_overrides(config: LdsConfig, overrides: list[str]) -> LdsConfig:
    """Apply ``KEY=VALUE`` strings (tuples comma-separated, ``none`` for optional ints)."""
    names = {f.name for f in dataclasses.fields(LdsConfig)}
    changes: dict[str, Any] = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in names or key == "name":
            raise ValueError(f"override {item!r}: write KEY=VALUE with KEY one of {', '.join(sorted(names - {'name'}))}")
        changes[key] = _convert(getattr(config, key), value.strip(), key)
    return dataclasses.replace(config, **changes).validate() if changes else config.validate()


def get_config(name: str, overrides: list[str] | tuple[str, ...] = ()) -> LdsConfig:
    if name not in CONFIGS:
        raise ValueError(f"unknown configuration {name!r}; choose one of {', '.join(CONFIGS)}")
    return apply_overrides(CONFIGS[name], list(overrides))
