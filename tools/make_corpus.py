#!/usr/bin/env python
"""Generate N distinct 32x32 images cut from the shipped photographs, as Parquet shards of PNGs.

    python tools/make_corpus.py OUT_DIR --count 1000000 --shard-size 50000 --seed 0 --workers 2

Crops come from the photographs' training regions only (see nda_ann/demo_corpus.py), so the demo's
held-out queries stay held out. Each crop has a random position, scale, rotation, flip and colour
jitter. Shard k is generated from the seed (seed, k) alone, so shards can be made in any order or
in parallel, and the same arguments always give the same bytes of pixels.

Output: OUT_DIR/shard-00000.parquet, ... with the HF-style struct column ``image`` {bytes, path},
plus ``source``, ``photo``, ``x``, ``y``, ``scale``, ``angle``, ``flip``, ``brightness``,
``contrast``, ``saturation`` and ``sha`` (blake2b-128 of the raw pixels), and OUT_DIR/corpus.json.
Resumable: a shard that is already complete is skipped; each is written to a .tmp then renamed.
After the shards, the ``sha`` columns are scanned to confirm every image is distinct.
"""
from __future__ import annotations

import io
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from functools import partial
from pathlib import Path

import click
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from tqdm import tqdm

try:
    import nda_ann  # noqa: F401
except ModuleNotFoundError:  # run from a checkout without installing: use the repository's package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from nda_ann.atomic import atomic_file, write_json_atomic  # noqa: E402
from nda_ann.corpus.demo_corpus import iter_photo_crops, load_photos  # noqa: E402

