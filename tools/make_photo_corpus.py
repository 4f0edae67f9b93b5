#!/usr/bin/env python
"""Generate N distinct 32x32 crops of the distinct photographs Debian packages ship, as Parquet shards.

    sudo bash tools/install_photos.sh                      # once: the photo packages
    python tools/make_photo_corpus.py OUT_DIR --count 1000000 --shard-size 50000 --seed 0 --workers 2

First run: tools/photo_finder.py picks the photographs (about 3 minutes for all packages), their
working images go to OUT_DIR/photos/ and the list, with package, file, licence, checksums, the
held-out photos and every photo's training and held-out boxes, to OUT_DIR/corpus.json, with each
package's share of the training crops (``package_shares``: every training photo equally likely,
no package above ``PACKAGE_CAP``, 25%) and, once done, the crops it got. Later runs read the
photos from the folder. See tools/photo_corpus.py for the crops and the held-out queries
(``photo_queries``).

Output as tools/make_corpus.py: OUT_DIR/shard-00000.parquet, ... with the HF-style struct column
``image`` {bytes, path} and ``source``, ``photo``, ``x``, ``y``, ``scale``, ``angle`` (always 0),
``flip``, ``brightness``, ``contrast``, ``saturation``, ``sha`` (blake2b-128 of the raw pixels).
Shard k depends only on (seed, k) and the photo set; shards are written to a .tmp then renamed,
complete ones are skipped on a rerun, and a final scan of ``sha`` confirms every image is distinct.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import asdict
from functools import partial
from pathlib import Path

import click
import numpy as np
import pyarrow.parquet as pq
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_corpus import make_all_shards, shard_path, write_crop_shard  # noqa: E402
from nda_ann.atomic import atomic_file, write_json_atomic  # noqa: E402  (make_corpus put the package on the path)
import photo_corpus as pc  # noqa: E402
import photo_finder as pf  # noqa: E402

_PHOTOS: dict[str, list[pc.CorpusPhoto]] = {}  # per process: the corpus photos of each folder


def shard_params(seed: int, index: int, rows: int, size: int, digest: str) -> dict[str, str]:
    """What a shard's bytes depend on; stored in its Parquet metadata and checked on resume."""
    return {"generator": pc.GENERATOR, "seed": str(seed), "shard": str(index), "rows": str(rows), "size": str(size),
            "photos": digest, "package_cap": repr(pc.PACKAGE_CAP)}


def package_version(package: str) -> str | None:
    try:
        out = subprocess.run(["dpkg-query", "-W", "-f=${Version}", package], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip() or None


def prepare_photos(out: Path, seed: int, photo_dirs: tuple[str, ...], no_packages: bool) -> dict:
    """Find the photographs, write their working images to out/photos/, return the manifest's photo part."""
    sources = () if no_packages else pf.SOURCES
    click.echo("finding photographs (tools/photo_finder.py) ...", err=True)
    kept, dropped, images = pf.find_photos(sources, photo_dirs, progress=True)
    if len(kept) < 2:
        raise click.ClickException(f"only {len(kept)} photographs found; run tools/install_photos.sh or pass --photo-dir")
    unseen = set(pc.choose_unseen([(k.name, k.package) for k in kept], seed))
    entries = []
    for info in kept:
        img = images[info.name]
        h, w = img.shape[:2]
        train, held = pc.split_box(w, h)
        if info.name in unseen:
            train, held = None, pc.Box(0, 0, w, h)
        path = out / "photos" / pc.photo_file(info.name)
        with atomic_file(path) as tmp:
            Image.fromarray(img).save(tmp, format="PNG")
        entries.append({**asdict(info), "file": path.name, "png_sha256": pc.file_sha256(path),
                        "train": None if train is None else [train.x0, train.y0, train.x1, train.y1],
                        "heldout": [held.x0, held.y0, held.x1, held.y1], "unseen": info.name in unseen})
    packages = sorted({k.package for k in kept} | {d["package"] for d in dropped})
    train = [e["package"] for e in entries if e["train"] is not None]
    return {
        "photo_sources": {"packages": [p for p, _ in sources], "photo_dirs": [str(Path(d).resolve()) for d in photo_dirs]},
        "packages": {p: {"version": None if p == pf.LOCAL else package_version(p), "licence": pf.licence_file(p)} for p in packages},
        "photo_digest": pc.photo_digest(entries),
        "heldout_photos": sorted(unseen),
        "package_shares": {k: {"photos": train.count(k), "share": v} for k, v in pc.package_shares(train).items()},
        "photos": entries,
        "dropped": dropped,
    }


def make_shard(out: Path, seed: int, index: int, first_row: int, rows: int, size: int, digest: str) -> tuple[int, int, float]:
    """Write shard ``index`` (rows first_row .. first_row + rows - 1); returns (index, rows, seconds)."""
    start = time.perf_counter()
    key = str(out.resolve())
    if key not in _PHOTOS:
        _PHOTOS[key] = pc.load_corpus(out)[1]
    params = shard_params(seed, index, rows, size, digest)
    write_crop_shard(shard_path(out, index), params, pc.iter_train_crops(_PHOTOS[key], (seed, index), size), first_row, rows)
    return index, rows, time.perf_counter() - start


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--count", type=click.IntRange(min=1), default=1_000_000, show_default=True, help="Images to generate.")
@click.option("--shard-size", type=click.IntRange(min=1), default=50_000, show_default=True, help="Images per Parquet shard.")
@click.option("--seed", type=int, default=0, show_default=True, help="Crops and the choice of held-out photos.")
@click.option("--size", type=click.IntRange(min=8), default=32, show_default=True, help="Image side in pixels.")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True, help="Shards generated in parallel.")
@click.option("--photo-dir", "photo_dirs", multiple=True, type=click.Path(file_okay=False, exists=True),
              help="Also take the photographs in this folder (repeatable).")
