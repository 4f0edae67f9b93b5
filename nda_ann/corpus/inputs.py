"""Validation and conversion of images handed to the scorers."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..errors import InputError
from .store import Store, uint8_to_float


class CorpusView:
    """Uniform access to a corpus: a Store (or a store folder's path), several Stores (rows numbered
    in order), or a (N, C, H, W) float tensor in [-1, 1]. Global image id = row in that concatenation."""

    def __init__(self, corpus: Store | str | Path | Sequence[Store | str | Path] | torch.Tensor | np.ndarray):
        if isinstance(corpus, (str, Path)):
            corpus = Store.open(corpus)
        if isinstance(corpus, (list, tuple)) and corpus and all(isinstance(s, (str, Path, Store)) for s in corpus):
            corpus = [s if isinstance(s, Store) else Store.open(s) for s in corpus]
        if isinstance(corpus, Store):
            corpus = [corpus]
        if isinstance(corpus, (list, tuple)) and all(isinstance(s, Store) for s in corpus):
            self.stores: list[Store] = list(corpus)
            self.tensor: torch.Tensor | None = None
            shapes = {(s.channels, s.resolution, s.resolution) for s in self.stores}
            if len(shapes) != 1:
                raise InputError(None, f"stores of different image shapes cannot be combined: {sorted(shapes)}")
            self.shape = shapes.pop()
            self.offsets = np.cumsum([0] + [len(s) for s in self.stores])
            self.count = int(self.offsets[-1])
        else:
            t = as_float_images(corpus, "corpus")
            self.stores, self.tensor = [], t
            self.count = t.shape[0]
            self.shape = tuple(t.shape[1:])
        if self.count == 0:
            raise InputError(None, "the corpus is empty")

    def rows(self, lo: int, hi: int) -> torch.Tensor:
        """(hi - lo, C, H, W) float32 images of rows [lo, hi)."""
        if self.tensor is not None:
            return self.tensor[lo:hi].to(torch.float32)
        return self.take(np.arange(lo, hi))

    def pixels(self, ids: Sequence[int] | np.ndarray) -> np.ndarray | None:
        """(n, H, W, C) uint8 pixels of global ids (n,), in that order (None for a float tensor corpus)."""
        if self.tensor is not None:
            return None
        ids = np.asarray(ids, dtype=np.int64)
        out = np.empty((len(ids), self.shape[1], self.shape[2], self.shape[0]), dtype=np.uint8)
        which = np.searchsorted(self.offsets, ids, side="right") - 1
        for k, store in enumerate(self.stores):
            sel = np.nonzero(which == k)[0]
            if len(sel):
                local = ids[sel] - self.offsets[k]
                order = np.argsort(local, kind="stable")  # sorted reads are kinder to the page cache
                out[sel[order]] = store.images[local[order]]
        return out

    def images_on(self, ids: Sequence[int] | np.ndarray, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """(n, C, H, W) images of ids in [-1, 1] on ``device`` in ``dtype``. To a GPU the uint8 pixels
        travel (a quarter of float32's bytes) and are converted there."""
        if device.type == "cpu" or self.tensor is not None:
            return self.take(ids).to(device, dtype)
        u8 = torch.from_numpy(self.pixels(ids)).to(device, non_blocking=True)
        return u8.permute(0, 3, 1, 2).to(dtype) / 127.5 - 1.0

    def take(self, ids: Sequence[int] | np.ndarray) -> torch.Tensor:
        """(len(ids), C, H, W) float32 images of the given global ids, in that order."""
        ids = np.asarray(ids, dtype=np.int64)
        if self.tensor is not None:
            return self.tensor[torch.as_tensor(ids)].to(torch.float32)
        if len(self.stores) == 1:
            return self.stores[0].tensor(ids)
        out = torch.empty((len(ids),) + tuple(self.shape), dtype=torch.float32)
        which = np.searchsorted(self.offsets, ids, side="right") - 1
        for k, store in enumerate(self.stores):
            sel = np.nonzero(which == k)[0]
            if len(sel):
                out[torch.as_tensor(sel)] = store.tensor(ids[sel] - self.offsets[k])
        return out

    def patch_vectors(self, ids: np.ndarray, positions: np.ndarray, scale) -> torch.Tensor:
        """(E, D) float32 patch vectors of images ``ids`` (E,) at flat grid ``positions`` (E,),
        equal to ``extract_patches`` of those images at those positions; reads only their pixels
        (from the uint8 store, out-of-image pixels zero)."""
        ids, positions = np.asarray(ids, dtype=np.int64), np.asarray(positions, dtype=np.int64)
        c, size = self.shape[0], self.shape[1]
        p, r, f = scale.patch, scale.pad, scale.factor
        g = scale.grid(size)
        offs = np.arange(p)
        rows = (positions // g)[:, None] - r + offs[None]  # (E, p) image rows of the patch
        cols = (positions % g)[:, None] - r + offs[None]
        inside = ((rows >= 0) & (rows < size))[:, :, None] & ((cols >= 0) & (cols < size))[:, None, :]  # (E, p, p)
        rc, cc = np.clip(rows, 0, size - 1), np.clip(cols, 0, size - 1)
        if self.tensor is not None:
            t = self.tensor.to(torch.float32)
            vals = t[torch.from_numpy(ids)[:, None, None, None], torch.arange(c)[None, :, None, None],
                     torch.from_numpy(rc)[:, None, :, None], torch.from_numpy(cc)[:, None, None, :]]  # (E, C, p, p)
        else:
            raw = np.empty((len(ids), p, p, c), dtype=np.uint8)
            which = np.searchsorted(self.offsets, ids, side="right") - 1
            for k, store in enumerate(self.stores):
                sel = np.nonzero(which == k)[0]
                if len(sel):
                    local = ids[sel] - self.offsets[k]
                    raw[sel] = store.images[local[:, None, None], rc[sel][:, :, None], cc[sel][:, None, :]]
            vals = uint8_to_float(raw)  # (E, C, p, p)
        vals = vals * torch.from_numpy(inside)[:, None]
        if f > 1:
            m = p // f
            vals = vals.reshape(len(ids), c, m, f, m, f).sum((3, 5)) / f
        return vals.reshape(len(ids), -1)

    def sources(self) -> list[str]:
        """Source name of every image (``tensor[i]`` for a tensor corpus)."""
        if self.tensor is not None:
            return [f"tensor[{i}]" for i in range(self.count)]
        return [src for store in self.stores for src in store.sources()]


RANGE_TOLERANCE = 0.01  # floats may pass [-1, 1] by this much (rounding in a model's output)


def as_float_images(images: torch.Tensor | np.ndarray, what: str = "images") -> torch.Tensor:
    """Check and convert (B, C, H, W) floats in [-1, 1] (or (B, H, W, C) uint8) to a float tensor.

    Refused, with a message saying the expected layout and range: another number of dimensions,
    integers other than uint8, NaN or Inf, values outside [-1, 1] (beyond ``RANGE_TOLERANCE``, e.g.
    images in [0, 255]), non-square images, and channels-last floats (B, H, W, C).
    """
    if isinstance(images, np.ndarray) and images.dtype == np.uint8:
        if images.ndim != 4:
            raise InputError(None, f"{what}: uint8 arrays must be (B, H, W, C), got shape {images.shape}")
        return uint8_to_float(images)
    t = torch.as_tensor(images)
    layout = "(B, C, H, W) floats in [-1, 1]"
    if t.ndim != 4:
        raise InputError(None, f"{what}: expected {layout}, got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise InputError(None, f"{what}: expected {layout} (or uint8 (B, H, W, C)), got dtype {t.dtype}")
    if not torch.isfinite(t).all():
        bad = int((~torch.isfinite(t)).flatten(1).any(1).nonzero()[0])
        raise InputError(None, f"{what}: image {bad} contains NaN or Inf")
    _check_range(t, what, layout)
    if t.shape[2] != t.shape[3]:
        b, c, h, w = t.shape
        if w in (1, 3) and c == h and c not in (1, 3):
            raise InputError(None, f"{what}: expected {layout}, got shape {tuple(t.shape)}, which looks like channels-last "
                                   f"(B, H, W, C); permute it, e.g. x.permute(0, 3, 1, 2)")
        raise InputError(None, f"{what}: expected square images as {layout}, got H x W = {h}x{w} in shape {tuple(t.shape)}")
    return t


def _check_range(t: torch.Tensor, what: str, layout: str) -> None:
    """Values outside [-1, 1] beyond the tolerance are refused, naming the first image and its range."""
    if t.numel() == 0:
        return
    lo, hi = t.flatten(1).amin(1), t.flatten(1).amax(1)  # (B,) per image
    bad = ((lo < -1 - RANGE_TOLERANCE) | (hi > 1 + RANGE_TOLERANCE)).nonzero()
    if len(bad):
        i = int(bad[0])
        hint = " (images in [0, 255]? divide by 127.5 and subtract 1)" if float(hi.max()) > 2 else ""
        raise InputError(None, f"{what}: expected {layout}, image {i} has values in [{float(lo[i]):.4g}, {float(hi[i]):.4g}]{hint}")


def check_compatible(queries: torch.Tensor, shape: tuple[int, ...], where: str = "corpus") -> None:
    """Queries (Q, C, H, W) must match the corpus' (C, H, W)."""
    if tuple(queries.shape[1:]) != tuple(shape):
        c, h, w = shape
        raise InputError(
            None,
            f"queries are {tuple(queries.shape[1:])} (C, H, W) but the {where} holds {c}x{h}x{w} images; "
            f"resize queries to {h}x{w} with {c} channel(s)",
        )
