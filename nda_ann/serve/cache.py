"""Recent requests' pictures, bounded in bytes: the queries as scored, the kept heatmaps, and the
PNGs rendered from them on demand (keyed by request id, query index and image id)."""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np


@dataclass
class RequestPictures:
    """One request's queries (Q, H, W, C) uint8 and heatmaps {(query, image_id): (H, W) float32}."""

    queries: np.ndarray
    maps: dict[tuple[int, int], np.ndarray]
    pngs: dict[tuple, bytes] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return int(self.queries.nbytes + sum(m.nbytes for m in self.maps.values()) + sum(len(p) for p in self.pngs.values()))


class PictureCache:
    """Thread-safe LRU of ``RequestPictures`` holding at most ``max_bytes`` (the newest entry is
    always kept, even when larger)."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, RequestPictures] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def put(self, request_id: str, pictures: RequestPictures) -> None:
        with self._lock:
            old = self._entries.pop(request_id, None)
            self._bytes -= old.nbytes if old else 0
            self._entries[request_id] = pictures
            self._bytes += pictures.nbytes
            self._evict()

    def get(self, request_id: str) -> RequestPictures | None:
        with self._lock:
            entry = self._entries.get(request_id)
            if entry is not None:
                self._entries.move_to_end(request_id)
            return entry

    def png(self, request_id: str, key: tuple, render) -> bytes | None:
        """The PNG ``key`` of a request, rendered once by ``render(pictures)`` and kept; None when
        the request is no longer held. ``render`` may raise KeyError (nothing to draw)."""
        entry = self.get(request_id)
        if entry is None:
            return None
        cached = entry.pngs.get(key)
        if cached is not None:
            return cached
        data = render(entry)  # outside the lock: rendering is the slow part
        with self._lock:
            if self._entries.get(request_id) is entry and key not in entry.pngs:
                entry.pngs[key] = data
                self._bytes += len(data)
                self._evict()
        return data

    def _evict(self) -> None:
        while self._bytes > self.max_bytes and len(self._entries) > 1:
            _, old = self._entries.popitem(last=False)
            self._bytes -= old.nbytes
