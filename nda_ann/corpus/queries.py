"""Query images in any form a user has them -> a float (Q, C, R, R) tensor in [-1, 1] plus names.

Accepted: image files, folders of images, a store folder, a Parquet file or folder, PIL images,
uint8 arrays ((H, W, C) or (Q, H, W, C)), float arrays or tensors ((C, H, W) or (Q, C, H, W)) in
[-1, 1]; or a list mixing these. Images go through the corpus transform (shorter side to R,
centre crop), so they are comparable with the training images.
"""
from __future__ import annotations

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


def _from_pil(img: Image.Image, shape: tuple[int, int, int]) -> torch.Tensor:
    c, r, _ = shape
    return uint8_to_float(to_array(img, r, c)[None])


def _from_path(path: Path, shape: tuple[int, int, int]) -> tuple[list[torch.Tensor], list[str]]:
    if not path.exists():
        raise InputError(path, "no such query file or folder")
    if path.is_dir() and (path / MANIFEST_FILE).is_file():
        store = Store.open(path)
        if (store.channels, store.resolution, store.resolution) != tuple(shape):
            raise InputError(path, f"query store holds {store.resolution}x{store.resolution}x{store.channels} images, the index {shape[1]}x{shape[2]}x{shape[0]}")
        return [store.tensor()], [f"{path.name}/{s}" for s in store.sources()]
    if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS:
        try:
            return [_from_pil(open_image(load(path), MAX_QUERY_PIXELS), shape)], [path.name]
        except DecodeError as err:
            raise InputError(path, str(err)) from None
    source = open_source(path)
    tensors, names = [], []
    for item in source.items():
        if item.error:
            raise InputError(item.origin, item.error)
        try:
            img = open_image(load(item.payload), MAX_QUERY_PIXELS)
        except DecodeError as err:
            raise InputError(item.origin, str(err)) from None
        tensors.append(_from_pil(img, shape))
        names.append(item.name)
    return tensors, names


def load_queries(images: Any, shape: tuple[int, int, int], names: Sequence[str] | None = None) -> tuple[torch.Tensor, list[str]]:
    """Convert ``images`` to ((Q, C, R, R) float32 in [-1, 1], Q names) for a corpus of ``shape`` (C, R, R)."""
    items = images if isinstance(images, (list, tuple)) else [images]
    tensors: list[torch.Tensor] = []
    out_names: list[str] = []
    for item in items:
        if isinstance(item, (str, Path)):
            t, n = _from_path(Path(item), shape)
            tensors += t
            out_names += n
            continue
        if isinstance(item, Image.Image):
            tensors.append(_from_pil(item, shape))
        elif isinstance(item, np.ndarray) and item.dtype == np.uint8:
            arr = item[None] if item.ndim in (2, 3) else item
            if arr.ndim == 3:
                arr = arr[..., None]
            if arr.ndim != 4:
                raise InputError(None, f"uint8 query arrays must be (H, W, C) or (Q, H, W, C), got {item.shape}")
            if arr.shape[1:] == (shape[1], shape[2], shape[0]):
                tensors.append(uint8_to_float(arr))
            else:
                tensors += [_from_pil(Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a), shape) for a in arr]
        else:
            t = torch.as_tensor(item)
            tensors.append(as_float_images(t[None] if t.ndim == 3 else t, "queries").to(torch.float32))
        first = len(out_names)
        out_names += [f"query{first + i}" for i in range(tensors[-1].shape[0])]
    if not tensors:
        raise InputError(None, "no query images given")
    queries = torch.cat(tensors)
    if names is not None:
        if len(names) != len(queries):
            raise InputError(None, f"{len(names)} names for {len(queries)} queries")
        out_names = list(names)
    return queries, out_names
