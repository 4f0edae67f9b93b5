"""The shard actor: some shards of an index (memory-mapped) and the store rows of its image range.

A plain class; ``pool.ActorPool`` makes it a Ray actor (so this module imports without Ray). Its
searches are ``PatchIndex.search`` over its shards only (``PatchIndex.open(path, shards=...)``),
its pixels are the uint8 rows of the member stores, read from their memory maps.
"""
from __future__ import annotations

import os
import socket
import time
from typing import Any

import numpy as np

from ..corpus.store import Store
from ..errors import IndexError_, InputError
from ..index.search import PatchIndex


class ShardActor:
    """Serves ``search`` over ``shards`` ({scale: ids}) and ``pixels`` of images [lo, hi) of an index."""

    def __init__(self, index_path: str, shards: dict[str, list[int]], images: tuple[int, int]):
        self.index = PatchIndex.open(index_path, shards=shards)
        self.shards = {str(k): [int(i) for i in v] for k, v in shards.items()}
        self.lo, self.hi = int(images[0]), int(images[1])
        self.stores: dict[int, Store] = {}
        offsets = [int(s["offset"]) for s in self.index.manifest["stores"]]
        ends = offsets[1:] + [self.index.count]
        for k, (path, entry) in enumerate(zip(self.index.store_paths(), self.index.manifest["stores"])):
            if offsets[k] < self.hi and ends[k] > self.lo:  # a member store with rows in this range
                store = Store.open(path)
                if store.fingerprint != entry["fingerprint"]:
                    raise IndexError_(store.path, f"the store's pixels are not the ones indexed in {self.index.path}; "
                                                  "restore it or rebuild the index")
                self.stores[k] = store
        self.delay_s = 0.0

    def info(self) -> dict[str, Any]:
        """Where this actor runs and what it holds (also its readiness check)."""
        return {"pid": os.getpid(), "host": socket.gethostname(), "images": [self.lo, self.hi],
                "shards": self.shards}

    def set_delay(self, seconds: float) -> None:
        """Fault tests: every later call first sleeps ``seconds`` (a slow node)."""
        self.delay_s = float(seconds)

    def _wait(self) -> None:
        if self.delay_s:
            time.sleep(self.delay_s)

    def search(self, scale: str, vectors: np.ndarray, k: int, nprobe: int | None) -> tuple[np.ndarray, ...]:
        """``PatchIndex.search`` over this actor's shards: (dist, image, position), each (Q, L, k')."""
        self._wait()
        return self.index.search(scale, vectors, k, nprobe)

    def pixels(self, ids: np.ndarray) -> np.ndarray:
        """(n, H, W, C) uint8 pixels of global image ids (n,), all in this actor's range, in that order."""
        self._wait()
        ids = np.asarray(ids, dtype=np.int64)
        if len(ids) and (ids.min() < self.lo or ids.max() >= self.hi):
            raise InputError(None, f"image ids outside this actor's range [{self.lo}, {self.hi})")
        which, rows = self.index.locate(ids)
        r, c = self.index.resolution, self.index.channels
        out = np.empty((len(ids), r, r, c), dtype=np.uint8)
        for k in np.unique(which):
            sel = np.nonzero(which == k)[0]
            order = np.argsort(rows[sel], kind="stable")  # sorted reads are kinder to the page cache
            out[sel[order]] = self.stores[int(k)].images[rows[sel][order]]
        return out

    def sources(self) -> list[str]:
        """Source names of images [lo, hi), in id order."""
        out: list[str] = []
        for k, store in sorted(self.stores.items()):
            offset = int(self.index.manifest["stores"][k]["offset"])
            lo, hi = max(self.lo - offset, 0), min(self.hi - offset, len(store))
            out += store.records().column("source").slice(lo, hi - lo).to_pylist()
        return out
