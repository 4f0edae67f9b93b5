"""Validation and conversion of images handed to the scorers."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from .errors import InputError
from .store import Store, uint8_to_float


class CorpusView:
    """Uniform chunked access to a corpus given as a Store or a (N, C, H, W) float tensor in [-1, 1]."""

    def __init__(self, corpus: Store | torch.Tensor | np.ndarray):
        if isinstance(corpus, Store):
            self.store: Store | None = corpus
            self.tensor: torch.Tensor | None = None
            self.count = len(corpus)
            self.shape = (corpus.channels, corpus.resolution, corpus.resolution)
        else:
            t = as_float_images(corpus, "corpus")
            self.store, self.tensor = None, t
            self.count = t.shape[0]
            self.shape = tuple(t.shape[1:])
        if self.count == 0:
            raise InputError(None, "the corpus is empty")

    def rows(self, lo: int, hi: int) -> torch.Tensor:
        """(hi - lo, C, H, W) float32 images of rows [lo, hi)."""
        if self.store is not None:
            return self.store.tensor(slice(lo, hi))
        return self.tensor[lo:hi].to(torch.float32)

    def take(self, ids: Sequence[int] | np.ndarray) -> torch.Tensor:
        """(len(ids), C, H, W) float32 images of the given rows."""
        if self.store is not None:
            return self.store.tensor(np.asarray(ids, dtype=np.int64))
        return self.tensor[torch.as_tensor(np.asarray(ids, dtype=np.int64))].to(torch.float32)


def as_float_images(images: torch.Tensor | np.ndarray, what: str = "images") -> torch.Tensor:
    """Check and convert (B, C, H, W) floats in [-1, 1] (or (B, H, W, C) uint8) to a float tensor."""
    if isinstance(images, np.ndarray) and images.dtype == np.uint8:
        if images.ndim != 4:
            raise InputError(None, f"{what}: uint8 arrays must be (B, H, W, C), got shape {images.shape}")
        return uint8_to_float(images)
    t = torch.as_tensor(images)
    if t.ndim != 4:
        raise InputError(None, f"{what}: expected a (B, C, H, W) array, got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise InputError(None, f"{what}: expected floats in [-1, 1], got dtype {t.dtype}")
    if not torch.isfinite(t).all():
        bad = int((~torch.isfinite(t)).flatten(1).any(1).nonzero()[0])
        raise InputError(None, f"{what}: image {bad} contains NaN or Inf")
    if t.shape[2] != t.shape[3]:
        raise InputError(None, f"{what}: images must be square, got {t.shape[2]}x{t.shape[3]}")
    return t


def check_compatible(queries: torch.Tensor, shape: tuple[int, ...], where: str = "corpus") -> None:
    """Queries (Q, C, H, W) must match the corpus' (C, H, W)."""
    if tuple(queries.shape[1:]) != tuple(shape):
        c, h, w = shape
        raise InputError(
            None,
            f"queries are {tuple(queries.shape[1:])} (C, H, W) but the {where} holds {c}x{h}x{w} images; "
            f"resize queries to {h}x{w} with {c} channel(s)",
        )