ROW_GROUP = 5000
GENERATOR = "nda-ann make_corpus v1"  # bump when the crop recipe changes: old shards then mismatch
SCHEMA = pa.schema(
    [
        ("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
        ("source", pa.string()),
        ("photo", pa.string()),
        ("x", pa.int32()),
        ("y", pa.int32()),
        ("scale", pa.int32()),
        ("angle", pa.float32()),
        ("flip", pa.bool_()),
        ("brightness", pa.float32()),
        ("contrast", pa.float32()),
        ("saturation", pa.float32()),
        ("sha", pa.binary(16)),
    ]
)
HF_FEATURES = {
    "image": {"_type": "Image"},
    **{name: {"dtype": dt, "_type": "Value"} for name, dt in [
        ("source", "string"), ("photo", "string"), ("x", "int32"), ("y", "int32"), ("scale", "int32"),
        ("angle", "float32"), ("flip", "bool"), ("brightness", "float32"), ("contrast", "float32"),
        ("saturation", "float32"), ("sha", "binary"),
    ]},
}


def shard_path(out: Path, index: int) -> Path:
    return out / f"shard-{index:05d}.parquet"


def shard_params(seed: int, index: int, rows: int, size: int) -> dict[str, str]:
    """What a shard's bytes depend on; stored in its Parquet metadata and checked on resume."""
    return {"generator": GENERATOR, "seed": str(seed), "shard": str(index), "rows": str(rows), "size": str(size)}


def shard_complete(path: Path, params: dict[str, str]) -> bool:
    """True if ``path`` is a finished shard made with ``params``."""
    try:
        meta = pq.read_metadata(path)
    except (OSError, pa.ArrowInvalid):
        return False
    kv = {k.decode(): v.decode() for k, v in (meta.metadata or {}).items()}
    return meta.num_rows == int(params["rows"]) and all(kv.get(f"nda_ann.{k}") == v for k, v in params.items())


def encode_png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def write_crop_shard(path: Path, params: dict[str, str], stream, first_row: int, rows: int) -> None:
    """Write ``rows`` crops from ``stream`` (yields (img, crop, sha)) as one Parquet shard at ``path``,
    atomically, with ``params`` and the HF features in its metadata; rows are numbered from first_row."""
    meta = {f"nda_ann.{k}".encode(): v.encode() for k, v in params.items()}
    meta[b"huggingface"] = json.dumps({"info": {"features": HF_FEATURES}}).encode()
    schema = SCHEMA.with_metadata(meta)
    with atomic_file(path) as tmp:
        with pq.ParquetWriter(tmp, schema) as writer:
            for lo in range(0, rows, ROW_GROUP):
                cols: dict[str, list] = {name: [] for name in SCHEMA.names}
                for row in range(first_row + lo, first_row + min(lo + ROW_GROUP, rows)):
                    img, crop, digest = next(stream)
                    b, c, s = crop.jitter or (1.0, 1.0, 1.0)
                    cols["image"].append({"bytes": encode_png(img), "path": f"{row:08d}.png"})
                    for name, value in (("source", crop.source), ("photo", crop.photo), ("x", crop.x), ("y", crop.y),
                                        ("scale", crop.scale), ("angle", crop.angle), ("flip", crop.flip),
                                        ("brightness", b), ("contrast", c), ("saturation", s), ("sha", digest)):
                        cols[name].append(value)
                writer.write_table(pa.table(cols, schema=schema))


def make_shard(out: Path, seed: int, index: int, first_row: int, rows: int, size: int) -> tuple[int, int, float]:
    """Write shard ``index`` (rows first_row .. first_row + rows - 1); returns (index, rows, seconds)."""
    start = time.perf_counter()
    params = shard_params(seed, index, rows, size)
    write_crop_shard(shard_path(out, index), params, iter_photo_crops(size, (seed, index), "train", rotate=True, jitter=True), first_row, rows)
    return index, rows, time.perf_counter() - start


def check_distinct(paths: list[Path]) -> int:
    """Number of duplicate images across all shards (by the ``sha`` column)."""
    digests = np.concatenate([np.asarray(pq.read_table(p, columns=["sha"]).column("sha").to_pylist(), dtype="S16") for p in paths])
    return int(len(digests) - len(np.unique(digests)))


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--count", type=click.IntRange(min=1), default=1_000_000, show_default=True, help="Images to generate.")
@click.option("--shard-size", type=click.IntRange(min=1), default=50_000, show_default=True, help="Images per Parquet shard.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--size", type=click.IntRange(min=8), default=32, show_default=True, help="Image side in pixels.")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True, help="Shards generated in parallel.")
@click.option("--no-check", is_flag=True, help="Skip the final scan that confirms all images are distinct.")
def main(out_dir: Path, count: int, shard_size: int, seed: int, size: int, workers: int, no_check: bool) -> None:
    """Write COUNT distinct SIZE x SIZE photo crops to OUT_DIR as Parquet shards (resumable)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    photos = [p.name for p in load_photos()]
    manifest = {"generator": GENERATOR, "count": count, "shard_size": shard_size, "seed": seed, "size": size, "photos": photos}
    mpath = out_dir / "corpus.json"
    if mpath.exists():
        old = json.loads(mpath.read_text())
        if {k: old.get(k) for k in manifest} != manifest:
            raise click.ClickException(f"{out_dir} holds a corpus made with other settings ({mpath}); use another folder")
    write_json_atomic(mpath, {**manifest, "complete": False})

    paths, duplicates = make_all_shards(out_dir, count, shard_size, lambda k, rows: shard_params(seed, k, rows, size),
                                        partial(make_shard, out_dir, seed), workers, no_check, size)
    write_json_atomic(mpath, {**manifest, "complete": True, "shards": [p.name for p in paths], "duplicates": duplicates})
    click.echo(f"{count} images in {len(paths)} shards under {out_dir}")


def make_all_shards(out_dir: Path, count: int, shard_size: int, params, make, workers: int, no_check: bool, *args) -> tuple[list[Path], int | None]:
    """Make the shards of ``count`` rows not already complete (``params(k, rows)``: what shard k's bytes
    depend on), timing them, then check the images are distinct across all shards (unless ``no_check``).
    Returns the shard paths and the duplicate count (None when not checked); raises on duplicates."""
    n_shards = -(-count // shard_size)
    jobs = [(k, k * shard_size, min(shard_size, count - k * shard_size)) for k in range(n_shards)]
    todo = [j for j in jobs if not shard_complete(shard_path(out_dir, j[0]), params(j[0], j[2]))]
    if len(todo) < len(jobs):
        click.echo(f"{len(jobs) - len(todo)} of {len(jobs)} shards already complete; skipping them", err=True)
    start = time.perf_counter()
    done_rows = run_shards(todo, make, workers, *args)
    elapsed = time.perf_counter() - start
    if done_rows:
        click.echo(f"generated {done_rows} images in {elapsed:.1f} s ({done_rows / elapsed:.0f} images/s)", err=True)
    paths = [shard_path(out_dir, k) for k, _, _ in jobs]
    duplicates = None if no_check else check_distinct(paths)
    if duplicates:
        raise click.ClickException(f"{duplicates} duplicate images across shards; pick another --seed")
    return paths, duplicates


def run_shards(todo: list[tuple[int, int, int]], make, workers: int, *args) -> int:
    """Run ``make(k, first, rows, *args)`` for each (k, first, rows) of ``todo`` (in ``workers``
    processes when more than one) with a progress bar; returns the rows made."""
    done_rows = 0
    with tqdm(total=sum(j[2] for j in todo), unit="img", desc="crops", file=sys.stderr) as bar:
        if workers == 1 or len(todo) <= 1:
            for k, first, rows in todo:
                make(k, first, rows, *args)
                bar.update(rows)
                done_rows += rows
        else:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                futures = [pool.submit(make, k, first, rows, *args) for k, first, rows in todo]
                for fut in as_completed(futures):
                    _, rows, _ = fut.result()
                    bar.update(rows)
                    done_rows += rows
    return done_rows


if __name__ == "__main__":
    main()
