"""Training images, held-out real queries and the random subsets the LDS models are trained on."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from nda_ann.corpus.store import uint8_to_float

from .config import LdsConfig

__all__ = ["Dataset", "load_dataset", "sample_subsets", "quantize"]


@dataclass
class Dataset:
    """train (N, C, H, W) and heldout (Q_h, C, H, W) float32 in [-1, 1], with provenance strings."""

    train: torch.Tensor
    heldout: torch.Tensor
    train_sources: list[str]
    heldout_sources: list[str]


def load_dataset(config: LdsConfig) -> Dataset:
    """Real photo crops (nda_ann.corpus.demo_corpus; training and held-out crops never share pixels), or
    the ``train``/``heldout`` uint8 (N, H, W, C) arrays of an .npz file (e.g. a CIFAR-2 export)."""
    if config.corpus == "photos":
        from nda_ann.corpus.demo_corpus import demo_corpus

        dc = demo_corpus(config.n_train, config.n_heldout, size=config.size, seed=config.data_seed)
        return Dataset(uint8_to_float(dc.train), uint8_to_float(dc.queries), dc.train_sources, dc.query_sources)
    path = Path(config.corpus)
    if not path.is_file():
        raise FileNotFoundError(f"corpus {config.corpus!r} is neither 'photos' nor an existing .npz file")
    with np.load(path) as npz:
        missing = {"train", "heldout"} - set(npz.files)
        if missing:
            raise ValueError(f"{path}: the .npz needs uint8 arrays 'train' and 'heldout' (N, H, W, C); missing {sorted(missing)}")
        train, heldout = npz["train"], npz["heldout"]
    for name, arr, need in (("train", train, config.n_train), ("heldout", heldout, config.n_heldout)):
        if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[1:3] != (config.size, config.size):
            raise ValueError(f"{path}: '{name}' must be uint8 (N, {config.size}, {config.size}, C), got {arr.dtype} {arr.shape}")
        if len(arr) < need:
            raise ValueError(f"{path}: '{name}' holds {len(arr)} images, the configuration asks for {need}")
    return Dataset(
        uint8_to_float(train[: config.n_train]), uint8_to_float(heldout[: config.n_heldout]),
        [f"{path.name}:train[{i}]" for i in range(config.n_train)],
        [f"{path.name}:heldout[{i}]" for i in range(config.n_heldout)],
    )


def sample_subsets(n: int, count: int, fraction: float, seed: int) -> np.ndarray:
    """(count, n) bool masks, each selecting round(fraction * n) images uniformly without replacement.

    Subset j depends only on (seed, j), so asking for more subsets keeps the first ones (and their
    trained models) unchanged.
    """
    size = int(round(fraction * n))
    if not 0 < size < n:
        raise ValueError(f"a {fraction} subset of {n} images would hold {size}; need between 1 and {n - 1}")
    masks = np.zeros((count, n), dtype=bool)
    for j in range(count):
        masks[j, np.random.default_rng([seed, j]).choice(n, size=size, replace=False)] = True
    return masks


def quantize(images: torch.Tensor) -> torch.Tensor:
    """Clamp to [-1, 1] and round to the uint8 grid u / 127.5 - 1, as a stored image would be."""
    u = torch.round((images.clamp(-1, 1) + 1) * 127.5)
    return u / 127.5 - 1
