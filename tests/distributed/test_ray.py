"""The Ray engine (nda_ann.distributed) against the local one, on real photo crops.

Build: Ray tasks make the same shard files as a local build, also when a worker is killed
mid-range or the driver is killed mid-build. Search: shard actors merged equal one PatchIndex;
attribution through them equals the local attribution; a killed actor is restarted and its call
retried, a slow one is a clear error. Ingest: Ray decoding gives the same store. One 2-CPU local
Ray cluster for the session (conftest ``ray_cluster``); tests that need none run without Ray.
"""
from __future__ import annotations

import filecmp
import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from nda_ann.corpus.inputs import CorpusView
from nda_ann.corpus.store import Store, uint8_to_float, write_store
from nda_ann.distributed.placement import place
from nda_ann.distributed.searcher import merge_topk
from nda_ann.errors import InputError
from nda_ann.index import PatchIndex, build_index
from nda_ann.scoring.patches import extract_patches
from nda_ann.scoring.scales import Scale

BUDGET = "3M"  # 60 crops of 16x16: 5 shards at scale 5, 2 at 6:2


@pytest.fixture(scope="module")
def crops() -> tuple[np.ndarray, np.ndarray]:
    """(60, 16, 16, 3) training and (2, 16, 16, 3) held-out uint8 photo crops."""
    from nda_ann.corpus.demo_corpus import demo_corpus

    dc = demo_corpus(n_train=60, n_queries=2, seed=3)
    half = lambda a: torch.nn.functional.avg_pool2d(torch.from_numpy(a).permute(0, 3, 1, 2).float(), 2)  # noqa: E731
    return tuple(half(a).round().to(torch.uint8).permute(0, 2, 3, 1).numpy() for a in (dc.train, dc.queries))


@pytest.fixture(scope="module")
def store(crops, tmp_path_factory) -> Store:
    return write_store(tmp_path_factory.mktemp("ray") / "store", crops[0])


@pytest.fixture(scope="module")
def queries(crops) -> torch.Tensor:
    return uint8_to_float(crops[1])


@pytest.fixture(scope="module")
def ivf(store) -> PatchIndex:
    """Scale 5, trained IVF templates, 5 shards."""
    return build_index(store, store.path.parent / "ivf", ["5"], factory="IVF4,Flat", memory_budget=BUDGET, progress=False)


@pytest.fixture(scope="module")
def two(store) -> PatchIndex:
    """Scales 5 and 6:2, Flat, 5 and 2 shards."""
    return build_index(store, store.path.parent / "two", ["5", "6:2"], factory="Flat", memory_budget=BUDGET, progress=False)


def same_shards(a: Path, b: Path) -> None:
    """Every shard file (sub-indexes, checkpoints) and template of index ``b`` is byte-identical to ``a``'s."""
    def listing(root: Path) -> list[Path]:
        return sorted(p.relative_to(root) for p in root.rglob("*")
                      if p.is_file() and any(part.startswith("shard-") or part == "trained" for part in p.relative_to(root).parts))

    files = listing(a)
    assert files and listing(b) == files
    for rel in files:
        assert filecmp.cmp(a / rel, b / rel, shallow=False), rel
    ma, mb = PatchIndex.open(a).manifest, PatchIndex.open(b).manifest
    assert [e["shards"] for e in ma["scales"]] == [e["shards"] for e in mb["scales"]]
    assert [e["templates"] for e in ma["scales"]] == [e["templates"] for e in mb["scales"]]


# without Ray: placement, an index opened on some shards, the merge --------------------------------

def test_placement_cuts_contiguous_image_ranges_at_shard_boundaries(two):
    m = two.manifest
    p = place(m, 2)
    assert p.actors == 2 and p.bounds[0] == 0 and p.bounds[-1] == 60
    firsts = {s["first_image"] for s in m["scales"][0]["shards"]}
    assert set(p.bounds[1:-1]) <= firsts and abs(p.bounds[1] - 30) <= 12
    for entry in m["scales"]:
        held = [p.shards[a][entry["scale"]] for a in range(2)]
        assert held[0] + held[1] == [s["id"] for s in entry["shards"]]  # every shard once, in order
        for a, ids in enumerate(held):
            for s in entry["shards"]:
                if s["id"] in ids:
                    assert p.bounds[a] <= s["first_image"] < p.bounds[a + 1]
    assert p.owner(np.array([0, p.bounds[1] - 1, p.bounds[1], 59])).tolist() == [0, 0, 1, 1]
    assert place(m, 50).actors == 5  # at most one actor per shard of the most-sharded scale
    with pytest.raises(InputError):
        place(m, 0)