@click.option("--no-packages", is_flag=True, help="Take photographs only from --photo-dir, not from the Debian packages.")
@click.option("--no-check", is_flag=True, help="Skip the final scan that confirms all images are distinct.")
def main(out_dir: Path, count: int, shard_size: int, seed: int, size: int, workers: int, photo_dirs: tuple[str, ...],
         no_packages: bool, no_check: bool) -> None:
    """Write COUNT distinct SIZE x SIZE photo crops to OUT_DIR as Parquet shards (resumable)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = {"generator": pc.GENERATOR, "count": count, "shard_size": shard_size, "seed": seed, "size": size,
                "package_share_cap": pc.PACKAGE_CAP}
    sources = {"packages": [] if no_packages else [p for p, _ in pf.SOURCES], "photo_dirs": [str(Path(d).resolve()) for d in photo_dirs]}
    mpath = out_dir / "corpus.json"
    if mpath.exists():
        old = json.loads(mpath.read_text())
        if {k: old.get(k) for k in settings} != settings or old.get("photo_sources") != sources:
            raise click.ClickException(f"{out_dir} holds a corpus made with other settings ({mpath}); use another folder")
        manifest = {k: v for k, v in old.items() if k not in ("complete", "shards", "duplicates", "crops_per_package")}
        pc.load_corpus(out_dir)  # refuses photos that changed since
    else:
        manifest = {**settings, **prepare_photos(out_dir, seed, photo_dirs, no_packages)}
    write_json_atomic(mpath, {**manifest, "complete": False})
    n_photos, n_unseen = len(manifest["photos"]), len(manifest["heldout_photos"])
    click.echo(f"{n_photos} photographs, {n_unseen} held out whole; {len(manifest['dropped'])} files dropped", err=True)

    digest = manifest["photo_digest"]
    paths, duplicates = make_all_shards(out_dir, count, shard_size, lambda k, rows: shard_params(seed, k, rows, size, digest),
                                        partial(make_shard, out_dir, seed), workers, no_check, size, digest)
    package_of = {e["name"]: e["package"] for e in manifest["photos"]}
    shares: dict[str, int] = {}
    for p in paths:
        for name, n in zip(*np.unique(pq.read_table(p, columns=["photo"]).column("photo").to_numpy(zero_copy_only=False), return_counts=True)):
            shares[package_of[name]] = shares.get(package_of[name], 0) + int(n)
    write_json_atomic(mpath, {**manifest, "complete": True, "shards": [p.name for p in paths], "duplicates": duplicates,
                              "crops_per_package": dict(sorted(shares.items()))})
    click.echo(f"{count} images of {n_photos - n_unseen} training photographs in {len(paths)} shards under {out_dir}")


if __name__ == "__main__":
    main()
