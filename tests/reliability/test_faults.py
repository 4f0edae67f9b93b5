"""Faults: SIGKILL at many points of ingest / build / add, write failures, versions and damaged files.

The promises checked: after a kill, the target path opens as nothing (absent), the complete old
version or the complete new one; running the same command again gives what an uninterrupted run
gives. A failed write (disk full) publishes nothing and leaves the previous version complete.

Kills run in children of a ``forkserver`` that has nda-ann imported already, so each kill point
costs one fork and the command itself, not an interpreter start. Delays are seeded and spread over
the command's duration, measured once per command. NDA_ANN_SLOW=1 runs many more kill points.
"""
from __future__ import annotations

import errno
import importlib
import json
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any, Callable

import faiss
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from nda_ann.api import attribute_to_folder
from nda_ann.attribution.attributor import Attributor
from nda_ann.cli import main
from nda_ann.errors import IndexError_, StoreError
from nda_ann.index import PatchIndex, add_to_index, build_index
from nda_ann.corpus.ingest import ingest
from nda_ann.scoring.patches import extract_patches
from nda_ann.corpus.store import Store, write_store

ingest_mod = importlib.import_module("nda_ann.corpus.ingest")  # the package exports a function of this name
build_mod = importlib.import_module("nda_ann.index.build")
report_mod = importlib.import_module("nda_ann.results.report")

R = 12
SCALES = ["5", "6:2"]
BUDGET = "2M"  # small enough that scale 5 is sharded: several checkpoints to be killed between
KILLS = {"ingest": 8, "build": 6, "add": 6}
SLOW_KILLS = 30


# helpers ----------------------------------------------------------------------------------------------

def pixels(seed: int, n: int, size: int = R) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def query_vectors(index: PatchIndex) -> dict:
    q = torch.from_numpy(pixels(99, 2, index.resolution)).permute(0, 3, 1, 2).float() / 127.5 - 1
    return {s: extract_patches(q, s).numpy() for s in index.scales}


def search_all(index: PatchIndex, k: int = 5) -> list[tuple[np.ndarray, ...]]:
    return [index.search(s, q, k) for s, q in query_vectors(index).items()]


def same_index(a: PatchIndex, b: PatchIndex) -> bool:
    """Same images, shards and neighbours (timestamps and ids of the build may differ)."""
    def shards(ix):
        return [[{k: sh[k] for k in ("first_image", "images", "ntotal", "files")} for sh in e["shards"]]
                for e in ix.manifest["scales"]]
    if (a.count, shards(a), [s["fingerprint"] for s in a.manifest["stores"]]) != (
            b.count, shards(b), [s["fingerprint"] for s in b.manifest["stores"]]):
        return False
    for (da, ia, pa), (db, ib, pb) in zip(search_all(a), search_all(b)):
        if not (np.array_equal(ia, ib) and np.array_equal(pa, pb) and np.allclose(da, db, rtol=1e-5, atol=1e-5)):
            return False
    return True


def same_store(a: Store, b: Store) -> bool:
    return (Path(a.path, "images.u8").read_bytes() == Path(b.path, "images.u8").read_bytes()
            and a.records().equals(b.records()) and a.manifest["skipped"] == b.manifest["skipped"]
            and a.fingerprint == b.fingerprint)


def hidden(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(".") and not p.name.endswith(".lock"))


def noise_folder(root: Path, n: int) -> Path:
    """n PNGs of assorted sizes (resized and cropped on ingest) and one corrupt file (skipped)."""
    rng = np.random.default_rng(7)
    root.mkdir(parents=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (R + i % 5, R + 2 * (i % 7), 3), dtype=np.uint8)).save(root / f"{i:03d}.png")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return root


from forking import forkserver, one_thread  # noqa: E402,F401  (shared fixtures)