def test_an_index_opened_on_some_shards_searches_only_them_and_merges_to_the_whole(two, queries):
    p = place(two.manifest, 3)
    parts = [PatchIndex.open(two.path, shards=p.shards[a]) for a in range(3)]
    for scale in two.scales:
        x = extract_patches(queries, scale).numpy()
        for k in (4, 40):
            got = [ix.search(scale, x, k) for ix in parts]
            entry = next(e for e in two.manifest["scales"] if e["scale"] == str(scale))
            for a, (_, image, _) in enumerate(got):
                mine = np.zeros(two.count, bool)  # the images of this actor's shards at this scale
                for sh in entry["shards"]:
                    if sh["id"] in p.shards[a][str(scale)]:
                        mine[sh["first_image"]: sh["first_image"] + sh["images"]] = True
                assert mine[image[image >= 0]].all() and (image >= 0).any() == mine.any()
            want = two.search(scale, x, k)
            merged = merge_topk([g for a, g in enumerate(got) if p.shards[a][str(scale)]], want[0].shape[-1])
            for w, m in zip(want, merged):
                np.testing.assert_array_equal(w, m)
    with pytest.raises(InputError, match="no shard"):
        PatchIndex.open(two.path, shards={"5": [99]})
    with pytest.raises(InputError, match="no scale"):
        PatchIndex.open(two.path, shards={"7": [0]})


def test_nda_errors_cross_processes_as_themselves():
    import pickle

    from nda_ann.distributed import DistributedError
    from nda_ann.errors import IndexError_

    for err in (IndexError_("/x/ix", "missing index file"), DistributedError(None, "no answer")):
        back = pickle.loads(pickle.dumps(err))
        assert type(back) is type(err) and (back.path, back.problem, str(back)) == (err.path, err.problem, str(err))


