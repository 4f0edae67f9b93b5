"""RemoteCorpus: a CorpusView whose pixels live in the shard actors.

Its one remote primitive is ``pixels(ids)``: uint8 rows by global image id, fetched from the actors
that own them. ``take`` (hence ``rows``) and ``patch_vectors`` are derived from it here, by the
same arithmetic as a local ``CorpusView``, so their results are identical. ``sources`` asks the
actors for their records. ``stores`` opens the member stores on the coordinator, lazily, for what
needs every pixel locally (the exact scorer of ``compare``); it is never used for a query.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..corpus.inputs import CorpusView
from ..corpus.store import Store, uint8_to_float
from ..errors import StoreError
from .pool import ActorPool


class RemoteCorpus(CorpusView):
    """The images of an index's member stores, served by ``pool``'s actors; ids as in the index."""

    def __init__(self, pool: ActorPool, manifest: dict[str, Any], store_paths: Sequence[Path]):
        # no CorpusView.__init__: it opens the stores, which the coordinator may not reach
        self.pool = pool
        self.tensor = None
        self.shape = (int(manifest["channels"]), int(manifest["resolution"]), int(manifest["resolution"]))
        self.count = int(manifest["count"])
        self.offsets = np.array([int(s["offset"]) for s in manifest["stores"]] + [self.count], dtype=np.int64)
        self._store_paths = list(store_paths)
        self._stores: list[Store] | None = None

    @property
    def stores(self) -> list[Store]:  # type: ignore[override]
        """The member stores opened on this machine (for the exact scorer); a StoreError when unreachable."""
        if self._stores is None:
            missing = [p for p in self._store_paths if not Path(p).exists()]
            if missing:
                raise StoreError(missing[0], "not reachable from the coordinator; with the Ray engine queries need no "
                                             "local store, but the exact scorer (compare) reads every pixel locally")
            self._stores = [Store.open(p) for p in self._store_paths]
        return self._stores

    def pixels(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """(n, H, W, C) uint8 pixels of global ids (n,), in that order: the one remote primitive."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if len(ids) == 0:
            return np.empty((0, self.shape[1], self.shape[2], self.shape[0]), dtype=np.uint8)
        if ids.min() < 0 or ids.max() >= self.count:
            raise IndexError(f"image ids must be in [0, {self.count}), got {ids.min()}..{ids.max()}")
        return self.pool.pixels(ids)

    def take(self, ids: Sequence[int] | np.ndarray) -> torch.Tensor:
        """(len(ids), C, H, W) float32 images in [-1, 1] of global ids, in that order."""
        return uint8_to_float(self.pixels(ids))

    def patch_vectors(self, ids: np.ndarray, positions: np.ndarray, scale) -> torch.Tensor:
        """(E, D) float32 patch vectors of images ``ids`` (E,) at flat grid ``positions`` (E,), equal to
        a local CorpusView's: each distinct image's pixels are fetched once, then cut locally."""
        ids = np.asarray(ids, dtype=np.int64)
        if len(ids) == 0:
            return torch.zeros((0, self.shape[0] * (scale.patch // scale.factor) ** 2), dtype=torch.float32)
        uniq, inverse = np.unique(ids, return_inverse=True)
        return CorpusView(self.take(uniq)).patch_vectors(inverse.reshape(-1), positions, scale)

    def sources(self) -> list[str]:
        """Source name of every image, from the actors' records."""
        return self.pool.sources()
