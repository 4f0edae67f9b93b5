"""The embedded corpus: deterministic, distinct, and held-out crops never share pixels with training crops."""
from __future__ import annotations

import hashlib
import io
import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from nda_ann.corpus.demo_corpus import Crop, _cut, demo_corpus, load_photos, photo_crops

if importlib.util.find_spec("skimage") is None:
    pytest.skip("the demo photographs ship with scikit-image", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[2]


def test_photos_split_into_complementary_regions():
    photos = load_photos()
    assert len(photos) >= 9
    for p in photos:
        h, w = p.pixels.shape[:2]
        assert p.train.width * p.train.height + p.heldout.width * p.heldout.height == w * h
        assert not p.train.intersects(p.heldout)
        assert 0.15 < p.heldout.width * p.heldout.height / (w * h) < 0.25


def test_corpus_is_deterministic_for_a_seed():
    a, b, c = demo_corpus(200, 4, seed=3), demo_corpus(200, 4, seed=3), demo_corpus(200, 4, seed=4)
    assert np.array_equal(a.train, b.train) and np.array_equal(a.queries, b.queries)
    assert a.train_sources == b.train_sources and a.query_sources == b.query_sources
    assert not np.array_equal(a.train, c.train)
    assert a.train.shape == (200, 32, 32, 3) and a.train.dtype == np.uint8
    assert a.queries.shape == (4, 32, 32, 3)


def test_heldout_queries_never_overlap_training_crops():
    photos = {p.name: p for p in load_photos()}
    corpus = demo_corpus(1500, 20)
    train_boxes: dict[str, list] = {}
    for crop in corpus.train_crops:
        box = crop.footprint()
        assert photos[crop.photo].train.contains(box), crop
        assert not photos[crop.photo].heldout.intersects(box), crop
        train_boxes.setdefault(crop.photo, []).append(box)
    for crop in corpus.query_crops:
        box = crop.footprint()
        assert photos[crop.photo].heldout.contains(box), crop
        assert not any(box.intersects(t) for t in train_boxes.get(crop.photo, [])), crop
    # the stereo pair holds out the same rows in both views (content shifts only horizontally)
    left, right = photos["motorcycle_left.png"], photos["motorcycle_right.png"]
    assert left.heldout == right.heldout and left.heldout.x0 == 0 and left.heldout.y0 > 0


def test_rotated_crops_stay_inside_their_region():
    photos = {p.name: p for p in load_photos()}
    for region in ("train", "heldout"):
        _, crops = photo_crops(300, 32, (7, 1), region, rotate=True, jitter=True)
        assert any(c.angle != 0 for c in crops)
        for crop in crops:
            assert photos[crop.photo].region(region).contains(crop.footprint()), crop


def test_crops_are_distinct_and_not_flat():
    images, crops = photo_crops(2000, 32, 0, "train")
    digests = {hashlib.sha256(img.tobytes()).digest() for img in images}
    assert len(digests) == len(images)
    assert images.reshape(len(images), -1, 3).std(axis=1).mean(axis=1).min() >= 3.0
    assert len({c.source for c in crops}) == len(crops)


def test_a_crop_is_the_resized_window_of_the_photo():
    photos = {p.name: p for p in load_photos()}
    crop = Crop("astronaut.png", 40, 60, 64, flip=True)
    got = _cut(photos["astronaut.png"], crop, "train", 32)
    window = Image.fromarray(photos["astronaut.png"].pixels[60:124, 40:104])
    want = np.asarray(window.resize((32, 32), Image.Resampling.LANCZOS))[:, ::-1]
    assert np.array_equal(got, want)
    assert crop.source == "astronaut.png@x=40,y=60,s=64,flip=1"


def _load_make_corpus():
    spec = importlib.util.spec_from_file_location("make_corpus", ROOT / "tools" / "make_corpus.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_make_corpus_writes_readable_resumable_shards(tmp_path):
    from click.testing import CliRunner

    mc = _load_make_corpus()
    out = tmp_path / "corpus"
    args = [str(out), "--count", "50", "--shard-size", "20", "--seed", "1"]
    first = CliRunner().invoke(mc.main, args)
    assert first.exit_code == 0, first.output
    shards = sorted(out.glob("shard-*.parquet"))
    assert [s.name for s in shards] == ["shard-00000.parquet", "shard-00001.parquet", "shard-00002.parquet"]
    table = pq.read_table(shards)
    assert table.num_rows == 50
    assert {"image", "source", "photo", "x", "y", "scale", "angle", "flip", "sha"} <= set(table.column_names)
    rows = table.to_pylist()
    pixels = []
    for row in rows:
        img = np.asarray(Image.open(io.BytesIO(row["image"]["bytes"])))
        assert img.shape == (32, 32, 3)
        assert hashlib.blake2b(img.tobytes(), digest_size=16).digest() == row["sha"]
        pixels.append(img.tobytes())
    assert len(set(pixels)) == 50
    assert [r["image"]["path"] for r in rows] == [f"{i:08d}.png" for i in range(50)]

    # resumable: a deleted shard is regenerated identically, complete ones are left alone
    before = {s.name: s.read_bytes() for s in shards}
    mtime = shards[0].stat().st_mtime_ns
    shards[1].unlink()
    again = CliRunner().invoke(mc.main, args)
    assert again.exit_code == 0, again.output
    assert "2 of 3 shards already complete" in again.output
    assert shards[0].stat().st_mtime_ns == mtime
    assert pq.read_table(shards[1]).equals(pq.read_table(io.BytesIO(before["shard-00001.parquet"])))
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*.tmp"))

    # other settings in the same folder are refused
    clash = CliRunner().invoke(mc.main, [str(out), "--count", "50", "--shard-size", "20", "--seed", "2"])
    assert clash.exit_code != 0 and "other settings" in clash.output


def test_make_corpus_runs_as_a_script(tmp_path):
    done = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "make_corpus.py"), str(tmp_path), "--count", "5", "--shard-size", "5"],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert pq.read_metadata(tmp_path / "shard-00000.parquet").num_rows == 5
