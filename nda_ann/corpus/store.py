"""The corpus store: N images of R x R x C uint8 in one memory-mapped file, plus a manifest.

Layout of a store folder::

    manifest.json    format, schema version, resolution, channels, count, transform, checksums, skips
    images.u8        raw uint8, shape (N, R, R, C), row-major
    images.parquet   row_id, source, orig_width, orig_height, and any kept metadata columns

A store is published atomically (see ``atomic.py``): it is complete or absent.
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from .. import __version__
from ..atomic import FolderIdentity, staging_dir, wait_for_folder, write_json_atomic
from ..errors import StoreError

STORE_FORMAT = "nda-ann-store"
STORE_SCHEMA_VERSION = 1
IMAGES_FILE = "images.u8"
RECORDS_FILE = "images.parquet"
MANIFEST_FILE = "manifest.json"


def uint8_to_float(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(n, H, W, C) uint8 -> (n, C, H, W) float32 in [-1, 1]: u / 127.5 - 1."""
    arr = np.ascontiguousarray(images)
    t = torch.from_numpy(arr if arr.flags.writeable else arr.copy())
    return t.permute(0, 3, 1, 2).to(torch.float32) / 127.5 - 1.0


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    """Hex sha256 of a file, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


class Store:
    """A read-only view of a store folder. ``images`` is a (N, R, R, C) uint8 memmap."""

    def __init__(self, path: Path, manifest: dict[str, Any], identity: FolderIdentity | None = None):
        self.path = Path(path)
        self.manifest = manifest
        self._identity = identity or FolderIdentity(self.path)  # the folder the manifest was read from
        self.resolution = int(manifest["resolution"])
        self.channels = int(manifest["channels"])
        self.count = int(manifest["count"])
        shape = (self.count, self.resolution, self.resolution, self.channels)
        if self.count:
            self.images = np.memmap(self.path / IMAGES_FILE, dtype=np.uint8, mode="r", shape=shape)
        else:
            self.images = np.zeros(shape, dtype=np.uint8)
        self._records: pa.Table | None = None

    @classmethod
    def open(cls, path: str | Path, verify: bool = False) -> "Store":
        """Open and check a store; ``verify`` also re-hashes the pixels against the manifest.

        A store replaced (``ingest --overwrite``) while it is being opened is opened again, so the
        manifest and the pixels always come from one version.
        """
        path = Path(path)
        for _ in range(3):
            if not wait_for_folder(path):
                raise StoreError(path, "no such store folder (make one with `nda-ann ingest SOURCE STORE`)")
            try:
                identity = FolderIdentity(path)
            except OSError:
                continue  # replaced between the check and the pin
            try:
                store = cls._open(path, identity, verify)
            except (StoreError, OSError):
                if identity.replaced():
                    continue  # read half from the version that was replaced: open the new one
                raise
            if not identity.replaced():
                return store
        raise StoreError(path, "the store kept being replaced while it was opened; try again")

    @classmethod
    def _open(cls, path: Path, identity: FolderIdentity, verify: bool) -> "Store":
        mpath = path / MANIFEST_FILE
        if not mpath.is_file():
            raise StoreError(path, "not a store: manifest.json is missing (an interrupted ingest never publishes one; run the ingest again)")
        try:
            manifest = json.loads(mpath.read_text())
        except (OSError, ValueError) as err:
            raise StoreError(mpath, f"unreadable manifest: {err}") from err
        if manifest.get("format") != STORE_FORMAT:
            raise StoreError(path, f"not an nda-ann store (format {manifest.get('format')!r})")
        if manifest.get("schema_version") != STORE_SCHEMA_VERSION:
            raise StoreError(
                path,
                f"store schema version {manifest.get('schema_version')} but this nda-ann reads "
                f"version {STORE_SCHEMA_VERSION}; re-ingest the source with this version",
            )
        expected = int(manifest["count"]) * int(manifest["resolution"]) ** 2 * int(manifest["channels"])
        ipath = path / IMAGES_FILE
        actual = ipath.stat().st_size if ipath.exists() else -1
        if actual != expected:
            raise StoreError(ipath, f"pixel file holds {actual} bytes, the manifest says {expected}: truncated or replaced; re-ingest")
        if not (path / RECORDS_FILE).is_file():
            raise StoreError(path / RECORDS_FILE, "missing records table; re-ingest")
        if verify and manifest.get("images_sha256") and sha256_file(ipath) != manifest["images_sha256"]:
            raise StoreError(ipath, "pixel checksum does not match the manifest: the file was modified; re-ingest")
        return cls(path, manifest, identity)

    def __len__(self) -> int:
        return self.count

    def __repr__(self) -> str:
        return f"Store({str(self.path)!r}, n={self.count}, {self.resolution}x{self.resolution}x{self.channels})"

    @property
    def fingerprint(self) -> str:
        """Identifies the pixels and their order (sha256 of images.u8 plus shape)."""
        return str(self.manifest["fingerprint"])

    def tensor(self, index: slice | Sequence[int] | np.ndarray | None = None) -> torch.Tensor:
        """Float images in [-1, 1]: (n, C, R, R) for a slice or an index array (all if None)."""
        if index is None:
            index = slice(0, self.count)
        if isinstance(index, slice):
            return uint8_to_float(self.images[index])
        idx = np.asarray(index, dtype=np.int64)
        order = np.argsort(idx, kind="stable")  # sorted reads are kinder to the page cache
        out = np.empty((len(idx),) + self.images.shape[1:], dtype=np.uint8)
        out[order] = self.images[idx[order]]
        return uint8_to_float(out)

    def batches(self, batch_size: int, start: int = 0, end: int | None = None) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield (first row, (n, C, R, R) float tensor) over rows [start, end)."""
        end = self.count if end is None else min(end, self.count)
        for lo in range(start, end, batch_size):
            yield lo, self.tensor(slice(lo, min(lo + batch_size, end)))

    def records(self) -> pa.Table:
        """The records table: row_id, source, orig_width, orig_height, kept metadata columns."""
        if self._records is None:
            replaced = StoreError(self.path, "the store was replaced (re-ingested) since it was opened; open it again")
            if self._identity.replaced():
                raise replaced
            try:
                records = pq.read_table(self.path / RECORDS_FILE)
            except OSError as err:
                raise (replaced if self._identity.replaced() else StoreError(self.path / RECORDS_FILE, f"unreadable records table: {err}")) from err
            if self._identity.replaced():  # the read may have come from the new version
                raise replaced
            self._records = records
        return self._records

    def sources(self) -> list[str]:
        """Source name of every row, in row order."""
        return self.records().column("source").to_pylist()


