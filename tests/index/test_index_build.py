"""Index build: layout classes, auto choice, manifest, resume after SIGKILL, add, refusals, CLI."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from nda_ann.errors import IndexError_, InputError, NdaError
from nda_ann.index import PatchIndex, add_to_index, build_index, class_layouts, parse_memory
from nda_ann.index.factory import auto_nlist, class_specs
from nda_ann.scoring.patches import extract_patches, layout_groups
from nda_ann.scoring.scales import Scale
from nda_ann.corpus.store import write_store

SCALES = ["5", "6:2"]


def images(seed: int, n: int, size: int = 12) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def queries(size: int = 12) -> np.ndarray:
    return images(99, 2, size).transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1


def results(index: PatchIndex, k: int = 5) -> list[tuple[np.ndarray, ...]]:
    out = []
    for s in index.scales:
        q = extract_patches(torch.from_numpy(queries(index.resolution)), s).numpy()
        out.append(index.search(s, q, k))
    return out


def assert_same_results(a: PatchIndex, b: PatchIndex) -> None:
    for (da, ia, pa), (db, ib, pb) in zip(results(a), results(b)):
        np.testing.assert_allclose(da, db, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(ia, ib)
        np.testing.assert_array_equal(pa, pb)


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("stores")
    a, b = images(1, 24), images(2, 16)
    return {"a": write_store(root / "a", a), "b": write_store(root / "b", b),
            "ab": write_store(root / "ab", np.concatenate([a, b])),
            "small": write_store(root / "small", images(3, 5, size=8))}


# layout classes and the auto choice ------------------------------------------------------------

@pytest.mark.parametrize("size,scale,stride", [(12, "5", 1), (12, "6:2", 1), (32, "7", 2), (32, "14:2", 3)])
def test_layout_classes_partition_the_grid_and_keep_every_class(size, scale, stride):
    s = Scale.parse(scale)
    layouts = class_layouts(size, s, stride)
    allpos = np.concatenate([c.positions for c in layouts])
    assert sorted(allpos.tolist()) == list(range(s.grid(size) ** 2))
    assert [c.key for c in layouts] == [g.key for g in layout_groups(size, s)]
    assert all(c.width >= 1 and set(c.indexed) <= set(c.positions) for c in layouts)
    ids = np.arange(3 * layouts[0].width)
    img, pos = layouts[0].decode(ids)
    assert img.tolist() == [i // layouts[0].width for i in ids] and set(pos) <= set(layouts[0].indexed)
    if stride == 1:
        assert all(np.array_equal(c.indexed, c.positions) for c in layouts)


def test_auto_choice_by_class_size_and_budget():
    g8 = parse_memory("8G")
    assert parse_memory("512M") == 512 << 20 and parse_memory("1.5g") == int(1.5 * (1 << 30)) and parse_memory(100) == 100
    # a scale whose float32 vectors fit in B/2: exact up to 65,536 vectors per class, IVF-Flat above
    small, edge, mid = class_specs([65_536, 130_000, 3_000_000], 147, g8)
    assert small.factory == "Flat" and small.exact
    assert edge.factory == "IVF1024,Flat" and edge.nprobe == 32 and not edge.exact
    assert mid.tier == "ivf-flat" and mid.nlist == auto_nlist(3_000_000) == 8192 and 39 * mid.nlist <= mid.train_size
    assert mid.factory == "IVF8192_HNSW32,Flat" and mid.nprobe == 32
    # 100k images of 32x32 at 14:2: 144 corner classes of 100k, 24 edges of 1.9M, interior 36.1M
    specs = class_specs([100_000] * 144 + [1_900_000] * 24 + [36_100_000], 147, g8)
    # 144 x 59 MB of Flat would exceed B/4; SQ8 codes padded to 160 dims for FAISS's SIMD scan
    assert {s.factory for s in specs[:144]} == {"Pad160,IVF1024,SQ8"}
    assert specs[144].tier == "ivf-sq8" and specs[144].code_bytes == 168
    big = specs[-1]
    assert big.tier == "ivf-pq" and big.factory == "PCA64,IVF32768_HNSW32,PQ32np" and big.code_bytes == 40
    # at p = 7 and 50k images the 36 corner classes (1.1 GB of float32) fit in B/4 and stay exact
    p7 = class_specs([50_000] * 36 + [1_300_000] * 12 + [33_800_000], 147, g8)
    assert {s.factory for s in p7[:36]} == {"Flat"} and p7[36].factory == "Pad160,IVF4096_HNSW32,SQ8"
    # a dimension already a multiple of 16 is not padded (p = 4 with f = 2: 2 x 2 x 3 = 12 -> 16; 8:2 -> 48)
    assert class_specs([3_000_000], 48, 1 << 20)[0].factory == "IVF8192_HNSW32,SQ8"
    assert class_specs([1000], 147, g8, "IVF1024,Flat")[0].factory == "Flat"  # too few to train 1024 lists
    # a pixel-grid scale (f = 1): lossless pixel codes instead of IVF-Flat or lossy SQ8, same for both budgets
    for budget in (g8, 1 << 30):
        small, edge, mid = class_specs([65_536, 130_000, 3_000_000], 147, budget, pixel_grid=True)
        assert edge.factory == "Pad160,IVF1024,SQ8pixel" and mid.factory == "Pad160,IVF8192_HNSW32,SQ8pixel"
        assert mid.tier == "ivf-sq8-pixel" and mid.code_bytes == 168 and not mid.exact
    assert class_specs([65_536], 147, g8, pixel_grid=True)[0].factory == "Flat"
    with pytest.raises(InputError, match="factor 1"):
        class_specs([3_000_000], 147, g8, "IVF1024,SQ8pixel")
    for bad in ("PCA64,IVF1024,SQ8pixel", "SQ8pixel", "IVF1024,SQ8pixel,Refine(Flat)"):
        with pytest.raises(InputError, match="SQ8pixel|unknown"):
            class_specs([3_000_000], 147, g8, bad, pixel_grid=True)
    with pytest.raises(InputError, match="unknown or unusable FAISS factory"):
        class_specs([1000], 147, g8, "IVF12,Blah")
    with pytest.raises(InputError, match="not a memory size"):
        parse_memory("lots")


# build, manifest, refusals ------------------------------------------------------------------------

def test_manifest_records_what_was_built(stores, tmp_path):
    index = build_index(stores["a"], tmp_path / "ix", SCALES, candidate_stride=2, progress=False)
    m = json.loads((tmp_path / "ix" / "manifest.json").read_text())
    assert m["format"] == "nda-ann-index" and m["schema_version"] == 1
    assert set(m["versions"]) >= {"nda_ann", "faiss", "torch"} and m["device"] == "cpu"
    assert m["resolution"] == 12 and m["channels"] == 3 and m["count"] == 24
    assert m["stores"][0]["fingerprint"] == stores["a"].fingerprint and m["stores"][0]["offset"] == 0
    assert Path(m["stores"][0]["path"]).is_absolute() and not Path(m["stores"][0]["path_relative"]).is_absolute()
    for entry in m["scales"]:
        assert entry["candidate_stride"] == 2 and "candidate_grid" in entry["stride_rule"]
        assert set(entry["factories"]) == {"interior", "edge", "corner"}
        for c in entry["classes"]:
            assert {"factory", "nlist", "nprobe", "code_bytes", "train_size", "indexed", "positions"} <= set(c)
        assert sum(entry["shards"][0]["ntotal"]) == 24 * sum(c["indexed"] for c in entry["classes"])
        assert any("candidate stride 2" in a for a in entry["approximations"])
    assert index.store_paths() == [stores["a"].path.resolve()]
    assert m["history"][0]["op"] == "build" and m["build_seconds"] >= 0 and m["index_id"]


def test_an_existing_index_needs_overwrite(stores, tmp_path):
    build_index(stores["small"], tmp_path / "ix", ["3"], progress=False)
    with pytest.raises(IndexError_, match="already exists"):
        build_index(stores["small"], tmp_path / "ix", ["3"], progress=False)
    again = build_index(stores["small"], tmp_path / "ix", ["5"], overwrite=True, progress=False)
    assert [str(s) for s in again.scales] == ["5"]


def test_a_bare_name_lands_under_indexes(stores, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    index = build_index(stores["small"], "tiny", ["3"], progress=False)
    assert index.path == Path("indexes") / "tiny" and (tmp_path / "indexes" / "tiny" / "manifest.json").is_file()
    assert PatchIndex.open("tiny").count == 5


def test_missing_or_truncated_shard_files_are_refused_on_open(stores, tmp_path):
    build_index(stores["small"], tmp_path / "ix", ["3"], progress=False)
    f = tmp_path / "ix" / "scale-3" / "shard-000" / "class-004.faiss"
    data = f.read_bytes()
    f.write_bytes(data[:-10])
    with pytest.raises(IndexError_, match="truncated"):
        PatchIndex.open(tmp_path / "ix")
    f.unlink()
    with pytest.raises(IndexError_, match="missing index file"):
        PatchIndex.open(tmp_path / "ix")
    with pytest.raises(IndexError_, match="manifest.json is missing"):
        PatchIndex.open(tmp_path / "ix" / "scale-3")


def test_unknown_factory_is_a_clear_error(stores, tmp_path):
    with pytest.raises(NdaError, match="unknown or unusable FAISS factory string 'IVFfoo'"):
        build_index(stores["small"], tmp_path / "ix", ["3"], factory="IVFfoo", progress=False)
    assert not (tmp_path / "ix").exists()


# resume after SIGKILL ---------------------------------------------------------------------------------

def test_a_build_killed_after_its_first_shard_resumes_to_the_same_index(stores, tmp_path):
    args = dict(memory_budget="600K", progress=False)
    code = ("import sys\nfrom nda_ann.index import build_index\n"
            f"build_index(sys.argv[1], sys.argv[2], {SCALES!r}, memory_budget='600K', progress=False)")
    env = dict(os.environ, NDA_ANN_TEST_KILL_AFTER_SHARDS="1")
    proc = subprocess.run([sys.executable, "-c", code, str(stores["a"].path), str(tmp_path / "ix")], env=env)
    assert proc.returncode == -signal.SIGKILL
    staging = tmp_path / ".ix.building"
    assert (staging / "scale-5" / "shard-000" / "shard.json").is_file()
    assert not (staging / "scale-5" / "shard-001").exists()
    with pytest.raises(IndexError_):
        PatchIndex.open(tmp_path / "ix")  # nothing half-written is published
    resumed = build_index(stores["a"], tmp_path / "ix", SCALES, **args)
    assert not staging.exists()
    whole = build_index(stores["a"], tmp_path / "whole", SCALES, **args)
    assert resumed.manifest["scales"][0]["shards"] == whole.manifest["scales"][0]["shards"]
    assert len(whole.manifest["scales"][0]["shards"]) > 1
    assert_same_results(resumed, whole)


def test_a_staging_folder_from_other_settings_is_discarded(stores, tmp_path):
    stale = tmp_path / ".ix.building"
    (stale / "scale-3" / "shard-000").mkdir(parents=True)
    (stale / "plan.json").write_text('{"other": 1}')
    index = build_index(stores["small"], tmp_path / "ix", ["3"], progress=False)
    assert index.count == 5 and not stale.exists()


# add ------------------------------------------------------------------------------------------------

def test_add_then_search_equals_building_all_at_once(stores, tmp_path):
    build_index(stores["a"], tmp_path / "ix", SCALES, progress=False)
    added = add_to_index(tmp_path / "ix", stores["b"], progress=False)
    whole = build_index(stores["ab"], tmp_path / "whole", SCALES, progress=False)
    assert added.count == 40 and [s["offset"] for s in added.manifest["stores"]] == [0, 24]
    assert added.store_paths() == [stores["a"].path.resolve(), stores["b"].path.resolve()]
    assert_same_results(added, whole)
    store_idx, row = added.locate(np.array([0, 23, 24, 39, -1]))
    assert store_idx.tolist() == [0, 0, 1, 1, -1] and row.tolist() == [0, 23, 0, 15, -1]
    assert [h["op"] for h in added.manifest["history"]] == ["build", "add"]


@pytest.mark.parametrize("factory", ["IVF16,Flat", "IVF16,SQ8pixel"])
def test_add_to_an_ivf_index_reuses_its_templates_and_finds_the_new_images(stores, tmp_path, factory):
    """Also for pixel codes: the added images' own patches come back at distance 0 (lossless)."""
    build_index(stores["a"], tmp_path / "ix", ["5"], factory=factory, progress=False)
    added = add_to_index(tmp_path / "ix", stores["b"], progress=False)
    entry = added.manifest["scales"][0]
    assert any(c["nlist"] == 16 for c in entry["classes"]) and [s["first_image"] for s in entry["shards"]] == [0, 24]
    s = Scale(5)
    own = extract_patches(stores["b"].tensor(slice(3, 4)), s).numpy()  # image 3 of store b = global id 27
    dist, image, pos = added.search(s, own, k=1)
    assert np.allclose(dist[..., 0], 0, atol=1e-4)
    assert (image[..., 0] == 27).all() and (pos[..., 0] == np.arange(s.grid(12) ** 2)).all()


