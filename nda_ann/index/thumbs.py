"""The index's stored thumbnails: one (N, C * 8 * 8) float16 .npy, memory-mapped when serving.

The thumbnail search adds image-level candidates at larger t (docs/scores.md section 5); computing the
thumbnails of a million-image store on every open would read the whole store, so the build keeps
them next to the FAISS files. An add writes a new file (named by its image count) before the
manifest that names it is published, so a reader of the old manifest still finds the old file.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..corpus.inputs import CorpusView
from ..corpus.thumbnails import THUMB_SIDE, corpus_thumbnails


def thumbs_name(count: int) -> str:
    return f"thumbnails-{count}.npy"


def write_thumbs(folder: Path, thumbs: np.ndarray) -> dict[str, Any]:
    """Write ``thumbs`` (N, D) float16 atomically into ``folder``; its manifest entry."""
    path = folder / thumbs_name(len(thumbs))
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        np.save(fh, np.ascontiguousarray(thumbs, dtype=np.float16))
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return {"file": path.name, "bytes": path.stat().st_size, "side": THUMB_SIDE, "count": int(len(thumbs))}


def build_thumbs(folder: Path, stores: list) -> dict[str, Any]:
    """Thumbnails of every image of ``stores`` (in id order) written into ``folder``."""
    return write_thumbs(folder, corpus_thumbnails(CorpusView(stores)))


def append_thumbs(folder: Path, entry: dict[str, Any] | None, new_store, old_stores: Callable[[], list]) -> dict[str, Any]:
    """A new thumbnails file: the existing rows (recomputed from ``old_stores()`` only when the
    index has none yet) followed by those of ``new_store``."""
    old = np.load(folder / entry["file"], mmap_mode="r") if entry else corpus_thumbnails(CorpusView(old_stores()))
    return write_thumbs(folder, np.concatenate([old, corpus_thumbnails(CorpusView(new_store))]))


def prune_thumbs(folder: Path, keep: set[str]) -> None:
    """Delete thumbnails files of ``folder`` not named in ``keep``."""
    for path in folder.glob("thumbnails-*.npy"):
        if path.name not in keep:
            path.unlink(missing_ok=True)


def open_thumbs(folder: Path, entry: dict[str, Any] | None) -> np.ndarray | None:
    """(N, D) float16, memory-mapped; None when the index has no stored thumbnails."""
    return None if not entry else np.load(folder / entry["file"], mmap_mode="r")
