"""Which shard actor holds which shards and which images' store rows (pure; no Ray needed).

The image ids are cut into contiguous ranges, one per actor, at shard boundaries of the scale with
the most shards, balanced by image count. An actor owns the store rows of its range and, at every
scale, the shards whose first image falls in it. Each actor's shards are thus contiguous in shard
order, so concatenating the actors' merged top-k in actor order and merging again gives exactly
what ``PatchIndex`` gives over all shards (a stable sort by distance, ties in shard order).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import InputError


@dataclass(frozen=True)
class Placement:
    """``bounds`` (A + 1,): actor a owns images [bounds[a], bounds[a + 1]); ``shards[a]``: {scale: shard ids}."""

    bounds: tuple[int, ...]
    shards: tuple[dict[str, list[int]], ...]

    @property
    def actors(self) -> int:
        return len(self.shards)

    def owner(self, ids: np.ndarray) -> np.ndarray:
        """(n,) actor index owning each global image id (ids must be in [0, count))."""
        return np.searchsorted(np.asarray(self.bounds[1:-1], dtype=np.int64), np.asarray(ids, dtype=np.int64), side="right")

    def label(self, a: int) -> str:
        held = "; ".join(f"scale {s}: shards {ids}" for s, ids in self.shards[a].items() if ids)
        return f"shard actor {a} (images [{self.bounds[a]}, {self.bounds[a + 1]}), {held or 'no shards'})"


def place(manifest: dict[str, Any], actors: int) -> Placement:
    """Cut the index of ``manifest`` into at most ``actors`` actors (fewer when it has fewer shards)."""
    if int(actors) < 1:
        raise InputError(None, f"the number of shard actors must be >= 1, got {actors}")
    count = int(manifest["count"])
    ref = max(manifest["scales"], key=lambda e: len(e["shards"]))["shards"]
    firsts = np.array([s["first_image"] for s in ref], dtype=np.int64)
    n = min(int(actors), len(ref))
    # cut before the reference shard whose first image is nearest each multiple of count / n
    cuts = sorted({int(np.abs(firsts - count * a / n).argmin()) for a in range(1, n)} - {0})
    bounds = (0, *[int(firsts[c]) for c in cuts], count)
    owned: list[dict[str, list[int]]] = [{e["scale"]: [] for e in manifest["scales"]} for _ in range(len(bounds) - 1)]
    inner = np.asarray(bounds[1:-1], dtype=np.int64)
    for entry in manifest["scales"]:
        for shard in entry["shards"]:
            a = int(np.searchsorted(inner, shard["first_image"], side="right"))
            owned[a][entry["scale"]].append(int(shard["id"]))
    return Placement(tuple(bounds), tuple(owned))
