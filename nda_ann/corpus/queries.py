"""Query images in any form a user has them -> a float (Q, C, R, R) tensor in [-1, 1] plus names.

Accepted: image files, folders of images, a store folder, a Parquet file or folder, PIL images,
uint8 arrays ((H, W, C) or (Q, H, W, C)), float arrays or tensors ((C, H, W) or (Q, C, H, W)) in
[-1, 1]; or a list mixing these. Images go through the corpus transform (shorter side to R,
centre crop), so they are comparable with the training images. An image of another size than
R x R is resized that way with a warning and recorded (``QueryBatch.resized``), or refused with
``allow_resize=False``; float tensors are never resized (``check_compatible`` refuses them).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from ..errors import InputError
from .inputs import as_float_images
from .sources import IMAGE_EXTENSIONS, DecodeError, load, open_image, open_source
from .store import MANIFEST_FILE, Store, uint8_to_float
from .transform import to_array

MAX_QUERY_PIXELS = 1 << 28
log = logging.getLogger("nda_ann.corpus.queries")


@dataclass
class QueryBatch:
    """Loaded queries: ``images`` (Q, C, R, R) float32 in [-1, 1], their Q ``names``, and ``resized``,
    one record {"query": name, "size": [W, H], "resized_to": [R, R]} per query of another size that
    went through the corpus transform (for summary.json)."""

    images: torch.Tensor
    names: list[str]
    resized: list[dict[str, Any]] = field(default_factory=list)


class _Collector:
    """Accumulates tensors, names and resize records while the inputs are read."""

    def __init__(self, shape: tuple[int, int, int], allow_resize: bool):
        self.shape, self.allow_resize = shape, allow_resize
        self.tensors: list[torch.Tensor] = []
        self.names: list[str] = []
        self.resized: list[dict[str, Any]] = []
        self.resized_rows: list[int] = []  # the query row of each record

    def pil(self, img: Image.Image, name: str, where: str | Path | None = None) -> None:
        """One PIL image through the corpus transform (shorter side to R, centre crop)."""
        c, r, _ = self.shape
        if img.size != (r, r):
            if not self.allow_resize:
                raise InputError(where, f"query {name} is {img.size[0]}x{img.size[1]} but the corpus holds {r}x{r} images; "
                                        f"resize it, or allow resizing (--resize, allow_resize=True)")
            self.resized.append({"query": name, "size": [int(img.size[0]), int(img.size[1])], "resized_to": [r, r]})
            self.resized_rows.append(len(self.names))
        self.tensors.append(uint8_to_float(to_array(img, r, c)[None]))
        self.names.append(name)

    def tensor(self, t: torch.Tensor, names: Sequence[str]) -> None:
        self.tensors.append(t)
        self.names += list(names)

    def path(self, path: Path) -> None:
        """A file, a folder of images, a store folder or a Parquet source."""
        if not path.exists():
            raise InputError(path, "no such query file or folder")
        if path.is_dir() and (path / MANIFEST_FILE).is_file():
            store = Store.open(path)
            if (store.channels, store.resolution, store.resolution) != tuple(self.shape):
                raise InputError(path, f"query store holds {store.resolution}x{store.resolution}x{store.channels} images, "
                                       f"the index {self.shape[1]}x{self.shape[2]}x{self.shape[0]}")
            return self.tensor(store.tensor(), [f"{path.name}/{s}" for s in store.sources()])
        if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS:
            try:
                img = open_image(load(path), MAX_QUERY_PIXELS)
            except DecodeError as err:
                raise InputError(path, str(err)) from None
            return self.pil(img, path.name, path)
        for item in open_source(path).items():
            if item.error:
                raise InputError(item.origin, item.error)
            try:
                img = open_image(load(item.payload), MAX_QUERY_PIXELS)
            except DecodeError as err:
                raise InputError(item.origin, str(err)) from None
            self.pil(img, item.name, item.origin)

    def uint8(self, item: np.ndarray) -> None:
        """(H, W), (H, W, C) or (Q, H, W, C) uint8; arrays of another size go through the transform."""
        arr = item[None] if item.ndim in (2, 3) else item
        if arr.ndim == 3:
            arr = arr[..., None]
        if arr.ndim != 4:
            raise InputError(None, f"uint8 query arrays must be (H, W, C) or (Q, H, W, C), got {item.shape}")
        first = len(self.names)
        if arr.shape[1:] == (self.shape[1], self.shape[2], self.shape[0]):
            return self.tensor(uint8_to_float(arr), [f"query{first + i}" for i in range(len(arr))])
        for i, a in enumerate(arr):
            self.pil(Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a), f"query{first + i}")


def load_query_batch(images: Any, shape: tuple[int, int, int], names: Sequence[str] | None = None, *,
                     allow_resize: bool = True) -> QueryBatch:
    """Convert ``images`` for a corpus of ``shape`` (C, R, R): a QueryBatch of (Q, C, R, R) float32.

    Queries of another size are resized like the training images were at ingest, with one
    logged warning naming them, and listed in ``resized``; ``allow_resize=False`` refuses them.
    """
    items = images if isinstance(images, (list, tuple)) else [images]
    got = _Collector(tuple(shape), allow_resize)
    for item in items:
        if isinstance(item, (str, Path)):
            got.path(Path(item))
        elif isinstance(item, Image.Image):
            got.pil(item, f"query{len(got.names)}")
        elif isinstance(item, np.ndarray) and item.dtype == np.uint8:
            got.uint8(item)
        else:
            t = torch.as_tensor(item)
            t = as_float_images(t[None] if t.ndim == 3 else t, "queries").to(torch.float32)
            got.tensor(t, [f"query{len(got.names) + i}" for i in range(t.shape[0])])
    if not got.tensors:
        raise InputError(None, "no query images given")
    queries = torch.cat(got.tensors)
    out_names = got.names
    if names is not None:
        if len(names) != len(queries):
            raise InputError(None, f"{len(names)} names for {len(queries)} queries")
        for rec, row in zip(got.resized, got.resized_rows):
            rec["query"] = names[row]
        out_names = list(names)
    if got.resized:
        shown = ", ".join(f"{r['query']} ({r['size'][0]}x{r['size'][1]})" for r in got.resized[:3])
        more = f" and {len(got.resized) - 3} more" if len(got.resized) > 3 else ""
        log.warning("%d quer%s of another size than the corpus' %dx%d resized like the training images "
                    "(shorter side, centre crop): %s%s; --no-resize (allow_resize=False) refuses them",
                    len(got.resized), "y" if len(got.resized) == 1 else "ies", shape[1], shape[2], shown, more)
    return QueryBatch(queries, out_names, got.resized)


def load_queries(images: Any, shape: tuple[int, int, int], names: Sequence[str] | None = None, *,
                 allow_resize: bool = True) -> tuple[torch.Tensor, list[str]]:
    """``load_query_batch`` as ((Q, C, R, R) float32 in [-1, 1], Q names)."""
    batch = load_query_batch(images, shape, names, allow_resize=allow_resize)
    return batch.images, batch.names
