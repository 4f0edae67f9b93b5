"""Corpus ingest: stream a source into a store in bounded memory, resumably, published atomically.

The work happens in a fixed sibling folder of STORE, ``.<name>.ingest-partial/``::

    lock                        held (flock) while an ingest runs: a second one into STORE refuses
    checkpoint.json             signature (source listing + arguments) and progress, replaced atomically
    skipped.jsonl               one {"source", "reason"} line per skipped input
    parts/part-000000.parquet   the records of each batch that produced rows
    store/                      images.u8 (appended per batch), then images.parquet and manifest.json

Each batch appends pixels, a records part and skip lines, flushes them to disk, and only then
replaces the checkpoint. Run again after a kill with the same signature, the files are cut back to
the checkpoint and reading continues at the first input not done; with another signature (changed
files or arguments) the folder is cleared and the ingest starts over, with a warning in the log.
The batch size and the number of workers are not part of the signature: the output depends on
neither. At the end the parts are merged into images.parquet, the manifest is written, ``store/``
is renamed to STORE (``atomic.publish_dir``) and the partial folder is removed.

Duplicates: byte-identical inputs are kept (they are legitimate training data). Every row records
``content_hash``, a 64-bit blake2b of its input bytes, and the manifest counts duplicate groups.
"""
from __future__ import annotations

import functools
import itertools
import json
import logging
import multiprocessing
import os
import shutil
import signal
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from . import transform
from ..atomic import publish_dir, write_json_atomic
from ..errors import InputError, StoreError
from .sources import DecodeError, Item, content_hash, load, open_image, open_source
from .store import IMAGES_FILE, MANIFEST_FILE, RECORDS_FILE, STORE_SCHEMA_VERSION, Store, make_manifest

log = logging.getLogger(__name__)

DEFAULT_MAX_PIXELS = 1 << 27  # ~134 megapixels; larger images are skipped as decompression bombs
DEFAULT_BATCH_SIZE = 256
MAX_IMAGE_BYTES = 256 << 20  # one stored image (R = 9,459 in RGB)
MAX_BATCH_BYTES = 4 << 30  # the decoded pixels of one batch
RECORD_ROW_GROUP = 65536
CHECKPOINT_VERSION = 1
BASE_SCHEMA = pa.schema([
    pa.field("row_id", pa.int64()),
    pa.field("source", pa.string()),
    pa.field("orig_width", pa.int32()),
    pa.field("orig_height", pa.int32()),
    pa.field("content_hash", pa.uint64()),
])


@dataclass(frozen=True)
class Decoded:
    """One processed input: (R, R, C) uint8 pixels and the displayed size, or the reason it failed."""

    pixels: np.ndarray | None
    width: int = 0
    height: int = 0
    content_hash: int = 0
    error: str | None = None


@dataclass
class Progress:
    """What the checkpoint promises is on disk."""

    inputs_done: int = 0
    rows: int = 0
    parts: int = 0
    skipped: int = 0
    skip_log_bytes: int = 0
    upscaled: int = 0


def process_item(item: Item, resolution: int, channels: int, max_pixels: int) -> Decoded:
    """Read, decode and transform one input (runs in a worker process)."""
    if item.error is not None:
        return Decoded(None, error=item.error)
    try:
        data = load(item.payload)
        digest = content_hash(data)
        img = open_image(data, max_pixels)
        width, height = img.size
        pixels = transform.to_array(img, resolution, channels)
    except DecodeError as err:
        return Decoded(None, error=str(err))
    except Exception as err:  # a conversion PIL does not support, e.g. an exotic mode
        return Decoded(None, error=f"cannot convert image: {type(err).__name__}: {err}")
    return Decoded(pixels, width, height, digest)


def _before_checkpoint(batch_number: int) -> None:
    """Called after a batch's data is on disk and before its checkpoint (a hook for tests)."""


