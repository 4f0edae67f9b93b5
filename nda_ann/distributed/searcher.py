"""RaySearcher: ``PatchIndex.search`` fanned out to shard actors and merged to the global top-k.

It has the methods of ``PatchIndex`` that ``Attributor`` uses (``search``, ``distances_exact``,
``coarse_grid``, ``count``, ``scales``, ``manifest``); everything but ``search`` is read from the
index's manifest on the coordinator, which never loads a sub-index.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..errors import InputError
from ..index.search import PatchIndex
from ..scoring.scales import Scale, ScaleLike
from .pool import ActorPool


def merge_topk(parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Merge partial results (dist, image, position), each (Q, L, k_i), into the k nearest per query
    patch: a stable sort by distance of their concatenation in the given order (as ``PatchIndex``
    merges its shards). Returns three new (Q, L, min(k, sum k_i)) arrays."""
    if len(parts) == 1:
        return tuple(np.array(a) for a in parts[0])  # type: ignore[return-value]
    dist, image, position = (np.concatenate([p[i] for p in parts], axis=-1) for i in range(3))
    order = np.argsort(dist, axis=-1, kind="stable")[..., :k]
    return (np.take_along_axis(dist, order, -1), np.take_along_axis(image, order, -1),
            np.take_along_axis(position, order, -1))


class RaySearcher:
    """Searches an index through the shard actors of ``pool``; ``index`` is the coordinator's
    ``PatchIndex`` of the same folder (manifest, layouts; its shards are not searched here)."""

    def __init__(self, index: PatchIndex, pool: ActorPool):
        self.index = index
        self.pool = pool
        self.manifest = index.manifest
        self.scales = index.scales
        self.count = index.count
        self.path = index.path

    def __repr__(self) -> str:
        return f"RaySearcher({str(self.path)!r}, images={self.count}, actors={self.pool.placement.actors})"

    @property
    def coarse_grid(self) -> bool:
        return self.index.coarse_grid

    def distances_exact(self, scale: ScaleLike) -> bool:
        return self.index.distances_exact(scale)

    def thumbnails(self) -> np.ndarray | None:
        return self.index.thumbnails()

    def search(self, scale: ScaleLike, vectors: np.ndarray | torch.Tensor, k: int,
               nprobe: int | None = None) -> tuple[Any, Any, Any]:
        """As ``PatchIndex.search``: vectors (L, D) or (Q, L, D) float32 -> (dist, image, position),
        each (..., L, k'), equal to a search of the whole index on one machine."""
        sc = Scale.parse(scale)
        if sc not in self.scales:
            raise InputError(None, f"scale {sc} is not in the index {self.path} (it has {[str(s) for s in self.scales]})")
        as_torch = isinstance(vectors, torch.Tensor)
        x = vectors.detach().to("cpu", torch.float32).numpy() if as_torch else np.asarray(vectors, dtype=np.float32)
        squeeze = x.ndim == 2
        x = np.ascontiguousarray(x[None] if squeeze else x)
        entry = next(e for e in self.manifest["scales"] if e["scale"] == str(sc))
        if x.ndim != 3 or x.shape[1:] != (entry["grid"] ** 2, entry["dim"]):
            raise InputError(None, f"scale {sc}: expected query vectors (L, D) or (Q, L, D) with L = {entry['grid'] ** 2}, "
                                   f"D = {entry['dim']}, got {tuple(np.shape(vectors))}")
        parts = self.pool.search(str(sc), x, int(k), nprobe)
        dist, image, position = merge_topk(parts, parts[0][0].shape[-1])
        if squeeze:
            dist, image, position = dist[0], image[0], position[0]
        if as_torch:
            return torch.from_numpy(dist), torch.from_numpy(image), torch.from_numpy(position)
        return dist, image, position

    def close(self) -> None:
        """Stop the shard actors."""
        self.pool.close()
