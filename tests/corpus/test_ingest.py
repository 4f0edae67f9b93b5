"""End-to-end ingest: formats, skips, errors, atomic publication, resume after a kill, the CLI."""
from __future__ import annotations

import importlib
import io
import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import Image

from nda_ann.cli import main
from nda_ann.errors import InputError, StoreError
from nda_ann.corpus.ingest import ingest
from nda_ann.corpus.store import Store

ingest_mod = importlib.import_module("nda_ann.corpus.ingest")  # the package exports a function of the same name

R = 8
REPO = Path(__file__).resolve().parents[2]


def run(src, store, **kw) -> Store:
    kw.setdefault("workers", 1)
    kw.setdefault("progress", False)
    return ingest(src, store, kw.pop("resolution", R), **kw)


def noise(rng, h: int, w: int, c: int = 3) -> Image.Image:
    arr = rng.integers(0, 256, (h, w, c), dtype=np.uint8)
    return Image.fromarray(arr[:, :, 0] if c == 1 else arr)


def make_folder(root: Path, rng, n: int = 10, bad: bool = True) -> Path:
    """n noise PNGs of assorted sizes under nested folders, plus a corrupt and an empty file."""
    root.mkdir(parents=True)
    for i in range(n):
        sub = root / f"d{i % 3}"
        sub.mkdir(exist_ok=True)
        noise(rng, R + i, R + 2 * i).save(sub / f"{i:02d}.png")
    if bad:
        (root / "d1" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
        (root / "empty.png").write_bytes(b"")
    return root


def same_store(a: Store, b: Store) -> bool:
    return (Path(a.path, "images.u8").read_bytes() == Path(b.path, "images.u8").read_bytes()
            and a.records().equals(b.records()) and a.manifest["skipped"] == b.manifest["skipped"]
            and a.fingerprint == b.fingerprint)


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


# ---- formats ----------------------------------------------------------------------------------

def test_mixed_formats_folder(tmp_path, rng):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    exact = rng.integers(0, 256, (R, R, 3), dtype=np.uint8)
    Image.fromarray(exact).save(src / "a.png")
    noise(rng, 20, 12).save(src / "b.jpg", quality=90)
    noise(rng, 12, 12).save(src / "sub" / "c.webp", lossless=True)
    noise(rng, 9, 30).save(src / "sub" / "d.bmp")
    noise(rng, 4, 5).save(src / "sub" / "e.tiff")  # smaller than R: upscaled
    frames = [Image.new("RGB", (10, 10), (255, 0, 0)), Image.new("RGB", (10, 10), (0, 0, 255))]
    frames[0].save(src / "f.gif", save_all=True, append_images=frames[1:])
    rotated = Image.new("RGB", (2 * R, R), 0)
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated.save(src / "g.jpg", exif=exif.tobytes())
    (src / "captions.txt").write_text("ignored")

    st = run(src, tmp_path / "store")
    assert st.sources() == ["a.png", "b.jpg", "f.gif", "g.jpg", "sub/c.webp", "sub/d.bmp", "sub/e.tiff"]
    assert st.images.shape == (7, R, R, 3)
    assert np.array_equal(st.images[0], exact)  # R x R input: not resampled
    assert (st.images[2] == (255, 0, 0)).all()  # GIF: first frame
    rec = st.records().to_pydict()
    assert (rec["orig_width"][3], rec["orig_height"][3]) == (R, 2 * R)  # EXIF orientation applied
    assert (rec["orig_width"][1], rec["orig_height"][1]) == (12, 20)
    m = st.manifest
    assert m["upscaled"] == 1 and m["skipped"] == [] and m["source"]["ignored_files"] == {".txt": 1}
    assert m["transform"]["filter"] == "lanczos" and m["transform"]["alpha"] == "composited on white"
    t = st.tensor(slice(0, 1))
    assert t.shape == (1, 3, R, R) and float(t.min()) >= -1 and float(t.max()) <= 1
    assert leftovers(tmp_path) == []


def test_grayscale_store(tmp_path, rng):
    src = make_folder(tmp_path / "src", rng, n=3, bad=False)
    st = run(src, tmp_path / "store", channels=1)
    assert st.images.shape == (3, R, R, 1) and st.channels == 1 and st.tensor().shape == (3, 1, R, R)


def test_parquet_hf_struct_and_binary(tmp_path, rng):
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    pix = [rng.integers(0, 256, (R, R), dtype=np.uint8) for _ in range(4)]
    cells = [{"bytes": _png(Image.fromarray(p)), "path": f"img{i}.png"} for i, p in enumerate(pix)]
    cells[2] = None
    table = pa.table({"image": pa.array(cells, struct), "label": [0, 1, 2, 3], "text": ["a", "b", None, "d"]})
    pq.write_table(table, tmp_path / "hf.parquet", row_group_size=2)
    st = run(tmp_path / "hf.parquet", tmp_path / "s1", channels=1, batch_size=3)
    assert st.count == 3 and np.array_equal(st.images[:, :, :, 0], np.stack([pix[0], pix[1], pix[3]]))
    rec = st.records().to_pydict()
    assert rec["label"] == [0, 1, 3] and rec["text"] == ["a", "b", "d"] and rec["image_path"] == ["img0.png", "img1.png", "img3.png"]
    assert rec["source"] == ["hf.parquet#0", "hf.parquet#1", "hf.parquet#3"]
    assert st.manifest["skipped"] == [{"source": "hf.parquet#2", "reason": "null image in column 'image'"}]

    binary = pa.table({"key": ["x", "y"], "png": [_png(Image.fromarray(pix[0])), _png(Image.fromarray(pix[1]))]})
    pq.write_table(binary, tmp_path / "bin.parquet")
    st = run(tmp_path / "bin.parquet", tmp_path / "s2", source_column="key")
    assert st.sources() == ["x", "y"] and st.records().column_names == ["row_id", "source", "orig_width", "orig_height", "content_hash"]
    assert np.array_equal(st.images[1], np.repeat(pix[1][:, :, None], 3, axis=2))


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def test_npy_rgb_and_grayscale(tmp_path, rng):
    rgb = rng.integers(0, 256, (5, R, R, 3), dtype=np.uint8)
    np.save(tmp_path / "rgb.npy", rgb)
    st = run(tmp_path / "rgb.npy", tmp_path / "s1", batch_size=2)
    assert np.array_equal(np.asarray(st.images), rgb) and st.sources()[4] == "rgb.npy[4]"
    gray = rng.integers(0, 256, (3, 2 * R, 2 * R), dtype=np.uint8)
    np.save(tmp_path / "gray.npy", gray)
    st = run(tmp_path / "gray.npy", tmp_path / "s2", channels=1)
    assert st.images.shape == (3, R, R, 1) and st.records().column("orig_width").to_pylist() == [2 * R] * 3
    np.save(tmp_path / "bad.npy", rgb.astype(np.float32))
    with pytest.raises(InputError, match="bad.npy: array dtype is float32"):
        run(tmp_path / "bad.npy", tmp_path / "s3")


# ---- skips, errors, duplicates ----------------------------------------------------------------

def test_bad_inputs_are_skipped_and_recorded(tmp_path, rng):
    src = make_folder(tmp_path / "src", rng, n=4)
    png = _png(noise(rng, 40, 40))
    (src / "truncated.png").write_bytes(png[: len(png) // 2])
    (src / "text.png").write_text("hello")
    st = run(src, tmp_path / "store")
    assert st.count == 4
    reasons = {s["source"]: s["reason"] for s in st.manifest["skipped"]}
    assert set(reasons) == {"d1/broken.jpg", "empty.png", "truncated.png", "text.png"}
    assert "empty file" in reasons["empty.png"] and "truncated" in reasons["truncated.png"]
    assert "not a readable image" in reasons["text.png"]


def test_on_error_raise_names_the_file_then_skip_resumes(tmp_path, rng):
    src = make_folder(tmp_path / "src", rng, n=4)
    with pytest.raises(InputError) as err:
        run(src, tmp_path / "store", on_error="raise")
    assert err.value.path == str(src / "d1" / "broken.jpg") and "corrupt or truncated" in err.value.problem
    assert not (tmp_path / "store").exists()
    assert run(src, tmp_path / "store").count == 4  # the same signature: continues with skipping
    assert leftovers(tmp_path) == []


def test_decompression_bomb_is_a_recorded_skip(tmp_path, rng):
    src = make_folder(tmp_path / "src", rng, n=2, bad=False)
    noise(rng, 40, 40).save(src / "huge.png")
    st = run(src, tmp_path / "store", max_pixels=1000)
    assert st.count == 2 and "decompression bomb" in st.manifest["skipped"][0]["reason"]


def test_empty_folder_and_all_skipped_publish_nothing(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no image files") as err:
        run(tmp_path / "empty", tmp_path / "store")
    assert err.value.path == str(tmp_path / "empty")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"junk")
    with pytest.raises(InputError, match="no usable images"):
        run(tmp_path / "bad", tmp_path / "store")
    assert not (tmp_path / "store").exists() and leftovers(tmp_path) == []


def test_duplicate_files_are_kept_and_counted(tmp_path, rng):
    src = make_folder(tmp_path / "src", rng, n=3, bad=False)
    data = (src / "d0" / "00.png").read_bytes()
    (src / "copy1.png").write_bytes(data)
    (src / "copy2.png").write_bytes(data)
    st = run(src, tmp_path / "store")
    assert st.count == 5
    assert st.manifest["duplicates"] | {"hash": ""} == {"policy": "kept", "hash": "", "groups": 1, "rows_in_groups": 3, "extra_copies": 2}
    hashes = st.records().column("content_hash").to_pylist()
    assert len(set(hashes)) == 3


# ---- publication ------------------------------------------------------------------------------

def test_existing_store_needs_overwrite(tmp_path, rng):
    src = make_folder(tmp_path / "src", rng, n=3, bad=False)
    st = run(src, tmp_path / "store")
    before = (tmp_path / "store" / "manifest.json").read_bytes()
    with pytest.raises(StoreError, match="already exists"):
        run(src, tmp_path / "store", resolution=4)
    assert (tmp_path / "store" / "manifest.json").read_bytes() == before and leftovers(tmp_path) == []
    st = run(src, tmp_path / "store", resolution=4, overwrite=True)
    assert st.resolution == 4 and Store.open(tmp_path / "store", verify=True).count == 3
    assert leftovers(tmp_path) == []


# ---- resume -----------------------------------------------------------------------------------

class Interrupted(Exception):
    pass


def interrupt_at(monkeypatch, batch: int) -> None:
    def hook(number: int) -> None:
        if number == batch:
            raise Interrupted  # after the batch's data is written, before its checkpoint
    monkeypatch.setattr(ingest_mod, "_before_checkpoint", hook)


def test_resume_equals_uninterrupted_run(tmp_path, rng, monkeypatch, caplog):
    src = make_folder(tmp_path / "src", rng, n=10)
    ref = run(src, tmp_path / "ref", batch_size=3)
    interrupt_at(monkeypatch, 2)
    with pytest.raises(Interrupted):
        run(src, tmp_path / "store", batch_size=3)
    assert not (tmp_path / "store").exists()
    partial = tmp_path / ".store.ingest-partial"
    saved = json.loads((partial / "checkpoint.json").read_text())["progress"]
    assert saved["inputs_done"] == 6 and (partial / "store" / "images.u8").stat().st_size > saved["rows"] * R * R * 3
    monkeypatch.undo()
    with caplog.at_level(logging.INFO, logger="nda_ann.corpus.ingest"):
        st = run(src, tmp_path / "store", batch_size=4, workers=2)  # batch size and workers may change
    assert "resuming an interrupted ingest at input 6" in caplog.text
    assert same_store(st, ref) and not partial.exists()


def test_changed_arguments_start_over(tmp_path, rng, monkeypatch, caplog):
    src = make_folder(tmp_path / "src", rng, n=6, bad=False)
    interrupt_at(monkeypatch, 1)
    with pytest.raises(Interrupted):
        run(src, tmp_path / "store", batch_size=2)
    monkeypatch.undo()
    with caplog.at_level(logging.WARNING, logger="nda_ann.corpus.ingest"):
        st = run(src, tmp_path / "store", channels=1, batch_size=2)
    assert "changed since the interrupted ingest; starting over" in caplog.text
    assert same_store(st, run(src, tmp_path / "ref", channels=1))


def test_resume_after_sigkill(tmp_path, rng):
    src = make_folder(tmp_path / "src", rng, n=8)
    store = tmp_path / "store"
    code = (
        "import importlib, os, signal\nm = importlib.import_module('nda_ann.corpus.ingest')\n"
        "def hook(n):\n"
        "    if n == 2: os.kill(os.getpid(), signal.SIGKILL)\n"
        "m._before_checkpoint = hook\n"
        f"m.ingest({str(src)!r}, {str(store)!r}, {R}, workers=1, batch_size=3, progress=False)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    assert not store.exists() and (tmp_path / ".store.ingest-partial" / "checkpoint.json").is_file()
    assert same_store(run(src, store, batch_size=5), run(src, tmp_path / "ref"))


# ---- CLI --------------------------------------------------------------------------------------

def test_cli_ingest_and_store_info(tmp_path, rng):
    src = make_folder(tmp_path / "src", rng, n=3)
    store = tmp_path / "store"
    runner = CliRunner()
    args = ["ingest", str(src), str(store), "-r", str(R), "--workers", "1", "--no-progress"]
    res = runner.invoke(main, args)
    assert res.exit_code == 0, res.output
    assert f"3 images of {R}x{R}x3; skipped 2" in res.output
    res = runner.invoke(main, ["store-info", str(store), "--verify", "--skipped"])
    assert res.exit_code == 0, res.output
    assert "images:          3" in res.output and f"bytes per image: {R * R * 3}" in res.output
    assert "skipped inputs:  2" in res.output and "skipped  empty.png: empty file (0 bytes)" in res.output
    res = runner.invoke(main, args)
    assert res.exit_code == 1 and "already exists" in res.output and "Traceback" not in res.output
    res = runner.invoke(main, ["ingest", str(src), str(tmp_path / "s2"), "-r", str(R), "--on-error", "raise", "--no-progress"])
    assert res.exit_code == 1 and "broken.jpg" in res.output
    res = runner.invoke(main, ["store-info", str(tmp_path / "nowhere")])
    assert res.exit_code == 1 and "no such store folder" in res.output