def test_an_incompatible_add_is_refused_and_changes_nothing(stores, tmp_path):
    build_index(stores["a"], tmp_path / "ix", ["5"], progress=False)
    before = {p: p.read_bytes() for p in (tmp_path / "ix").rglob("*") if p.is_file()}
    with pytest.raises(IndexError_, match="incompatible store"):
        add_to_index(tmp_path / "ix", stores["small"], progress=False)
    with pytest.raises(IndexError_, match="already in the index"):
        add_to_index(tmp_path / "ix", stores["a"], progress=False)
    after = {p: p.read_bytes() for p in (tmp_path / "ix").rglob("*") if p.is_file()}
    assert before == after
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ix"] or all(
        not p.name.startswith(".ix.add") for p in tmp_path.iterdir())


# CLI --------------------------------------------------------------------------------------------

def test_cli_build_add_info(stores, tmp_path):
    from nda_ann.cli import index_cmd  # noqa: F401  registers the commands
    from nda_ann.cli.group import main

    runner = CliRunner()
    ix = str(tmp_path / "ix")
    res = runner.invoke(main, ["build", str(stores["a"].path), ix, "--scale", "5", "-s", "6:2", "--no-progress"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(main, ["add", ix, str(stores["b"].path), "--no-progress"])
    assert res.exit_code == 0 and "40 images in 2 store(s)" in res.output, res.output
    res = runner.invoke(main, ["info", ix])
    assert res.exit_code == 0 and "bytes/vector" in res.output and "scale 6:2" in res.output, res.output
    res = runner.invoke(main, ["add", ix, str(stores["small"].path), "--no-progress"])
    assert res.exit_code != 0 and "incompatible store" in res.output
    res = runner.invoke(main, ["build", str(stores["a"].path), ix, "--scale", "5", "--factory", "Nope", "--overwrite"])
    assert res.exit_code != 0 and "unknown or unusable FAISS factory" in res.output
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(f'store = "{stores["small"].path}"\nindex = "{tmp_path / "from-recipe"}"\nscales = ["3"]\n'
                      'candidate_stride = 2\nclasses = "interior"\n')
    res = runner.invoke(main, ["build", "--recipe", str(recipe), "--no-progress"])
    built = PatchIndex.open(tmp_path / "from-recipe")
    assert res.exit_code == 0 and built.count == 5, res.output
    assert [c.width for c in built.layouts("3") if c.kind != "interior"] == [0] * 8  # 3x3 grid of 8x8: 8 border classes
    res = runner.invoke(main, ["info", str(tmp_path / "from-recipe")])
    assert "only the interior layout class is indexed" in res.output and "thumbnails 5 of 8x8" in res.output, res.output
    res = subprocess.run([sys.executable, "-m", "nda_ann", "build", "--help"], capture_output=True, text=True)
    assert res.returncode == 0 and "--classes [all|interior]" in res.stdout


# GPU --------------------------------------------------------------------------------------------

@pytest.mark.gpu
def test_gpu_build_matches_cpu_build(stores, tmp_path):
    if faiss.get_num_gpus() == 0:
        pytest.skip("FAISS sees no GPU (faiss-cpu installed)")
    gpu = build_index(stores["ab"], tmp_path / "gpu", ["5"], factory="IVF16,Flat", gpu="on", progress=False)
    cpu = build_index(stores["ab"], tmp_path / "cpu", ["5"], factory="IVF16,Flat", gpu="off", progress=False)
    assert gpu.manifest["device"].startswith("gpu") and cpu.manifest["device"] == "cpu"
    (dg, ig, _), = results(gpu, k=3)
    (dc, ic, _), = results(cpu, k=3)
    assert np.mean(ig == ic) > 0.9


def test_thumbnails_are_stored_with_the_index_and_follow_an_add(stores, tmp_path):
    from nda_ann.corpus.inputs import CorpusView
    from nda_ann.corpus.thumbnails import corpus_thumbnails

    index = build_index(stores["a"], tmp_path / "t", ["5"], progress=False)
    first = index.manifest["thumbnails"]["file"]
    np.testing.assert_array_equal(index.thumbnails(), corpus_thumbnails(CorpusView(stores["a"])))
    grown = add_to_index(tmp_path / "t", stores["b"], progress=False)
    np.testing.assert_array_equal(grown.thumbnails(), corpus_thumbnails(CorpusView(stores["ab"])))
    assert (tmp_path / "t" / first).exists()  # the previous manifest's file stays for readers of it
    third = write_store(tmp_path / "c", images(4, 6))
    again = add_to_index(tmp_path / "t", third, progress=False)
    assert not (tmp_path / "t" / first).exists()  # two generations back: pruned
    assert (tmp_path / "t" / grown.manifest["thumbnails"]["file"]).exists()
    np.testing.assert_array_equal(again.thumbnails()[:40], grown.thumbnails())
    (tmp_path / "t" / again.manifest["thumbnails"]["file"]).write_bytes(b"x")  # truncated: refused on open
    with pytest.raises(IndexError_, match="thumbnails"):
        PatchIndex.open(tmp_path / "t")
