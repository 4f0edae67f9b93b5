"""Corpus readers: an image folder, Parquet files, or a .npy array, streamed in a fixed order.

A reader lists its inputs once (cheaply: paths, Parquet footers, the .npy header) and then yields
``Item``s from any start position, so an interrupted ingest can continue where it stopped. An item
carries an undecoded payload -- a file path, encoded image bytes, or an (H, W[, C]) uint8 array --
so decoding can run in worker processes; ``load`` and ``open_image`` do that part.

Order: folder files by relative POSIX path; Parquet files by relative path, rows in file order;
.npy rows in index order. Hidden files and folders (name starting with '.') are not read.
"""
from __future__ import annotations

import hashlib
import io
import os
import re
import warnings
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Union

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import InputError

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".webp", ".bmp", ".dib", ".tif", ".tiff", ".gif"})
RESERVED_COLUMNS = frozenset({"row_id", "source", "orig_width", "orig_height", "content_hash"})
AUTO_IMAGE_COLUMNS = ("image", "img")
PARQUET_READ_ROWS = 512

Payload = Union[Path, bytes, np.ndarray, None]


@dataclass(frozen=True)
class Item:
    """One input: ``name`` is recorded as its source, ``origin`` names it in errors."""

    name: str
    origin: str
    payload: Payload
    metadata: dict[str, Any] = field(default_factory=dict)
    error: str | None = None  # a problem found before decoding, e.g. a null cell


class DecodeError(Exception):
    """An input that cannot be decoded; the message is the recorded reason."""