def write_store(
    path: str | Path,
    images: np.ndarray,
    sources: Sequence[str] | None = None,
    *,
    transform: dict[str, Any] | None = None,
    metadata: dict[str, Sequence[Any]] | None = None,
    overwrite: bool = False,
) -> Store:
    """Publish a store from an in-memory (N, R, R, C) uint8 array (tests, demo, small corpora).

    Large sources go through ``nda_ann.corpus.ingest``, which streams into the same format.
    """
    images = np.ascontiguousarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1] != images.shape[2] or images.shape[3] not in (1, 3):
        raise StoreError(path, f"expected a (N, R, R, C) uint8 array with C in (1, 3), got {images.dtype} {images.shape}")
    n, r, _, c = images.shape
    sources = list(sources) if sources is not None else [f"array[{i}]" for i in range(n)]
    if len(sources) != n:
        raise StoreError(path, f"{len(sources)} sources for {n} images")
    with staging_dir(Path(path), overwrite=overwrite) as stage:
        images.tofile(stage / IMAGES_FILE)
        cols: dict[str, Any] = {
            "row_id": pa.array(np.arange(n, dtype=np.int64)),
            "source": pa.array(sources, pa.string()),
            "orig_width": pa.array(np.full(n, r, dtype=np.int32)),
            "orig_height": pa.array(np.full(n, r, dtype=np.int32)),
        }
        for name, values in (metadata or {}).items():
            cols[name] = pa.array(list(values))
        pq.write_table(pa.table(cols), stage / RECORDS_FILE)
        write_json_atomic(stage / MANIFEST_FILE, make_manifest(stage, n, r, c, transform or {"kind": "array"}, []))
    return Store.open(path)


def make_manifest(folder: Path, count: int, resolution: int, channels: int, transform: dict[str, Any], skipped: list[dict[str, str]]) -> dict[str, Any]:
    """The manifest of a store whose images.u8 is already complete in ``folder``."""
    digest = sha256_file(folder / IMAGES_FILE)
    fingerprint = hashlib.sha256(f"{digest}:{count}:{resolution}:{channels}".encode()).hexdigest()[:32]
    return {
        "format": STORE_FORMAT,
        "schema_version": STORE_SCHEMA_VERSION,
        "count": count,
        "resolution": resolution,
        "channels": channels,
        "dtype": "uint8",
        "layout": "NHWC",
        "pixel_map": "u / 127.5 - 1",
        "images_sha256": digest,
        "fingerprint": fingerprint,
        "transform": transform,
        "skipped": skipped,
        "nda_ann_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