def run_child(ctx, target: Callable, kwargs: dict[str, Any], kill_after: float | None = None) -> bool:
    """Run ``target(**kwargs)`` in a child; SIGKILL it after ``kill_after`` s. True if it was killed."""
    p = ctx.Process(target=target, kwargs=kwargs, daemon=True)
    p.start()
    p.join(kill_after)
    if p.is_alive():
        p.kill()
        p.join()
    assert p.exitcode in (0, -signal.SIGKILL), f"the child failed with exit code {p.exitcode}"
    return p.exitcode == -signal.SIGKILL


def timed_child(ctx, target: Callable, kwargs: dict[str, Any]) -> float:
    t0 = time.monotonic()
    run_child(ctx, target, kwargs)
    return time.monotonic() - t0


def again(command: Callable[[], Any]) -> None:
    """Run the same command again; 'already exists / already in the index' means the kill came too late."""
    try:
        command()
    except (StoreError, IndexError_) as err:
        if "already" not in err.problem:
            raise


def kill_points(seed: int, duration: float, n: int) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0.0, 1.05 * duration, n)


# kills: ingest ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ingest_case(tmp_path_factory, forkserver):
    root = tmp_path_factory.mktemp("ingest_kills")
    src = noise_folder(root / "src", 40)
    old = write_store(root / "old", pixels(5, 10))
    kwargs = dict(source=str(src), resolution=R, workers=1, batch_size=4, progress=False)
    duration = timed_child(forkserver, ingest, dict(kwargs, store=str(root / "ref")))
    return dict(root=root, kwargs=kwargs, old=old, ref=Store.open(root / "ref"), duration=duration)


def check_ingest_kills(case: dict, ctx, n: int, seed: int) -> None:
    killed = unfinished = 0
    for i, delay in enumerate(kill_points(seed, case["duration"], n)):
        parent = case["root"] / f"kill-{seed}-{i}"
        parent.mkdir()
        target = parent / "store"
        overwrite = i % 2 == 1  # odd points replace an existing store, even ones make a new one
        if overwrite:
            shutil.copytree(case["old"].path, target)
        killed += run_child(ctx, ingest, dict(case["kwargs"], store=str(target), overwrite=overwrite), delay)
        try:
            seen = Store.open(target, verify=True)
        except StoreError as err:
            assert "no such store folder" in err.problem, err  # absent; never half-written
            unfinished += 1
        else:
            if not same_store(seen, case["ref"]):
                assert overwrite and same_store(seen, case["old"]), f"kill point {i}"
                unfinished += 1
        again(lambda: ingest(store=target, overwrite=overwrite, **case["kwargs"]))
        assert same_store(Store.open(target, verify=True), case["ref"]), f"kill point {i} ({delay:.3f} s)"
        assert all(".old-" not in name and "staging" not in name for name in hidden(parent))
    print(f"ingest: {n} kill points, {killed} killed the process, {unfinished} before it published")
    assert unfinished >= 1


def test_ingest_killed_at_random_points_reruns_to_the_same_store(ingest_case, forkserver):
    check_ingest_kills(ingest_case, forkserver, KILLS["ingest"], seed=1)


@pytest.mark.slow
def test_ingest_killed_at_many_random_points_reruns_to_the_same_store(ingest_case, forkserver):
    check_ingest_kills(ingest_case, forkserver, SLOW_KILLS, seed=2)


# kills: build and add ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def index_case(tmp_path_factory, forkserver):
    root = tmp_path_factory.mktemp("index_kills")
    a = write_store(root / "a", pixels(1, 24))
    b = write_store(root / "b", pixels(2, 16))
    old = build_index(write_store(root / "other", pixels(3, 12)), root / "old", SCALES, memory_budget=BUDGET, progress=False)
    base = build_index(a, root / "base", SCALES, memory_budget=BUDGET, progress=False)
    build_kw = dict(store=str(a.path), scales=SCALES, memory_budget=BUDGET, progress=False)
    build_s = timed_child(forkserver, build_index, dict(build_kw, index_path=str(root / "ref_build")))
    shutil.copytree(base.path, root / "ref_add")
    add_s = timed_child(forkserver, add_to_index, dict(index_path=str(root / "ref_add"), store=str(b.path), progress=False))
    return dict(root=root, a=a, b=b, old=old, base=base, build_kw=build_kw, build_s=build_s, add_s=add_s,
                ref_build=PatchIndex.open(root / "ref_build"), ref_add=PatchIndex.open(root / "ref_add"))


