"""The attribution service behind the server: one opened index, one worker thread, recent pictures.

Framework-free: ``app.py`` maps HTTP onto it. ``attribute`` runs on the worker thread only (the
Attributor is not thread-safe); ``info``, the PNG renderers and ``training_png`` are safe from
any thread (they read the memory-mapped store and the picture cache).
"""
from __future__ import annotations

import logging
import time
import uuid
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..attribution.attributor import Attributor
from ..corpus.queries import load_queries
from ..index.manifest import read_manifest, resolve_index_path
from ..results.overlay import heatmap_png, png_bytes
from .cache import PictureCache, RequestPictures
from .config import ServeConfig
from .uploads import QueryParams
from .warm import warm_files
from .worker import SerialWorker

log = logging.getLogger("nda_ann.serve")


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(n, C, H, W) floats in [-1, 1] -> (n, H, W, C) uint8."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def heatmap_url(request_id: str, q: int, image_id: int) -> str:
    return f"/heatmap/{request_id}/{q}/{image_id}.png"


class AttributionService:
    """Opens ``index`` once (memory-mapped; with ``config.warm`` its files and stores are read into
    the page cache and one query is run) and answers attribution requests."""

    def __init__(self, index: str | Path, config: ServeConfig | None = None, device: str = "auto"):
        self.config = config or ServeConfig()
        self.index_path = resolve_index_path(index).resolve()
        t0 = time.perf_counter()
        self.attributor = Attributor.open(self.index_path, device=device)
        self.manifest = read_manifest(self.index_path)
        self.corpus = self.attributor.corpus
        self.open_seconds = time.perf_counter() - t0
        self.warm_bytes, self.warm_seconds = 0, 0.0
        if self.config.warm:
            self.warm()
        self.worker = SerialWorker(self.config.queue_size)
        self.cache = PictureCache(self.config.cache_bytes)
        self.started = time.time()
        self.requests = 0
        self._training_png = lru_cache(maxsize=1024)(self._render_training)

    def warm(self) -> None:
        """Read the index and store files once, then run one query (thumbnails, first pages)."""
        stores = [Path(s.path) for s in self.corpus.stores]
        self.warm_bytes, self.warm_seconds = warm_files([self.index_path, *stores])
        t0 = time.perf_counter()
        self.attributor.attribute(self.corpus.take([0]), list(self.config.default_timesteps), maps=1, **self.config.attribute_kwargs)
        log.info("warmed %d bytes in %.1f s; first query %.2f s", self.warm_bytes, self.warm_seconds, time.perf_counter() - t0)

    def info(self) -> dict[str, Any]:
        """The manifest summary: what the index holds and what the server accepts."""
        m, c = self.manifest, self.config
        return {
            "index": str(self.index_path),
            "index_id": m.get("index_id"),
            "images": m["count"],
            "resolution": m["resolution"],
            "channels": m["channels"],
            "scales": [s["scale"] for s in m["scales"]],
            "stores": [{"path": str(getattr(s, "path", "")), "images": len(s)} for s in self.corpus.stores],
            "created": m.get("created"),
            "versions": m.get("versions"),
            "opened_seconds": round(self.open_seconds, 3),
            "warmed_bytes": self.warm_bytes,
            "limits": {"max_files": c.max_files, "max_file_bytes": c.max_file_bytes, "max_pixels": c.max_pixels,
                       "max_timesteps": c.max_timesteps, "max_top": c.max_top, "queue_size": c.queue_size},
            "defaults": {"timesteps": list(c.default_timesteps), "top": c.default_top, **c.attribute_kwargs},
        }

    def health(self) -> dict[str, Any]:
        return {"status": "ok", "busy": self.worker.busy, "waiting": self.worker.waiting, "queue_size": self.worker.queue_size,
                "requests": self.requests, "uptime_s": round(time.time() - self.started, 1)}

    def attribute(self, images: list, names: list[str], params: QueryParams) -> dict[str, Any]:
        """Attribute decoded images (PIL) on the calling thread (the worker); the JSON answer."""
        t0 = time.perf_counter()
        queries, names = load_queries(images, self.corpus.shape, names=names)
        res = self.attributor.attribute(queries, params.timesteps, topk=params.topk, candidates=params.candidates,
                                        maps=params.top, names=names, **self.config.attribute_kwargs)
        request_id = uuid.uuid4().hex[:16]
        maps: dict[tuple[int, int], np.ndarray] = {}
        answers = [self._answer(res, q, request_id, params.top, maps) for q in range(len(names))]
        self.cache.put(request_id, RequestPictures(to_uint8(queries), maps))
        self.requests += 1
        return {"request": request_id, "queries": answers, "settings": res.settings, "index": str(self.index_path),
                "index_id": self.manifest.get("index_id"), "images": self.corpus.count, "seconds": round(time.perf_counter() - t0, 4)}

    def _answer(self, res, q: int, request_id: str, top: int, maps: dict) -> dict[str, Any]:
        """One query's part of the answer; its heatmaps go into ``maps``."""
        best, heatmaps = [], {}
        for rank, (i, score, src) in enumerate(res.top(q, top), start=1):
            try:
                maps[(q, i)] = np.asarray(res.heatmap(q, i), dtype=np.float32)
                heatmaps[str(i)] = heatmap_url(request_id, q, i)
            except KeyError:
                pass
            best.append({"rank": rank, "image_id": i, "source": src, "score": score, "image": f"/image/{i}.png",
                         "heatmap": heatmaps.get(str(i))})
        out = res.outside_mass
        detail = None if out is None else {f"t={t}": {sc: float(out[ti, q, si]) for si, sc in enumerate(res.scale_names)} for ti, t in enumerate(res.timesteps)}
        return {"name": res.query_names[q], "timesteps": list(res.timesteps), "top": best,
                "outside_mass": None if out is None else float(np.mean(out[:, q])), "outside_mass_detail": detail,
                "candidates": res.query_rounds(q) or None,  # per timestep: M, outside share, seconds (and within_budget)
                "heatmaps": heatmaps, "query_image": f"/query/{request_id}/{q}.png"}

    def heatmap_png(self, request_id: str, q: int, image_id: int) -> bytes | None:
        """The heatmap PNG of one proponent of one query of a recent request (None: not held)."""
        def render(p: RequestPictures) -> bytes:
            return heatmap_png(p.queries[q], p.maps[(q, image_id)])
        try:
            return self.cache.png(request_id, ("heat", q, image_id), render)
        except (KeyError, IndexError):
            return None

    def query_png(self, request_id: str, q: int) -> bytes | None:
        """A query of a recent request as scored (after the corpus transform), as PNG (None: not held)."""
        if not 0 <= q:
            return None
        try:
            return self.cache.png(request_id, ("query", q), lambda p: png_bytes(p.queries[q]))
        except IndexError:
            return None

    def training_png(self, image_id: int) -> bytes | None:
        """Training image ``image_id`` as PNG (None: no such image)."""
        if not 0 <= image_id < self.corpus.count:
            return None
        return self._training_png(int(image_id))

    def _render_training(self, image_id: int) -> bytes:
        return png_bytes(to_uint8(self.corpus.take([image_id]))[0])

    def close(self) -> None:
        self.worker.close()