class PartialIngest:
    """The resumable work folder of one STORE."""

    def __init__(self, store: Path):
        self.store = store
        self.root = store.parent / f".{store.name}.ingest-partial"
        self.checkpoint = self.root / "checkpoint.json"
        self.skip_log = self.root / "skipped.jsonl"
        self.parts = self.root / "parts"
        self.stage = self.root / "store"
        self.images = self.stage / IMAGES_FILE

    def part(self, i: int) -> Path:
        return self.parts / f"part-{i:06d}.parquet"

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold an exclusive lock on the folder (POSIX); refuse if another ingest holds it."""
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            import fcntl
        except ImportError:  # no flock on this platform: run unlocked
            yield
            return
        fd = os.open(self.root / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise StoreError(self.store, f"another ingest into this store is running (it holds {self.root / 'lock'})") from None
            yield
        finally:
            os.close(fd)

    def reset(self) -> Progress:
        """Clear everything but the lock and start from nothing."""
        for p in self.root.iterdir():
            if p.name == "lock":
                continue
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink()
        self.parts.mkdir()
        self.stage.mkdir()
        self.images.touch()
        self.skip_log.touch()
        return Progress()

    def resume(self, signature: dict[str, Any], bytes_per_image: int) -> Progress:
        """Progress to continue from: the checkpoint's if it matches ``signature``, else a fresh start."""
        try:
            saved = json.loads(self.checkpoint.read_text())
        except (OSError, ValueError):
            saved = None
        if saved is None:
            if any(p.name != "lock" for p in self.root.iterdir()):
                log.warning("%s: clearing an interrupted ingest that had not finished its first batch", self.store)
            return self.reset()
        if saved.get("version") != CHECKPOINT_VERSION or saved.get("signature") != signature:
            log.warning("%s: the source or the ingest arguments changed since the interrupted ingest; starting over", self.store)
            return self.reset()
        progress = Progress(**saved["progress"])
        consistent = (
            self.images.is_file() and self.images.stat().st_size >= progress.rows * bytes_per_image
            and self.skip_log.is_file() and self.skip_log.stat().st_size >= progress.skip_log_bytes
            and all(self.part(i).is_file() for i in range(progress.parts))
        )
        if not consistent:
            log.warning("%s: the interrupted ingest's files do not match its checkpoint; starting over", self.store)
            return self.reset()
        os.truncate(self.images, progress.rows * bytes_per_image)
        os.truncate(self.skip_log, progress.skip_log_bytes)
        for p in self.parts.iterdir():
            if not (p.name.startswith("part-") and p.name.endswith(".parquet") and int(p.name[5:11]) < progress.parts):
                p.unlink()
        for name in (RECORDS_FILE, MANIFEST_FILE):
            (self.stage / name).unlink(missing_ok=True)
        log.warning("%s: resuming an interrupted ingest at input %d (%d rows written, %d skipped)",
                 self.store, progress.inputs_done, progress.rows, progress.skipped)
        return progress

    def save(self, signature: dict[str, Any], progress: Progress) -> None:
        write_json_atomic(self.checkpoint, {"version": CHECKPOINT_VERSION, "signature": signature, "progress": asdict(progress)})


def _fsync_write(fh: Any, data: bytes) -> None:
    fh.write(data)
    fh.flush()
    os.fsync(fh.fileno())


def _records(rows: list[tuple[Item, Decoded]], first_row: int, schema: pa.Schema) -> pa.Table:
    """The records of one batch, in the store's schema."""
    n = len(rows)
    cols: dict[str, Any] = {
        "row_id": np.arange(first_row, first_row + n, dtype=np.int64),
        "source": [item.name for item, _ in rows],
        "orig_width": np.array([d.width for _, d in rows], dtype=np.int32),
        "orig_height": np.array([d.height for _, d in rows], dtype=np.int32),
        "content_hash": np.array([d.content_hash for _, d in rows], dtype=np.uint64),
    }
    for f in schema:
        if f.name not in cols:
            cols[f.name] = pa.array([item.metadata.get(f.name) for item, _ in rows], type=f.type)
    return pa.table(cols, schema=schema)


def _worker_init() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C