def opens_as(target: Path, versions: list[PatchIndex], what: str) -> int:
    """Check the index at ``target`` is absent (-1) or one of ``versions``, complete; which one."""
    try:
        seen = PatchIndex.open(target)
    except IndexError_ as err:
        assert "no such index folder" in err.problem, err
        return -1
    which = [i for i, v in enumerate(versions) if same_index(seen, v)]
    assert which, what
    return which[0]


def check_build_kills(case: dict, ctx, n: int, seed: int) -> None:
    killed = unfinished = 0
    for i, delay in enumerate(kill_points(seed, case["build_s"], n)):
        parent = case["root"] / f"build-{seed}-{i}"
        parent.mkdir()
        target = parent / "ix"
        overwrite = i % 2 == 1
        if overwrite:
            shutil.copytree(case["old"].path, target)
        killed += run_child(ctx, build_index, dict(case["build_kw"], index_path=str(target), overwrite=overwrite), delay)
        unfinished += opens_as(target, [case["ref_build"]] + ([case["old"]] if overwrite else []), f"kill point {i}") != 0
        kw = dict(case["build_kw"], index_path=target, overwrite=overwrite)
        again(lambda: build_index(**kw))
        assert same_index(PatchIndex.open(target), case["ref_build"]), f"kill point {i} ({delay:.3f} s)"
        assert all(".old-" not in name for name in hidden(parent))
    print(f"build: {n} kill points, {killed} killed the process, {unfinished} before it published")
    assert unfinished >= 1


def check_add_kills(case: dict, ctx, n: int, seed: int) -> None:
    killed = unfinished = 0
    for i, delay in enumerate(kill_points(seed, case["add_s"], n)):
        parent = case["root"] / f"add-{seed}-{i}"
        parent.mkdir()
        target = parent / "ix"
        shutil.copytree(case["base"].path, target)
        killed += run_child(ctx, add_to_index, dict(index_path=str(target), store=str(case["b"].path), progress=False), delay)
        unfinished += opens_as(target, [case["ref_add"], case["base"]], f"kill point {i}") != 0
        again(lambda: add_to_index(target, case["b"], progress=False))
        assert same_index(PatchIndex.open(target), case["ref_add"]), f"kill point {i} ({delay:.3f} s)"
    print(f"add: {n} kill points, {killed} killed the process, {unfinished} before it published")
    assert unfinished >= 1


def test_build_killed_at_random_points_reruns_to_the_same_index(index_case, forkserver):
    check_build_kills(index_case, forkserver, KILLS["build"], seed=3)


def test_add_killed_at_random_points_reruns_to_the_same_index(index_case, forkserver):
    check_add_kills(index_case, forkserver, KILLS["add"], seed=4)


@pytest.mark.slow
def test_build_and_add_killed_at_many_random_points(index_case, forkserver):
    check_build_kills(index_case, forkserver, SLOW_KILLS, seed=5)
    check_add_kills(index_case, forkserver, SLOW_KILLS, seed=6)


# kills at the one instant a replacement leaves the target absent ----------------------------------------

def _die_between_the_publishing_renames(command: str, kwargs: dict[str, Any]) -> None:
    """Run a command in this (child) process and SIGKILL it just after the old version is moved aside."""
    real = os.rename

    def rename(src, dst):
        real(src, dst)
        if ".old-" in os.fspath(dst):
            os.kill(os.getpid(), signal.SIGKILL)
    os.rename = rename
    {"ingest": ingest, "build": build_index}[command](**kwargs)


