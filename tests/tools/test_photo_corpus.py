"""The photo corpus generator (tools/make_photo_corpus.py) on a few scikit-image photographs.

The photo filter keeps photographs and drops a gradient, flat vector art and duplicates; the
corpus is deterministic, resumable and distinct; no training crop reads a held-out photo or
region; queries come from the held-out parts only. The Debian photo packages are not needed.
"""
from __future__ import annotations

import hashlib
import io
import json
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageDraw

skdata = pytest.importorskip("skimage.data", reason="the test photographs ship with scikit-image")
from click.testing import CliRunner  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))
import make_photo_corpus  # noqa: E402
import photo_corpus as pc  # noqa: E402
import photo_finder as pf  # noqa: E402

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry")


def gradient() -> np.ndarray:
    """A smooth two-colour ramp, 384 x 256."""
    g = np.zeros((256, 384, 3), dtype=np.uint8)
    g[..., 0] = np.linspace(0, 255, 384)[None, :]
    g[..., 1] = 90
    g[..., 2] = np.linspace(255, 0, 256)[:, None]
    return g


def vector_art() -> np.ndarray:
    """Flat-filled circles and triangles on a plain background, like rendered vector art."""
    rng = np.random.default_rng(0)
    im = Image.new("RGB", (384, 256), (240, 230, 200))
    draw = ImageDraw.Draw(im)
    for i in range(40):
        x, y, r = int(rng.integers(0, 384)), int(rng.integers(0, 256)), int(rng.integers(10, 60))
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        if i % 2:
            draw.ellipse((x - r, y - r, x + r, y + r), fill=colour)
        else:
            draw.polygon([(x, y), (x + r, y + r // 2), (x - r // 2, y + r)], fill=colour)
    return np.asarray(im)


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory) -> Path:
    """Five photographs, two non-photographs, a smaller variant and a re-encoded copy."""
    d = tmp_path_factory.mktemp("photos")
    for name in PHOTOS:
        Image.fromarray(getattr(skdata, name)()).save(d / f"{name}.png")
    Image.fromarray(gradient()).save(d / "gradient.png")
    Image.fromarray(vector_art()).save(d / "shapes.png")
    Image.fromarray(skdata.astronaut()).resize((300, 300)).save(d / "astronaut_300x300.png")
    cat = Image.fromarray(skdata.chelsea())
    cat.resize((cat.width * 4 // 5, cat.height * 4 // 5)).save(d / "cat_copy.jpg", quality=90)
    return d


def make(out: Path, photo_dir: Path, *extra: str) -> None:
    args = [str(out), "--count", "600", "--shard-size", "250", "--photo-dir", str(photo_dir), "--no-packages", *extra]
    res = CliRunner().invoke(make_photo_corpus.main, args)
    assert res.exit_code == 0, res.output + repr(res.exception)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, photo_dir) -> Path:
    out = tmp_path_factory.mktemp("corpus") / "c"
    make(out, photo_dir)
    return out


def shards(folder: Path) -> list[Path]:
    return sorted(folder.glob("shard-*.parquet"))


def working(name: str) -> np.ndarray:
    a = getattr(skdata, name)()
    return pf.working_image(Image.fromarray(a), (0, 0, a.shape[1], a.shape[0]))


def test_filter_keeps_photographs_and_drops_gradient_and_vector_art():
    for name in PHOTOS:
        img = working(name)
        assert min(img.shape[:2]) == pf.WORK_SIDE and pf.is_photo(img), name
    assert pf.photo_verdict(pf.photo_stats(gradient())) == "flat"
    assert pf.photo_verdict(pf.photo_stats(vector_art())) == "vector"
    grey = np.repeat(working("coffee")[..., :1], 3, axis=2)
    assert pf.photo_verdict(pf.photo_stats(grey)) == "grey"


def test_finder_drops_non_photographs_variants_and_copies(photo_dir):
    kept, dropped, images = pf.find_photos((), [photo_dir])
    assert sorted(k.name for k in kept) == sorted(f"local/{n}" for n in PHOTOS)
    reasons = {Path(d["path"]).name: d["reason"].split(" ")[0] for d in dropped}
    assert reasons == {"gradient.png": "flat", "shapes.png": "vector", "astronaut_300x300.png": "variant", "cat_copy.jpg": "duplicate"}
    for k in kept:
        assert k.sha256 == hashlib.sha256(Path(k.path).read_bytes()).hexdigest()
        assert images[k.name].shape == (k.work_height, k.work_width, 3)


def test_cut_out_photo_keeps_its_opaque_interior():
    rgba = np.zeros((200, 300, 4), dtype=np.uint8)
    rgba[..., :3] = 120
    rgba[40:160, 50:250, 3] = 255  # opaque interior; transparent frame
    rgba[40, 50, 3] = 0  # one transparent pixel inside shrinks the rectangle
    x0, y0, x1, y1 = pf.opaque_box(Image.fromarray(rgba, "RGBA"))
    assert (rgba[y0:y1, x0:x1, 3] == 255).all()
    assert (x1 - x0) * (y1 - y0) >= 199 * 120 - 200


def test_same_seed_same_bytes_other_seed_other_bytes(corpus, photo_dir, tmp_path):
    make(tmp_path / "again", photo_dir)
    assert [p.name for p in shards(corpus)] == ["shard-00000.parquet", "shard-00001.parquet", "shard-00002.parquet"]
    for a, b in zip(shards(corpus), shards(tmp_path / "again")):
        assert a.read_bytes() == b.read_bytes()
    assert (corpus / "corpus.json").read_text() == (tmp_path / "again" / "corpus.json").read_text()
    make(tmp_path / "other", photo_dir, "--seed", "1")
    assert shards(corpus)[0].read_bytes() != shards(tmp_path / "other")[0].read_bytes()


def test_resume_rebuilds_a_missing_shard_identically(corpus, photo_dir, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(corpus, copy)
    before = {p.name: p.read_bytes() for p in shards(copy)}
    mtime0 = shards(copy)[0].stat().st_mtime_ns
    (copy / "shard-00001.parquet").unlink()
    make(copy, photo_dir)
    assert {p.name: p.read_bytes() for p in shards(copy)} == before
    assert shards(copy)[0].stat().st_mtime_ns == mtime0  # complete shards are skipped
    assert json.loads((copy / "corpus.json").read_text())["complete"] is True
    res = CliRunner().invoke(make_photo_corpus.main, [str(copy), "--count", "700", "--shard-size", "250",
                                                       "--photo-dir", str(photo_dir), "--no-packages"])
    assert res.exit_code != 0 and "other settings" in res.output


def test_images_are_distinct_32x32_pngs_with_their_sha(corpus):
    table = pq.read_table(shards(corpus))
    assert table.num_rows == 600
    shas = table.column("sha").to_pylist()
    assert len(set(shas)) == 600
    for rec, sha in zip(table.column("image").to_pylist()[:200], shas):
        img = np.asarray(Image.open(io.BytesIO(rec["bytes"])))
        assert img.shape == (32, 32, 3) and img.dtype == np.uint8
        assert hashlib.blake2b(img.tobytes(), digest_size=16).digest() == sha


def test_no_training_crop_reads_a_heldout_photo_or_region(corpus):
    manifest, photos = pc.load_corpus(corpus)
    by_name = {p.name: p for p in photos}
    heldout = set(manifest["heldout_photos"])
    assert len(heldout) == 1 and len(photos) == len(PHOTOS)
    assert all(by_name[n].unseen for n in heldout)
    table = pq.read_table(shards(corpus)).to_pylist()
    used = {r["photo"] for r in table}
    assert used == set(by_name) - heldout  # every training photo is cut, no held-out one
    for r in table:
        p = by_name[r["photo"]]
        crop = pc.Crop(r["photo"], r["x"], r["y"], r["scale"], flip=r["flip"], jitter=(r["brightness"], r["contrast"], r["saturation"]))
        assert p.train is not None and p.train.contains(crop.footprint()) and not p.heldout.intersects(crop.footprint())
        # the recorded geometry is where the pixels came from
        assert np.array_equal(pc.cut(p, crop, "train", 32), np.asarray(Image.open(io.BytesIO(r["image"]["bytes"]))))
    for p in photos:
        if p.train is not None:
            assert p.train.width * p.train.height + p.heldout.width * p.heldout.height == p.pixels.shape[0] * p.pixels.shape[1]


def test_queries_come_from_heldout_parts_only(corpus):
    manifest, photos = pc.load_corpus(corpus)
    by_name = {p.name: p for p in photos}
    images, names, kinds = pc.photo_queries(6, 4, seed=0, corpus=corpus)
    assert images.shape == (10, 32, 32, 3) and images.dtype == np.uint8
    assert kinds == ["seen"] * 6 + ["unseen"] * 4
    again = pc.photo_queries(6, 4, seed=0, corpus=corpus)
    assert np.array_equal(images, again[0]) and names == again[1]
    assert not np.array_equal(images, pc.photo_queries(6, 4, seed=1, corpus=corpus)[0])
    for kind, n in (("seen", 6), ("unseen", 4)):
        imgs, crops = pc.query_crops(photos, n, kind, seed=0)
        assert [c.source for c in crops] == (names[:6] if kind == "seen" else names[6:])
        for img, c in zip(imgs, crops):
            p = by_name[c.photo]
            assert p.heldout.contains(c.footprint())
            assert (c.photo in manifest["heldout_photos"]) == (kind == "unseen")
            if kind == "seen":
                assert not p.train.intersects(c.footprint())
            assert np.array_equal(pc.cut(p, c, "heldout", 32), img)
    train_shas = set(pq.read_table(shards(corpus), columns=["sha"]).column("sha").to_pylist())
    assert not any(hashlib.blake2b(q.tobytes(), digest_size=16).digest() in train_shas for q in images)


def test_package_shares_are_equal_per_photo_and_capped(corpus):
    """Five fake packages with 8, 3, 2, 2 and 1 training photos (plus a held-out one): per photo the
    shares would be 1/2, 3/16, 1/8, 1/8, 1/16; "stars" is held to the cap, which then lifts "big"
    past it too, and the rest is spread over the other three by their photo counts."""
    manifest, real = pc.load_corpus(corpus)
    assert manifest["package_share_cap"] == pc.PACKAGE_CAP == 0.25
    assert manifest["package_shares"] == {"local": {"photos": len(PHOTOS) - 1, "share": 1.0}}
    train = [p for p in real if p.train is not None]
    counts = {"stars": 8, "big": 3, "b": 2, "c": 2, "d": 1}
    photos = [pc.CorpusPhoto(f"{pkg}/{i}", pkg, src.pixels, src.train, src.heldout)
              for pkg, n in counts.items() for i, src in zip(range(n), [train[j % len(train)] for j in range(n)])]
    held = next(p for p in real if p.unseen)
    photos.append(pc.CorpusPhoto("stars/held", "stars", held.pixels, None, held.heldout))
    expected = {"stars": 0.25, "big": 0.25, "b": 0.2, "c": 0.2, "d": 0.1}
    shares = pc.package_shares([p.package for p in photos if p.train is not None])
    assert shares.keys() == expected.keys() and all(shares[k] == pytest.approx(v) for k, v in expected.items())
    w = pc.train_weights(photos)
    assert w.sum() == pytest.approx(1.0) and w[-1] == 0.0  # the held-out photo is never cut
    for pkg, n in counts.items():  # equal within a package, summing to its share
        pw = [wi for p, wi in zip(photos, w) if p.package == pkg and p.train is not None]
        assert pw == pytest.approx([expected[pkg] / n] * n)
    # without a binding cap every photo is equally likely; with fewer than 1 / cap packages, equal shares
    assert pc.package_shares(["a"] * 3 + ["b"] * 2 + ["c"] * 2 + ["d"] * 2 + ["e"], cap=0.5) == pytest.approx(
        {"a": 0.3, "b": 0.2, "c": 0.2, "d": 0.2, "e": 0.1})
    assert pc.package_shares(["a"] * 5 + ["b"]) == pytest.approx({"a": 0.5, "b": 0.5})
    # the crops written follow the shares (flat crops are redrawn from the same photo)
    n = 2000
    stream = pc.iter_train_crops(photos, (0, 0))
    got = [next(stream)[1].photo.split("/")[0] for _ in range(n)]
    for pkg, share in expected.items():
        sd = (share * (1 - share) / n) ** 0.5
        assert abs(got.count(pkg) / n - share) < 4 * sd, (pkg, got.count(pkg))
    # queries still take one photo from each package in turn ("d" has one photo: it drops out after a round)
    _, crops = pc.query_crops(photos, 9, "seen", seed=0)
    pkgs = [c.photo.split("/")[0] for c in crops]
    assert sorted(pkgs[:5]) == sorted(counts) and sorted(pkgs[5:]) == sorted(set(counts) - {"d"})


def test_corpus_refuses_a_changed_photo(corpus, tmp_path):
    import shutil

    copy = tmp_path / "tampered"
    shutil.copytree(corpus, copy)
    victim = next((copy / "photos").iterdir())
    pixels = np.asarray(Image.open(victim)).copy()
    pixels[0, 0] ^= 1
    Image.fromarray(pixels).save(victim)
    with pytest.raises(ValueError, match="differs"):
        pc.load_corpus(copy)
