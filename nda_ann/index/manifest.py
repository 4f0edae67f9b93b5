"""The index folder: its layout, its manifest.json, and the checks made when it is opened.

Layout of an index folder::

    manifest.json                      what was built, from which stores, with which approximations
    scale-7/trained/class-000.faiss    empty trained template of every layout class (used by `add`)
    scale-7/shard-000/class-000.faiss  one sub-index per layout class, images [first, first + n)
    scale-7/shard-000/shard.json       the shard's checkpoint: image range, ntotal, file sizes
    scale-14f2/...                     one folder per scale

The folder is published atomically; `add` writes new shard folders, then replaces manifest.json
atomically, so a reader sees the old or the new version.
"""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch

from .. import __version__
from ..errors import IndexError_
from ..scoring.scales import Scale
from .layout_ids import ClassLayout, class_layouts

INDEX_FORMAT = "nda-ann-index"
INDEX_SCHEMA_VERSION = 1
MANIFEST_FILE = "manifest.json"
SHARD_FILE = "shard.json"
TRAINED_DIR = "trained"
INDEXES_ENV = "NDA_ANN_INDEXES"
ID_SPACE = ("global id = image * width + j, width = indexed positions per image of the layout class; "
            "FAISS label in a shard = id - first_image * width; position = indexed[j]")


def scale_dir(scale: Scale) -> str:
    """Folder name of a scale: scale-7, scale-14f2."""
    return f"scale-{scale.patch}" if scale.factor == 1 else f"scale-{scale.patch}f{scale.factor}"


def class_file(index: int) -> str:
    return f"class-{index:03d}.faiss"


def shard_dir(shard: int) -> str:
    return f"shard-{shard:03d}"


def default_root() -> Path:
    """Where bare index names land: $NDA_ANN_INDEXES, else ./indexes."""
    return Path(os.environ.get(INDEXES_ENV, "indexes"))


def resolve_index_path(path: str | Path) -> Path:
    """A bare name (no folder part, e.g. ``cifar2-p7``) means ``indexes/<name>``; a path with a folder
    part (``./name``, ``out/name``, absolute) is used as given.

    The result always keeps a folder part (``./name`` becomes ``<cwd>/name``, as ``Path`` would drop
    the ``./``), so resolving it again gives the same folder.
    """
    text = str(path)
    if not text or text in (".", ".."):
        raise IndexError_(text, "not a usable index name")
    given = os.sep in text or "/" in text or Path(text).is_absolute()
    resolved = Path(text) if given else default_root() / text
    return Path.cwd() / resolved if resolved.parent == Path(".") else resolved


def versions() -> dict[str, str]:
    return {"nda_ann": __version__, "faiss": faiss.__version__, "torch": torch.__version__,
            "numpy": np.__version__, "python": platform.python_version()}


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def store_entry(store_path: Path, index_path: Path, fingerprint: str, count: int, offset: int) -> dict[str, Any]:
    """A member store: absolute path, path relative to the index folder, and its image-id offset."""
    absolute = Path(store_path).resolve()
    try:
        relative = os.path.relpath(absolute, Path(index_path).resolve())
    except ValueError:  # other drive on Windows
        relative = str(absolute)
    return {"path": str(absolute), "path_relative": relative, "fingerprint": fingerprint,
            "count": int(count), "offset": int(offset)}


def read_manifest(path: Path) -> dict[str, Any]:
    """Read and check the format and schema version of an index folder's manifest."""
    path = Path(path)
    mpath = path / MANIFEST_FILE
    if not path.is_dir():
        raise IndexError_(path, "no such index folder (build one with `nda-ann build STORE INDEX --scale 7`)")
    if not mpath.is_file():
        hint = " (an interrupted build keeps its progress in a hidden .building folder: rerun the same build to resume)"
        raise IndexError_(path, "not an index: manifest.json is missing" + hint)
    try:
        manifest = json.loads(mpath.read_text())
    except (OSError, ValueError) as err:
        raise IndexError_(mpath, f"unreadable manifest: {err}") from err
    if manifest.get("format") != INDEX_FORMAT:
        raise IndexError_(path, f"not an nda-ann index (format {manifest.get('format')!r})")
    if manifest.get("schema_version") != INDEX_SCHEMA_VERSION:
        raise IndexError_(path, f"index schema version {manifest.get('schema_version')} but this nda-ann reads "
                                f"version {INDEX_SCHEMA_VERSION}; rebuild it with `nda-ann build ... --overwrite`")
    return manifest


def check_files(path: Path, manifest: dict[str, Any]) -> None:
    """Every file the manifest names is present with its recorded size; class layouts match."""
    fix = "rebuild with `nda-ann build STORE INDEX ... --overwrite` (or rerun the `add` that made the shard)"
    for entry in manifest["scales"]:
        scale = Scale(entry["patch"], entry["factor"])
        layouts = class_layouts(manifest["resolution"], scale, entry["candidate_stride"], entry.get("index_classes", "all"))
        if [c.width for c in layouts] != [c["indexed"] for c in entry["classes"]]:
            raise IndexError_(path, f"scale {scale}: layout classes differ from this nda-ann's; {fix}")
        sdir = path / entry["dir"]
        expected: dict[Path, int] = {sdir / TRAINED_DIR / k: v for k, v in entry["templates"].items()}
        for shard in entry["shards"]:
            for name, size in shard["files"].items():
                expected[sdir / shard["dir"] / name] = size
        if manifest.get("thumbnails"):
            expected[path / manifest["thumbnails"]["file"]] = manifest["thumbnails"]["bytes"]
        for fpath, size in expected.items():
            actual = fpath.stat().st_size if fpath.exists() else -1
            if actual == -1:
                raise IndexError_(fpath, f"missing index file; {fix}")
            if actual != size:
                raise IndexError_(fpath, f"holds {actual} bytes, the manifest says {size}: truncated or replaced; {fix}")


def layouts_of(manifest: dict[str, Any], entry: dict[str, Any]) -> list[ClassLayout]:
    """The class layouts of one scale entry of a manifest."""
    return class_layouts(manifest["resolution"], Scale(entry["patch"], entry["factor"]), entry["candidate_stride"],
                         entry.get("index_classes", "all"))