def test_a_kill_between_the_publishing_renames_leaves_it_absent_and_a_rerun_restores_it(index_case, ingest_case, forkserver, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(ingest_case["old"].path, store)
    kwargs = dict(ingest_case["kwargs"], store=str(store), overwrite=True)
    assert run_child(forkserver, _die_between_the_publishing_renames, dict(command="ingest", kwargs=kwargs), 60)
    with pytest.raises(StoreError, match="no such store folder"):
        Store.open(store)  # the old version waits aside at .store.old-*, complete
    assert [n for n in hidden(tmp_path) if ".old-" in n]
    assert same_store(ingest(**dict(kwargs, store=store)), ingest_case["ref"])
    assert hidden(tmp_path) == []  # the rerun removed the aside copy

    ix = tmp_path / "ix"
    shutil.copytree(index_case["old"].path, ix)
    kwargs = dict(index_case["build_kw"], index_path=str(ix), overwrite=True)
    assert run_child(forkserver, _die_between_the_publishing_renames, dict(command="build", kwargs=kwargs), 60)
    with pytest.raises(IndexError_, match="no such index folder"):
        PatchIndex.open(ix)
    assert same_index(build_index(**kwargs), index_case["ref_build"])
    assert not [n for n in hidden(tmp_path) if n.startswith(".ix.")]


# write failures (disk full) ---------------------------------------------------------------------------

def fail_on_call(monkeypatch, owner: Any, name: str, nth: int, when: Callable[..., bool] | None = None,
                 once: bool = False) -> list[int]:
    """Make ``owner.name`` raise ENOSPC on its ``nth`` call matching ``when`` and, unless ``once``, every later one."""
    real = getattr(owner, name)
    calls = [0]

    def failing(*args, **kwargs):
        if when is None or when(*args, **kwargs):
            calls[0] += 1
            if calls[0] == nth or (calls[0] > nth and not once):
                raise OSError(errno.ENOSPC, "No space left on device (simulated)")
        return real(*args, **kwargs)
    monkeypatch.setattr(owner, name, failing)
    return calls


def _to(name: str) -> Callable[..., bool]:
    """Matches calls whose destination (second argument) is named ``name``."""
    return lambda src, dst, *a, **k: Path(dst).name == name


INGEST_FAULTS = {  # (owner, function, nth call, which calls count, fail only once)
    "pixels append": (ingest_mod, "_fsync_write", 3, None, False),
    "records part": (pq, "write_table", 2, None, False),
    "checkpoint": (ingest_mod, "write_json_atomic", 4, None, False),
    "records merge": (os, "replace", 1, _to("images.parquet"), False),
    "publish rename": (os, "rename", 1, _to("store"), True),
}


@pytest.mark.parametrize("fault", list(INGEST_FAULTS))
def test_a_failed_ingest_overwrite_keeps_the_old_store(fault, ingest_case, tmp_path, monkeypatch):
    store = tmp_path / "store"
    old = write_store(store, pixels(5, 10))
    owner, name, nth, when, once = INGEST_FAULTS[fault]
    calls = fail_on_call(monkeypatch, owner, name, nth, when, once)
    with pytest.raises(OSError, match="No space left"):
        ingest(store=store, overwrite=True, **ingest_case["kwargs"])
    monkeypatch.undo()
    assert calls[0] >= nth
    assert same_store(Store.open(store, verify=True), old)
    assert [n for n in hidden(tmp_path) if ".old-" in n or "staging" in n] == []  # only the resumable .ingest-partial
    assert same_store(ingest(store=store, overwrite=True, **ingest_case["kwargs"]), ingest_case["ref"])
    assert hidden(tmp_path) == []


def _under(folder: Path) -> Callable[..., bool]:
    return lambda src, dst, *a, **k: os.fspath(dst).startswith(os.fspath(folder) + os.sep)


@pytest.mark.parametrize("fault", ["shard file", "manifest", "publish rename"])
def test_a_failed_build_overwrite_keeps_the_old_index(fault, index_case, tmp_path, monkeypatch):
    ix = tmp_path / "ix"
    shutil.copytree(index_case["old"].path, ix)
    if fault == "shard file":
        fail_on_call(monkeypatch, faiss, "write_index", 3)
    elif fault == "manifest":  # the index manifest, not the plan checkpoint written first
        fail_on_call(monkeypatch, build_mod, "write_json_atomic", 1, when=lambda path, obj: Path(path).name == "manifest.json")
    else:  # the rename that publishes the staging folder as ix (the one putting the old back succeeds)
        fail_on_call(monkeypatch, os, "rename", 1, when=_to("ix"), once=True)
    kwargs = dict(index_case["build_kw"], index_path=ix, overwrite=True)
    with pytest.raises(OSError, match="No space left"):
        build_index(**kwargs)
    monkeypatch.undo()
    assert same_index(PatchIndex.open(ix), index_case["old"])
    assert [n for n in hidden(tmp_path) if ".old-" in n] == []
    assert same_index(build_index(**kwargs), index_case["ref_build"])
    assert hidden(tmp_path) == []


@pytest.mark.parametrize("fault", ["shard file", "moving shards in", "thumbnails", "manifest"])
def test_a_failed_add_keeps_the_old_index(fault, index_case, tmp_path, monkeypatch):
    ix = tmp_path / "ix"
    shutil.copytree(index_case["base"].path, ix)
    if fault == "thumbnails":
        from nda_ann.index import thumbs as thumbs_mod

        fail_on_call(monkeypatch, thumbs_mod, "write_thumbs", 1)
    elif fault == "shard file":
        fail_on_call(monkeypatch, faiss, "write_index", 2)
    elif fault == "moving shards in":
        fail_on_call(monkeypatch, os, "rename", 2, when=_under(ix))
    else:
        fail_on_call(monkeypatch, build_mod, "write_json_atomic", 1)
    with pytest.raises(OSError, match="No space left"):
        add_to_index(ix, index_case["b"], progress=False)
    monkeypatch.undo()
    assert same_index(PatchIndex.open(ix), index_case["base"])
    np.testing.assert_array_equal(PatchIndex.open(ix).thumbnails(), index_case["base"].thumbnails())
    added = add_to_index(ix, index_case["b"], progress=False)
    assert same_index(added, index_case["ref_add"])
    np.testing.assert_array_equal(added.thumbnails(), index_case["ref_add"].thumbnails())
    assert hidden(tmp_path) == []


@pytest.fixture(scope="module")
def attribute_case(tmp_path_factory):
    root = tmp_path_factory.mktemp("attribute_faults")
    store = write_store(root / "store", pixels(11, 30, 16))
    build_index(store, root / "index", ["5"], progress=False)
    qdir = root / "queries"
    qdir.mkdir()
    for i, img in enumerate(pixels(12, 3, 16)):
        Image.fromarray(img).save(qdir / f"q{i}.png")
    return root


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("fault", ["scores", "figure", "summary", "publish rename"])
def test_a_failed_results_write_keeps_the_previous_results(fault, attribute_case, tmp_path, monkeypatch):
    root = attribute_case
    kw = dict(timesteps=[100], k=32, candidates=8, device="cpu")
    out = tmp_path / "out"
    attribute_to_folder(root / "index", [root / "queries"], out, **kw)
    before = folder_bytes(out)
    assert {"scores.parquet", "summary.json", "report.npz"} <= set(before) and len(before) == 6  # and 3 figures
    owner, name, nth, when = {"scores": (pq, "write_table", 1, None), "figure": (report_mod, "render_attribution", 1, None),
                              "summary": (report_mod, "write_json_atomic", 1, None),
                              "publish rename": (os, "rename", 1, _to("out"))}[fault]
    fail_on_call(monkeypatch, owner, name, nth, when, once=True)
    with pytest.raises(OSError, match="No space left"):
        attribute_to_folder(root / "index", [root / "queries" / "q1.png"], out, **dict(kw, timesteps=[100, 300]))
    monkeypatch.undo()
    assert folder_bytes(out) == before  # the earlier results, complete; nothing of the failed run
    assert hidden(tmp_path) == []
    attribute_to_folder(root / "index", [root / "queries" / "q1.png"], out, **kw)
    assert len(list(out.glob("*.png"))) == 1  # a new run replaces the folder: no figures of earlier queries


# versions and damaged files ---------------------------------------------------------------------------

def edit_json(path: Path, **changes: Any) -> None:
    obj = json.loads(path.read_text())
    obj.update(changes)
    path.write_text(json.dumps(obj))


def test_a_store_from_another_schema_version_is_refused_with_re_ingest(tmp_path):
    write_store(tmp_path / "s", pixels(1, 4))
    edit_json(tmp_path / "s" / "manifest.json", schema_version=2)
    with pytest.raises(StoreError, match="schema version 2 .* re-ingest"):
        Store.open(tmp_path / "s")
    r = CliRunner().invoke(main, ["store-info", str(tmp_path / "s")])
    assert r.exit_code == 1 and "re-ingest" in r.output and "Traceback" not in r.output


def test_an_index_from_another_schema_version_is_refused_with_rebuild(index_case, tmp_path):
    shutil.copytree(index_case["base"].path, tmp_path / "ix")
    edit_json(tmp_path / "ix" / "manifest.json", schema_version=0)
    with pytest.raises(IndexError_, match="schema version 0 .* rebuild"):
        PatchIndex.open(tmp_path / "ix")
    r = CliRunner().invoke(main, ["info", str(tmp_path / "ix")])
    assert r.exit_code == 1 and "rebuild" in r.output and "Traceback" not in r.output


def test_unreadable_manifests_are_named(index_case, tmp_path):
    write_store(tmp_path / "s", pixels(1, 4))
    (tmp_path / "s" / "manifest.json").write_text('{"format": "nda-ann-st')  # cut short
    with pytest.raises(StoreError, match="unreadable manifest"):
        Store.open(tmp_path / "s")
    shutil.copytree(index_case["base"].path, tmp_path / "ix")
    (tmp_path / "ix" / "manifest.json").write_bytes(b"\x00" * 10)
    with pytest.raises(IndexError_, match="unreadable manifest"):
        PatchIndex.open(tmp_path / "ix")


def test_a_truncated_pixel_file_is_refused_on_open(tmp_path):
    write_store(tmp_path / "s", pixels(1, 4))
    f = tmp_path / "s" / "images.u8"
    f.write_bytes(f.read_bytes()[:-1])
    with pytest.raises(StoreError, match="truncated"):
        Store.open(tmp_path / "s")
    f.unlink()
    with pytest.raises(StoreError, match="holds -1 bytes"):
        Store.open(tmp_path / "s")


def test_verify_detects_modified_pixels(tmp_path):
    write_store(tmp_path / "s", pixels(1, 4))
    f = tmp_path / "s" / "images.u8"
    data = bytearray(f.read_bytes())
    data[100] ^= 0xFF  # same size: only the checksum can tell
    f.write_bytes(bytes(data))
    assert Store.open(tmp_path / "s").count == 4
    with pytest.raises(StoreError, match="checksum"):
        Store.open(tmp_path / "s", verify=True)
    r = CliRunner().invoke(main, ["store-info", str(tmp_path / "s"), "--verify"])
    assert r.exit_code == 1 and "checksum" in r.output


def test_a_garbled_index_file_of_the_right_size_is_an_index_error_on_search(index_case, tmp_path):
    shutil.copytree(index_case["base"].path, tmp_path / "ix")
    f = next((tmp_path / "ix").glob("scale-5/shard-000/class-*.faiss"))
    f.write_bytes(b"\x00" * f.stat().st_size)
    index = PatchIndex.open(tmp_path / "ix")  # sizes match: only reading the file tells
    with pytest.raises(IndexError_, match="unreadable index file"):
        search_all(index)


def test_a_store_replaced_after_the_build_is_refused_by_attribute(tmp_path):
    store = write_store(tmp_path / "s", pixels(1, 20, 16))
    build_index(store, tmp_path / "ix", ["5"], progress=False)
    write_store(tmp_path / "s", pixels(2, 20, 16), overwrite=True)  # same shape, other pixels
    with pytest.raises(IndexError_, match="not the ones indexed"):
        Attributor.open(tmp_path / "ix")