@contextmanager
def _decoder(fn: Callable[[Item], Decoded], workers: int) -> Iterator[Callable[[Iterable[list[Item]]], Iterator[tuple[list[Item], list[Decoded]]]]]:
    """Yield a function that maps batches of items to results, in order, one batch ahead in a pool."""
    if workers <= 1:
        yield lambda batches: ((b, [fn(x) for x in b]) for b in batches)
        return
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else None)  # fork: no re-import of torch
    pool = ctx.Pool(workers, initializer=_worker_init)

    def run(batches: Iterable[list[Item]]) -> Iterator[tuple[list[Item], list[Decoded]]]:
        pending = None
        for b in batches:
            job = pool.map_async(fn, b, chunksize=max(1, len(b) // (4 * workers)))
            if pending is not None:
                yield pending[0], pending[1].get()
            pending = (b, job)
        if pending is not None:
            yield pending[0], pending[1].get()

    try:
        yield run
        pool.close()
    finally:
        pool.terminate()
        pool.join()


def _decoder_for(engine: str, fn: Callable[[Item], Decoded], workers: int | None, address: str | None):
    """The local process-pool decoder, or the Ray one (``nda_ann.distributed.ingest``)."""
    if engine == "local":
        return _decoder(fn, workers)
    from ..distributed.ingest import ray_decoder

    return ray_decoder(fn, workers, address)


def _batches(items: Iterator[Item], size: int) -> Iterator[list[Item]]:
    while batch := list(itertools.islice(items, size)):
        yield batch


def _merge_records(partial: PartialIngest, progress: Progress, schema: pa.Schema) -> dict[str, Any]:
    """Merge the parts into images.parquet in large row groups; return the duplicate summary."""
    tmp = partial.stage / f".{RECORDS_FILE}.tmp"
    hashes = []
    with pq.ParquetWriter(tmp, schema) as writer:
        buf: list[pa.Table] = []
        held = 0
        for i in range(progress.parts):
            t = pq.read_table(partial.part(i), schema=schema)
            hashes.append(t.column("content_hash").to_numpy())
            buf.append(t)
            held += t.num_rows
            if held >= RECORD_ROW_GROUP or i == progress.parts - 1:
                writer.write_table(pa.concat_tables(buf), row_group_size=held)
                buf, held = [], 0
    os.replace(tmp, partial.stage / RECORDS_FILE)
    _, counts = np.unique(np.concatenate(hashes), return_counts=True)
    dup = counts[counts > 1]
    return {
        "policy": "kept",
        "hash": "content_hash column: 64-bit blake2b of the input bytes (file, Parquet cell or array row)",
        "groups": int(dup.size),
        "rows_in_groups": int(dup.sum()),
        "extra_copies": int(dup.sum() - dup.size),
    }


def _check_arguments(resolution: int, channels: int, on_error: str, batch_size: int, max_pixels: int) -> None:
    if not isinstance(resolution, int) or resolution < 1:
        raise ValueError(f"resolution must be a positive int, got {resolution!r}")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels!r}")
    if on_error not in ("skip", "raise"):
        raise ValueError(f"on_error must be 'skip' or 'raise', got {on_error!r}")
    if batch_size < 1 or max_pixels < 1:
        raise ValueError("batch_size and max_pixels must be positive")
    image_bytes = resolution * resolution * channels
    if image_bytes > MAX_IMAGE_BYTES:
        raise ValueError(f"resolution {resolution}: one {resolution}x{resolution}x{channels} image would take "
                         f"{image_bytes / 2**20:,.0f} MiB (limit {MAX_IMAGE_BYTES >> 20} MiB); choose a smaller --resolution")
    if batch_size * image_bytes > MAX_BATCH_BYTES:
        raise ValueError(f"batch size {batch_size}: {batch_size} images of {resolution}x{resolution}x{channels} would take "
                         f"{batch_size * image_bytes / 2**30:,.1f} GiB (limit {MAX_BATCH_BYTES >> 30} GiB); lower --batch-size")


def ingest(
    source: str | Path,
    store: str | Path,
    resolution: int,
    channels: int = 3,
    on_error: Literal["skip", "raise"] = "skip",
    image_column: str | None = None,
    source_column: str | None = None,
    overwrite: bool = False,
    workers: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: bool = True,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    engine: Literal["local", "ray"] = "local",
    address: str | None = None,
) -> Store:
    """Ingest an image folder, Parquet file/folder or .npy array into a store of (N, R, R, C) uint8.

    ``on_error="skip"`` records unusable inputs in the manifest; ``"raise"`` stops at the first with
    an InputError naming it (the work done so far is kept for a rerun). ``workers`` decode in a
    process pool (default min(4, cpu_count); 0 or 1 decode in this process). An existing STORE is
    an error unless ``overwrite``, which replaces it atomically. Returns the opened store.
    ``engine="ray"`` (extra ``nda-ann[ray]``) decodes the batches in Ray tasks on the cluster at
    ``address`` instead (``workers`` batches in flight; the store is the same).
    """
    _check_arguments(resolution, channels, on_error, batch_size, max_pixels)
    store = Path(store).absolute()
    src_path = Path(source).absolute()
    if store.exists() and not overwrite:
        raise StoreError(store, "already exists; pass --overwrite (overwrite=True) to replace it")
    if store == src_path or store in src_path.parents:
        raise StoreError(store, f"the store must not be the source or contain it ({src_path})")
    if engine not in ("local", "ray"):
        raise ValueError(f"engine must be 'local' or 'ray', got {engine!r}")
    src = open_source(source, image_column, source_column)
    workers = min(4, os.cpu_count() or 1) if workers is None and engine == "local" else workers
    bytes_per_image = resolution * resolution * channels
    transform_desc = transform.describe(resolution, channels)
    signature = json.loads(json.dumps({
        "store_schema_version": STORE_SCHEMA_VERSION,
        "source": src.signature(),
        "transform": transform_desc,
        "max_pixels": max_pixels,
    }))
    schema = pa.schema(list(BASE_SCHEMA) + list(src.metadata_schema))
    log.info("%s: %d inputs (%s) -> %s at %dx%dx%d", src.path, src.count, src.kind, store, resolution, resolution, channels)

    store.parent.mkdir(parents=True, exist_ok=True)
    partial = PartialIngest(store)
    with partial.locked():
        prog = partial.resume(signature, bytes_per_image)
        fn = functools.partial(process_item, resolution=resolution, channels=channels, max_pixels=max_pixels)
        batches = _batches(src.items(prog.inputs_done), batch_size)
        bar = tqdm(total=src.count, initial=prog.inputs_done, unit="img", desc="ingest", disable=not progress, dynamic_ncols=True)
        with bar, _decoder_for(engine, fn, workers, address) as run, open(partial.images, "ab") as pix, open(partial.skip_log, "ab") as skp:
            for number, (batch, results) in enumerate(run(batches)):
                rows: list[tuple[Item, Decoded]] = []
                skips = []
                for item, res in zip(batch, results):
                    if res.error is None:
                        rows.append((item, res))
                    elif on_error == "raise":
                        raise InputError(item.origin, f"{res.error} (use --on-error skip to record and skip such inputs)")
                    else:
                        skips.append(json.dumps({"source": item.name, "reason": res.error}) + "\n")
                if rows:
                    _fsync_write(pix, b"".join(d.pixels.tobytes() for _, d in rows))
                    with open(partial.part(prog.parts), "wb") as fh:
                        pq.write_table(_records(rows, prog.rows, schema), fh)
                        fh.flush()
                        os.fsync(fh.fileno())
                skip_bytes = "".join(skips).encode()
                if skip_bytes:
                    _fsync_write(skp, skip_bytes)
                _before_checkpoint(number)
                prog.inputs_done += len(batch)
                prog.rows += len(rows)
                prog.parts += bool(rows)
                prog.skipped += len(skips)
                prog.skip_log_bytes += len(skip_bytes)
                prog.upscaled += sum(min(d.width, d.height) < resolution for _, d in rows)
                partial.save(signature, prog)
                bar.update(len(batch))
                if prog.skipped:
                    bar.set_postfix(skipped=prog.skipped, refresh=False)

        skipped = [json.loads(line) for line in partial.skip_log.read_text().splitlines()]
        if prog.rows == 0:
            shutil.rmtree(partial.root, ignore_errors=True)
            first = f" (first: {skipped[0]['source']}: {skipped[0]['reason']})" if skipped else ""
            raise InputError(src.path, f"no usable images: all {src.count} inputs were skipped{first}")
        duplicates = _merge_records(partial, prog, schema)
        manifest = make_manifest(partial.stage, prog.rows, resolution, channels, transform_desc, skipped)
        manifest.update({"source": src.describe(), "upscaled": prog.upscaled, "duplicates": duplicates})
        write_json_atomic(partial.stage / MANIFEST_FILE, manifest)
        try:
            publish_dir(partial.stage, store, overwrite=overwrite)
        except FileExistsError:
            raise StoreError(store, "already exists (created while this ingest ran); pass --overwrite to replace it") from None
        shutil.rmtree(partial.root, ignore_errors=True)
    log.info("%s: %d images, %d skipped, %d upscaled, %d duplicate copies", store, prog.rows, prog.skipped, prog.upscaled, duplicates["extra_copies"])
    return Store.open(store)