def test_nda_ann_imports_without_ray():
    code = ("import sys; sys.modules['ray'] = None\n"
            "import nda_ann, nda_ann.cli, nda_ann.distributed\n"
            "from nda_ann.distributed import DistributedError, open_ray_attributor\n"
            "from nda_ann.distributed.cluster import connect\n"
            "try:\n    connect()\nexcept DistributedError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "pip install 'nda-ann[ray]'" in out.stdout


# build -----------------------------------------------------------------------------------------

def test_ray_build_makes_the_same_shards_as_a_local_build(ray_cluster, store, ivf, tmp_path):
    built = build_index(store, tmp_path / "ix", ["5"], factory="IVF4,Flat", memory_budget=BUDGET, progress=False,
                        engine="ray", address=ray_cluster, workers=2)
    assert len(built.manifest["scales"][0]["shards"]) == 5 and built.manifest["scales"][0]["templates"]
    assert built.manifest["history"][-1]["engine"] == "ray"
    same_shards(ivf.path, built.path)


def test_a_worker_killed_mid_range_is_retried_and_the_shards_are_unchanged(ray_cluster, store, ivf, tmp_path, monkeypatch):
    marker = tmp_path / "killed"
    monkeypatch.setenv("NDA_ANN_TEST_RAY_KILL_ONCE", str(marker))
    built = build_index(store, tmp_path / "ix", ["5"], factory="IVF4,Flat", memory_budget=BUDGET, progress=False,
                        engine="ray", workers=2)
    with pytest.raises(ProcessLookupError):  # that worker died after its first batch; Ray ran its range again
        os.kill(int(marker.read_text()), 0)
    same_shards(ivf.path, built.path)


def test_a_driver_killed_mid_build_resumes_from_its_finished_shards(ray_cluster, store, ivf, tmp_path, caplog):
    code = ("import sys, ray\nray.init(address=sys.argv[3], log_to_driver=False)\n"
            "from nda_ann.index import build_index\n"
            f"build_index(sys.argv[1], sys.argv[2], ['5'], factory='IVF4,Flat', memory_budget='{BUDGET}', progress=False, "
            "engine='ray', workers=1)")
    env = dict(os.environ, NDA_ANN_TEST_KILL_AFTER_SHARDS="2")
    proc = subprocess.run([sys.executable, "-c", code, str(store.path), str(tmp_path / "ix"), ray_cluster], env=env, timeout=300)
    assert proc.returncode == -signal.SIGKILL
    assert (tmp_path / ".ix.building" / "scale-5" / "shard-001" / "shard.json").is_file()
    assert not (tmp_path / "ix").exists()  # nothing half-built is published
    with caplog.at_level("INFO", logger="nda_ann.index"):
        built = build_index(store, tmp_path / "ix", ["5"], factory="IVF4,Flat", memory_budget=BUDGET, progress=False,
                            engine="ray", workers=2)
    assert sum("already built, reused" in r.getMessage() for r in caplog.records) >= 2
    same_shards(ivf.path, built.path)


def test_cli_build_with_the_ray_engine(ray_cluster, store, two, tmp_path):
    from nda_ann.cli import main

    res = CliRunner().invoke(main, ["build", str(store.path), str(tmp_path / "ix"), "--scale", "5", "--scale", "6:2",
                                    "--factory", "Flat", "--memory-budget", BUDGET, "--no-progress",
                                    "--engine", "ray", "--address", ray_cluster, "--workers", "2"])
    assert res.exit_code == 0, res.output
    same_shards(two.path, tmp_path / "ix")


# search ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def served(ray_cluster, two):
    """The two-scale index behind 3 shard actors: (searcher, remote corpus)."""
    from nda_ann.distributed import open_ray_searcher

    searcher, corpus = open_ray_searcher(two.path, actors=3)
    yield searcher, corpus
    searcher.close()


def test_ray_search_equals_one_patch_index(served, two, queries):
    searcher, _ = served
    assert searcher.pool.placement.actors == 3
    assert (searcher.count, searcher.scales, searcher.coarse_grid) == (two.count, two.scales, two.coarse_grid)
    assert [searcher.distances_exact(s) for s in two.scales] == [two.distances_exact(s) for s in two.scales]
    for scale in two.scales:
        x = extract_patches(queries, scale).numpy()
        for k in (1, 9, 200):  # 200: past the corner classes (60 vectors), padded with inf / -1
            for want, got in zip(two.search(scale, x, k), searcher.search(scale, x, k)):
                np.testing.assert_array_equal(want, got)
        got_t = searcher.search(scale, torch.from_numpy(x[0]), 5)  # (L, D) tensor in, tensors out
        for want, got in zip(two.search(scale, x[0], 5), got_t):
            assert isinstance(got, torch.Tensor)
            np.testing.assert_array_equal(want, got.numpy())
    with pytest.raises(InputError, match="expected query vectors"):
        searcher.search("5", np.zeros((2, 7, 75), np.float32), 3)


def test_remote_corpus_gives_the_local_pixels_patches_and_sources(served, store):
    _, corpus = served
    local = CorpusView(store)
    ids = np.array([59, 0, 31, 31, 12, 45])
    before = corpus.pool.traffic["pixels"]
    assert torch.equal(corpus.take(ids), local.take(ids))
    assert corpus.pool.traffic["pixels"] - before == len(ids) * 16 * 16 * 3
    assert torch.equal(corpus.rows(18, 42), local.rows(18, 42))
    pos = np.array([0, 17, 255, 100, 3, 60])
    for scale in (Scale(5), Scale(6, 2)):
        assert torch.equal(corpus.patch_vectors(ids, pos, scale), local.patch_vectors(ids, pos, scale))
    assert corpus.sources() == local.sources()
    assert (corpus.count, corpus.shape) == (local.count, local.shape)
    assert corpus.take([]).shape == (0, 3, 16, 16)


# attribution -----------------------------------------------------------------------------------

@pytest.mark.parametrize("which,actors", [("ivf", 3), ("two", 2)])
def test_ray_attribution_equals_local_attribution(ray_cluster, which, actors, ivf, two, queries):
    from nda_ann.attribution.attributor import Attributor
    from nda_ann.distributed import open_ray_attributor

    path = {"ivf": ivf, "two": two}[which].path
    local, remote = Attributor.open(path), open_ray_attributor(path, actors=actors)
    try:
        for kw in ({"candidates": 8, "outside_sample": 16}, {"candidates": 60, "mode": "fast"}):
            want = local.attribute(queries, [100, 300], k=24, **kw)
            got = remote.attribute(queries, [100, 300], k=24, **kw)
            np.testing.assert_allclose(got.scores, want.scores, rtol=1e-6, atol=1e-9)
            assert [got.top(q, 5) for q in range(2)] == [want.top(q, 5) for q in range(2)]
            if want.outside_mass is not None:
                np.testing.assert_allclose(got.outside_mass, want.outside_mass, rtol=1e-6, atol=1e-12)
        traffic = remote.searcher.pool.traffic
        assert min(traffic["vectors"], traffic["results"], traffic["ids"], traffic["pixels"]) > 0
    finally:
        remote.searcher.close()


# faults ----------------------------------------------------------------------------------------

@pytest.fixture
def pool_of_two(ray_cluster, ivf):
    from nda_ann.distributed import open_ray_searcher

    searcher, _ = open_ray_searcher(ivf.path, actors=2, timeout_s=30)
    yield searcher
    searcher.close()


def test_a_killed_actor_is_restarted_and_its_search_retried(pool_of_two, ivf, queries):
    x = extract_patches(queries, Scale(5)).numpy()
    want = ivf.search("5", x, 7)
    old = pool_of_two.pool.info[1]["pid"]
    os.kill(old, signal.SIGKILL)
    for w, g in zip(want, pool_of_two.search("5", x, 7)):
        np.testing.assert_array_equal(w, g)
    new = pool_of_two.pool.call("info", [1], [()])[0]["pid"]
    assert new != old


def test_a_slow_actor_is_a_clear_error_within_the_timeout(pool_of_two, queries):
    from nda_ann.distributed import DistributedError

    x = extract_patches(queries, Scale(5)).numpy()
    pool_of_two.search("5", x, 3)  # warm: sub-indexes loaded
    pool_of_two.pool.call("set_delay", [1], [(20.0,)])
    pool_of_two.pool.timeout_s = 1.5
    t0 = time.perf_counter()
    with pytest.raises(DistributedError, match=r"no answer within 1.5 s from shard actor 1 \(images"):
        pool_of_two.search("5", x, 3)
    assert time.perf_counter() - t0 < 10


def test_an_actor_that_cannot_open_its_store_is_a_clear_error(ray_cluster, crops, tmp_path):
    from nda_ann.distributed import DistributedError, open_ray_searcher

    small = write_store(tmp_path / "store", crops[0][:8])
    build_index(small, tmp_path / "ix", ["5"], factory="Flat", progress=False)
    write_store(tmp_path / "store", crops[0][8:16], overwrite=True)  # re-ingested after the build
    with pytest.raises(DistributedError, match="shard actor 0 .* could not start: .*not the ones indexed"):
        open_ray_searcher(tmp_path / "ix", actors=1, timeout_s=60)


# ingest and the attribute command ----------------------------------------------------------------

def test_ray_ingest_of_parquet_shards_equals_a_local_ingest(ray_cluster, crops, tmp_path):
    from nda_ann.cli import main
    from nda_ann.corpus.ingest import ingest

    src = tmp_path / "parquet"
    src.mkdir()
    for part in range(2):  # two Parquet shards of PNG-encoded crops, one row null
        cells = []
        for img in crops[0][part * 20: part * 20 + 20]:
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="PNG")
            cells.append(buf.getvalue())
        cells[3] = None if part else cells[3]
        pq.write_table(pa.table({"image": pa.array(cells, pa.binary()), "label": list(range(20))}), src / f"part-{part}.parquet")
    local = ingest(src, tmp_path / "local", 12, workers=0, batch_size=8, progress=False)
    res = CliRunner().invoke(main, ["ingest", str(src), str(tmp_path / "ray"), "-r", "12", "--batch-size", "8",
                                    "--workers", "2", "--no-progress", "--engine", "ray", "--address", ray_cluster])
    assert res.exit_code == 0, res.output
    remote = Store.open(tmp_path / "ray")
    assert remote.count == local.count == 39 and remote.fingerprint == local.fingerprint
    assert filecmp.cmp(local.path / "images.u8", remote.path / "images.u8", shallow=False)
    assert remote.records().equals(local.records())
    assert remote.manifest["skipped"] == local.manifest["skipped"]


def test_cli_attribute_with_the_ray_engine_writes_the_local_scores(ray_cluster, ivf, crops, tmp_path):
    from nda_ann.cli import main

    Image.fromarray(crops[1][0]).save(tmp_path / "q.png")
    args = ["attribute", str(ivf.path), str(tmp_path / "q.png"), "--timestep", "100", "--k", "16", "-m", "10",
            "--outside-sample", "8", "--device", "cpu"]
    local = CliRunner().invoke(main, args + ["--out", str(tmp_path / "local")])
    remote = CliRunner().invoke(main, args + ["--out", str(tmp_path / "ray"), "--engine", "ray", "--address", ray_cluster,
                                              "--actors", "2", "--timeout", "60"])
    assert local.exit_code == 0 and remote.exit_code == 0, local.output + remote.output
    a, b = (pq.read_table(tmp_path / d / "scores.parquet") for d in ("local", "ray"))
    keys = ["query", "timestep", "image_id", "rank"]
    assert a.num_rows > 0 and a.select(keys).equals(b.select(keys))
    np.testing.assert_allclose(b.column("score").to_numpy(), a.column("score").to_numpy(), rtol=1e-6)