def _walk(root: Path) -> Iterator[Path]:
    """Every non-hidden file under ``root``, recursively (order not defined)."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if not name.startswith("."):
                yield Path(dirpath) / name


def _file_line(root: Path, path: Path, extra: str = "") -> str:
    st = path.stat()
    return f"{path.relative_to(root).as_posix()}\t{st.st_size}\t{st.st_mtime_ns}\t{extra}\n"


class FolderSource:
    """Image files under a folder, recursively, by extension (case-insensitive)."""

    kind = "folder"

    def __init__(self, path: Path, listing: Iterable[Path] | None = None):
        self.path = Path(path)
        files, ignored = [], Counter()
        for p in _walk(self.path) if listing is None else listing:
            ext = p.suffix.lower()
            if ext in IMAGE_EXTENSIONS:
                files.append(p.relative_to(self.path).as_posix())
            else:
                ignored[ext or "(none)"] += 1
        if not files:
            other = f"; {sum(ignored.values())} other files ignored ({', '.join(sorted(ignored))})" if ignored else ""
            raise InputError(self.path, f"no image files found (looked recursively for {', '.join(sorted(IMAGE_EXTENSIONS))}){other}")
        self.files = sorted(files)
        self.ignored = dict(sorted(ignored.items()))
        self.count = len(self.files)
        self.metadata_schema = pa.schema([])

    def signature(self) -> dict[str, Any]:
        """Identifies the file list, sizes and modification times (for resuming)."""
        h = hashlib.sha256()
        for rel in self.files:
            h.update(_file_line(self.path, self.path / rel).encode())
        return {"kind": self.kind, "path": str(self.path.resolve()), "count": self.count, "listing_sha256": h.hexdigest()}

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "path": str(self.path.resolve()), "inputs": self.count, "ignored_files": self.ignored}

    def items(self, start: int = 0) -> Iterator[Item]:
        for rel in self.files[start:]:
            path = self.path / rel
            yield Item(rel, str(path), path)


def _is_image_type(t: pa.DataType) -> bool:
    if pa.types.is_binary(t) or pa.types.is_large_binary(t):
        return True
    if pa.types.is_struct(t):
        idx = t.get_field_index("bytes")
        return idx >= 0 and (pa.types.is_binary(t.field(idx).type) or pa.types.is_large_binary(t.field(idx).type))
    return False


def _is_scalar_type(t: pa.DataType) -> bool:
    return not (pa.types.is_nested(t) or pa.types.is_binary(t) or pa.types.is_large_binary(t)
                or pa.types.is_fixed_size_binary(t) or pa.types.is_null(t))


def _value_type(t: pa.DataType) -> pa.DataType:
    return t.value_type if pa.types.is_dictionary(t) else t


class ParquetSource:
    """Rows of one Parquet file or of every ``*.parquet`` under a folder.

    The image is a binary column or a struct {bytes, path} (as Hugging Face ``datasets`` writes
    it); null cells are skipped. Scalar columns are kept as metadata (a name that collides with a
    store column gets a ``meta_`` prefix; a struct's ``path`` is kept as ``image_path``).
    """

    kind = "parquet"

    def __init__(self, path: Path, image_column: str | None = None, source_column: str | None = None):
        self.path = Path(path)
        if self.path.is_dir():
            self.root = self.path
            files = sorted((p for p in _walk(self.path) if p.suffix.lower() == ".parquet"), key=lambda p: p.relative_to(self.path).as_posix())
        else:
            self.root = self.path.parent
            files = [self.path]
        if not files:
            raise InputError(self.path, "no .parquet files found")
        self.files = files
        self.rows: list[int] = []
        self.image_column: str = ""
        self.source_column = source_column
        self.has_path = False
        self.kept: list[tuple[str, str, pa.DataType]] = []  # (column, stored name, type); image_path aside
        self.dropped: list[str] = []
        for i, f in enumerate(files):
            try:
                pf = pq.ParquetFile(f)
            except Exception as err:
                raise InputError(f, f"not a readable Parquet file: {err}") from err
            if i == 0:
                self._choose_columns(f, pf.schema_arrow, image_column)
            else:
                self._check_columns(f, pf.schema_arrow)
            self.rows.append(pf.metadata.num_rows)
        self.count = sum(self.rows)
        if self.count == 0:
            raise InputError(self.path, "the Parquet source has no rows")
        fields = [pa.field(stored, t) for _, stored, t in self.kept]
        self.metadata_schema = pa.schema(([pa.field("image_path", pa.string())] if self.has_path else []) + fields)

    def _choose_columns(self, f: Path, schema: pa.Schema, image_column: str | None) -> None:
        names = schema.names
        if image_column is None:
            auto = [c for c in AUTO_IMAGE_COLUMNS if c in names] or [c for c in names if _is_image_type(schema.field(c).type)]
            if not auto:
                raise InputError(f, f"no image column found (looked for 'image', 'img', or a binary or struct{{bytes, path}} column; columns: {names}); pass --image-column")
            image_column = auto[0]
        self.image_column = image_column
        self._check_columns(f, schema, first=True)
        image_type = schema.field(image_column).type
        self.has_path = pa.types.is_struct(image_type) and image_type.get_field_index("path") >= 0
        taken = set(RESERVED_COLUMNS)
        if self.has_path:
            taken.add("image_path")
        for c in names:
            t = _value_type(schema.field(c).type)
            if c in (image_column, self.source_column):
                continue
            if not _is_scalar_type(t):
                self.dropped.append(c)
                continue
            stored = c
            while stored in taken:
                stored = f"meta_{stored}"
            taken.add(stored)
            self.kept.append((c, stored, t))

    def _check_columns(self, f: Path, schema: pa.Schema, first: bool = False) -> None:
        names = schema.names
        for role, col in (("image", self.image_column), ("source", self.source_column)):
            if col is not None and col not in names:
                raise InputError(f, f"{role} column {col!r} not found; columns: {names}")
        t = schema.field(self.image_column).type
        if not _is_image_type(t):
            raise InputError(f, f"column {self.image_column!r} has type {t}; an image column must be binary or struct{{bytes: binary, path: string}}")
        if self.source_column is not None:
            st = _value_type(schema.field(self.source_column).type)
            if not _is_scalar_type(st):
                raise InputError(f, f"source column {self.source_column!r} has type {st}; it must be a string or number")
        if first:
            return
        for col, _, want in self.kept:
            if col not in names:
                raise InputError(f, f"column {col!r} (present in {self.files[0]}) is missing; all Parquet files must share the schema")
            got = _value_type(schema.field(col).type)
            if got != want:
                raise InputError(f, f"column {col!r} has type {got} here but {want} in {self.files[0]}")

    def _rel(self, f: Path) -> str:
        return f.relative_to(self.root).as_posix()

    def signature(self) -> dict[str, Any]:
        h = hashlib.sha256()
        for f, n in zip(self.files, self.rows):
            h.update(_file_line(self.root, f, str(n)).encode())
        return {
            "kind": self.kind, "path": str(self.path.resolve()), "count": self.count, "listing_sha256": h.hexdigest(),
            "image_column": self.image_column, "source_column": self.source_column,
            "kept": [[c, s, str(t)] for c, s, t in self.kept],
        }

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind, "path": str(self.path.resolve()), "inputs": self.count, "files": len(self.files),
            "image_column": self.image_column, "source_column": self.source_column,
            "kept_columns": {c: s for c, s, _ in self.kept}, "image_path_kept": self.has_path, "dropped_columns": self.dropped,
        }

    def items(self, start: int = 0) -> Iterator[Item]:
        offset = 0
        for f, n in zip(self.files, self.rows):
            if start < offset + n:
                yield from self._file_items(f, max(0, start - offset))
            offset += n

    def _file_items(self, f: Path, start: int) -> Iterator[Item]:
        pf = pq.ParquetFile(f)
        first_group, row = 0, 0
        while first_group < pf.num_row_groups and row + pf.metadata.row_group(first_group).num_rows <= start:
            row += pf.metadata.row_group(first_group).num_rows
            first_group += 1
        columns = [self.image_column] + [c for c, _, _ in self.kept]
        if self.source_column is not None:
            columns.append(self.source_column)
        rel = self._rel(f)
        batches = pf.iter_batches(batch_size=PARQUET_READ_ROWS, row_groups=list(range(first_group, pf.num_row_groups)), columns=list(dict.fromkeys(columns)))
        for batch in batches:
            k = batch.num_rows
            if row + k <= start:
                row += k
                continue
            yield from self._batch_items(batch, f, rel, row, max(0, start - row))
            row += k

    def _batch_items(self, batch: pa.RecordBatch, f: Path, rel: str, row0: int, skip: int) -> Iterator[Item]:
        image = batch.column(self.image_column)
        paths = None
        if pa.types.is_struct(image.type):
            children = dict(zip((f.name for f in image.type), image.flatten()))  # offset- and null-aware
            data = children["bytes"].to_pylist()
            if self.has_path:
                paths = children["path"].to_pylist()
        else:
            data = image.to_pylist()
        meta_cols = {stored: batch.column(c).to_pylist() for c, stored, _ in self.kept}
        names = batch.column(self.source_column).to_pylist() if self.source_column is not None else None
        for i in range(skip, batch.num_rows):
            row = row0 + i
            meta = {"image_path": paths[i]} if paths is not None else {}
            meta.update((stored, values[i]) for stored, values in meta_cols.items())
            name = str(names[i]) if names is not None and names[i] is not None else f"{rel}#{row}"
            origin = f"{f}#row {row}"
            if data[i] is None:
                yield Item(name, origin, None, meta, error=f"null image in column {self.image_column!r}")
            else:
                yield Item(name, origin, data[i], meta)


class NpySource:
    """An (N, H, W, C) uint8 array (C in 1, 3, 4; 4 = RGBA) or (N, H, W) grayscale, memory-mapped."""

    kind = "npy"

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            arr = np.load(self.path, mmap_mode="r", allow_pickle=False)
        except Exception as err:
            raise InputError(self.path, f"not a readable .npy array: {err}") from err
        if arr.dtype != np.uint8:
            raise InputError(self.path, f"array dtype is {arr.dtype}; expected uint8 (scale to 0..255 and cast with astype(np.uint8))")
        ok = arr.ndim == 3 or (arr.ndim == 4 and arr.shape[3] in (1, 3, 4))
        if not ok or 0 in arr.shape[1:]:
            raise InputError(self.path, f"array shape is {arr.shape}; expected (N, H, W, C) with C in 1, 3, 4, or (N, H, W) for grayscale")
        if arr.shape[0] == 0:
            raise InputError(self.path, "the array holds no images (N = 0)")
        self.array = arr
        self.count = int(arr.shape[0])
        self.metadata_schema = pa.schema([])

    def signature(self) -> dict[str, Any]:
        st = self.path.stat()
        return {"kind": self.kind, "path": str(self.path.resolve()), "count": self.count, "shape": list(self.array.shape),
                "size": st.st_size, "mtime_ns": st.st_mtime_ns}

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "path": str(self.path.resolve()), "inputs": self.count, "shape": list(self.array.shape)}

    def items(self, start: int = 0) -> Iterator[Item]:
        name = self.path.name
        for i in range(start, self.count):
            yield Item(f"{name}[{i}]", f"{self.path}[{i}]", np.array(self.array[i]))


Source = Union[FolderSource, ParquetSource, NpySource]


def open_source(path: str | Path, image_column: str | None = None, source_column: str | None = None) -> Source:
    """Pick the reader for ``path``: a .npy file, a .parquet file, a folder of Parquet files, or an image folder."""
    path = Path(path)
    if not path.exists():
        raise InputError(path, "no such file or folder")
    if path.is_dir():
        listing = list(_walk(path))
        suffixes = {p.suffix.lower() for p in listing}
        if ".parquet" in suffixes:
            if suffixes & IMAGE_EXTENSIONS:
                raise InputError(path, "the folder holds both image files and .parquet files; point SOURCE at one kind")
            return ParquetSource(path, image_column, source_column)
        source: Source = FolderSource(path, listing)
    elif path.suffix.lower() == ".parquet":
        return ParquetSource(path, image_column, source_column)
    elif path.suffix.lower() == ".npy":
        source = NpySource(path)
    else:
        raise InputError(path, "unsupported source: expected an image folder, a .parquet file or folder, or a .npy file")
    if image_column is not None or source_column is not None:
        raise InputError(path, "--image-column and --source-column apply to Parquet sources only")
    return source


def load(payload: Payload) -> bytes | np.ndarray:
    """Read a file payload into bytes; bytes and arrays pass through."""
    if isinstance(payload, Path):
        try:
            return payload.read_bytes()
        except OSError as err:
            raise DecodeError(f"cannot read file: {err.strerror or err}") from err
    if payload is None:
        raise DecodeError("no data")
    return payload


def content_hash(data: bytes | np.ndarray) -> int:
    """64-bit blake2b of the input bytes (of the file, cell, or array row), as an unsigned int."""
    raw = data.tobytes() if isinstance(data, np.ndarray) else data
    return int.from_bytes(hashlib.blake2b(raw, digest_size=8).digest(), "little")


@contextmanager
def _pixel_limit(max_pixels: int) -> Iterator[None]:
    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = old


def _bomb_message(err: Exception, max_pixels: int) -> str:
    """The guard's reason with the limit in force (PIL quotes twice it above that, and warns at it)."""
    found = re.search(r"\((\d+) pixels\)", str(err))
    size = f"{int(found.group(1)):,} pixels" if found else "more pixels than allowed"
    return f"decompression bomb guard: image of {size}, over the limit of {max_pixels:,} pixel{'s' if max_pixels != 1 else ''} (raise --max-pixels / max_pixels to allow)"


def open_image(data: bytes | np.ndarray, max_pixels: int) -> Image.Image:
    """Decode bytes (first frame, EXIF orientation applied) or wrap an (H, W[, C]) array.

    Raises DecodeError for empty, unknown, corrupt or truncated data and for images over
    ``max_pixels`` pixels (a decompression-bomb guard).
    """
    if isinstance(data, np.ndarray):
        arr = data[:, :, 0] if data.ndim == 3 and data.shape[2] == 1 else data
        return Image.fromarray(np.ascontiguousarray(arr))
    if len(data) == 0:
        raise DecodeError("empty file (0 bytes)")
    with _pixel_limit(max_pixels):
        try:
            img = Image.open(io.BytesIO(data))
            img.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
            raise DecodeError(_bomb_message(err, max_pixels)) from None
        except UnidentifiedImageError:
            raise DecodeError("not a readable image (unknown format or corrupt header)") from None
        except Exception as err:
            raise DecodeError(f"corrupt or truncated image: {type(err).__name__}: {err}") from None
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # a broken EXIF block must not cost the image
        pass
    return img
