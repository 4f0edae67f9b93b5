"""Concurrency: parallel attribute processes, readers while `add` or `build --overwrite` runs, racing writers.

The promises checked: several processes attributing against one index get what one process gets; a
reader sees one version of an index, old or new, never a mix; an index or store opened before a
change keeps answering from the version it opened, or says it was replaced (never mixes); two
writers of one index never lose each other's work.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from nda_ann.api import attribute_to_folder
from nda_ann.atomic import write_json_atomic
from nda_ann.attribution.attributor import Attributor
from nda_ann.errors import IndexError_, StoreError
from nda_ann.index import PatchIndex, add_to_index, build_index
from nda_ann.corpus.ingest import PartialIngest, ingest
from nda_ann.scoring.patches import extract_patches
from nda_ann.corpus.store import Store, write_store

build_mod = importlib.import_module("nda_ann.index.build")

R = 12
SCALES = ["5", "6:2"]
ATTRIBUTE = dict(timesteps=[100, 300], k=32, candidates=8, device="cpu")


def pixels(seed: int, n: int, size: int = R) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def neighbours_digest(index: PatchIndex) -> str:
    """A digest of the ids and positions the index returns for fixed queries at every scale."""
    q = torch.from_numpy(pixels(99, 2, index.resolution)).permute(0, 3, 1, 2).float() / 127.5 - 1
    h = hashlib.sha256()
    for s in index.scales:
        _, image, position = index.search(s, extract_patches(q, s).numpy(), 4)
        if not ((image >= 0) & (image < index.count)).all():
            raise AssertionError(f"ids outside [0, {index.count}) at scale {s}")
        h.update(image.tobytes() + position.tobytes())
    return h.hexdigest()


def consistent_count(index: PatchIndex) -> int:
    """The image count, after checking the manifest's stores and every scale's shards agree on it."""
    m = index.manifest
    offsets = np.cumsum([0] + [s["count"] for s in m["stores"]])
    if [s["offset"] for s in m["stores"]] != offsets[:-1].tolist() or offsets[-1] != index.count:
        raise AssertionError(f"stores {m['stores']} do not add up to {index.count}")
    for e in m["scales"]:
        if sum(sh["images"] for sh in e["shards"]) != index.count:
            raise AssertionError(f"scale {e['scale']}: shards hold {sum(sh['images'] for sh in e['shards'])} images, not {index.count}")
    return index.count


def reader_loop(index_path: str, log_path: str, stop_path: str) -> None:
    """Open the index and search it until ``stop_path`` exists; log (count, digest) per open, or the error."""
    torch.set_num_threads(1)
    seen: list[tuple[int, str]] = []
    replaced = 0
    try:
        while not os.path.exists(stop_path):
            index = PatchIndex.open(index_path)
            count = consistent_count(index)
            try:
                seen.append((count, neighbours_digest(index)))
            except IndexError_ as err:  # replaced between our open and a lazy load: said, not mixed
                if "replaced" not in err.problem:
                    raise
                replaced += 1
            write_json_atomic(Path(log_path), {"seen": seen, "replaced": replaced})
    except BaseException as err:
        write_json_atomic(Path(log_path), {"seen": seen, "replaced": replaced, "error": f"{type(err).__name__}: {err}"})
        raise


from forking import forkserver, one_thread  # noqa: E402,F401  (shared fixtures)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("concurrency")
    stores = {name: write_store(root / name, pixels(seed, n)) for name, seed, n in
              [("a", 1, 24), ("b", 2, 8), ("c", 3, 8), ("d", 4, 8)]}
    stores["ab"] = write_store(root / "ab", np.concatenate([pixels(1, 24), pixels(2, 8)]))
    base = build_index(stores["a"], root / "base", SCALES, progress=False)
    qdir = root / "queries"
    qdir.mkdir()
    for i, img in enumerate(pixels(12, 3)):
        Image.fromarray(img).save(qdir / f"q{i}.png")
    return dict(root=root, stores=stores, base=base, queries=qdir)


def wait_for(predicate, seconds: float = 60.0, what: str = "") -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def read_log(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {"seen": []}


# parallel attribute ------------------------------------------------------------------------------------

def test_parallel_attribute_processes_give_the_single_process_results(corpus, forkserver, tmp_path):
    index, queries = corpus["base"].path, corpus["queries"]
    attribute_to_folder(index, [queries], tmp_path / "single", **ATTRIBUTE)
    want = pq.read_table(tmp_path / "single" / "scores.parquet")
    outs = [tmp_path / f"p{i}" for i in range(3)] + [tmp_path / "shared"] * 2  # two also share one folder
    procs = [forkserver.Process(target=attribute_to_folder, args=(str(index), [str(queries)], str(out)), kwargs=ATTRIBUTE)
             for out in outs]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0] * len(procs)
    for out in dict.fromkeys(outs):
        assert pq.read_table(out / "scores.parquet").equals(want), out
        assert len(list(out.glob("*.png"))) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p0", "p1", "p2", "shared", "single"]  # no leftovers


# readers while the index changes -------------------------------------------------------------------------

def test_readers_see_the_old_or_the_new_index_never_a_mix_while_add_runs(corpus, forkserver, tmp_path):
    ix = tmp_path / "ix"
    shutil.copytree(corpus["base"].path, ix)
    refs = {24: neighbours_digest(PatchIndex.open(ix))}
    log, stop = tmp_path / "reader.json", tmp_path / "stop"
    readers = [forkserver.Process(target=reader_loop, args=(str(ix), str(log) + str(i), str(stop))) for i in range(2)]
    for r in readers:
        r.start()
    logs = [Path(str(log) + str(i)) for i in range(2)]
    try:
        for p in logs:
            wait_for(lambda: read_log(p)["seen"] or "error" in read_log(p), what=f"reader {p.name} to start")
        for name in ("b", "c", "d"):
            updated = add_to_index(ix, corpus["stores"][name], progress=False)
            refs[updated.count] = neighbours_digest(updated)
            counts = [len(read_log(p)["seen"]) for p in logs]
            for p, n in zip(logs, counts):  # every reader opens at least once after each add
                wait_for(lambda: len(read_log(p)["seen"]) >= n + 2 or "error" in read_log(p), what=f"reader {p.name}")
    finally:
        stop.touch()
        for r in readers:
            r.join(60)
    for p, r in zip(logs, readers):
        result = read_log(p)
        assert r.exitcode == 0 and "error" not in result, result.get("error")
        seen = {count: digest for count, digest in result["seen"]}
        assert set(seen) == {24, 32, 40, 48}  # saw every version
        for count, digest in result["seen"]:
            assert digest == refs[count], f"a reader of the {count}-image version got another version's neighbours"


def test_readers_of_a_rebuilt_index_see_old_or_new_or_are_told_it_was_replaced(corpus, forkserver, tmp_path):
    ix = tmp_path / "ix"
    a, ab = corpus["stores"]["a"], corpus["stores"]["ab"]
    refs = {24: neighbours_digest(build_index(a, ix, SCALES, progress=False))}
    log, stop = tmp_path / "reader.json", tmp_path / "stop"
    reader = forkserver.Process(target=reader_loop, args=(str(ix), str(log), str(stop)))
    reader.start()
    try:
        for store in [ab, a, ab, a, None]:
            n = len(read_log(log)["seen"])  # the reader opens twice more: at least once after the last build
            wait_for(lambda: len(read_log(log)["seen"]) >= n + 2 or "error" in read_log(log), what="the reader")
            if store is not None:
                refs[len(store)] = neighbours_digest(build_index(store, ix, SCALES, overwrite=True, progress=False))
    finally:
        stop.touch()
        reader.join(60)
    result = read_log(log)
    assert reader.exitcode == 0 and "error" not in result, result.get("error")
    assert {count for count, _ in result["seen"]} == {24, 32}
    for count, digest in result["seen"]:
        assert digest == refs[count]
    assert [p.name for p in tmp_path.iterdir() if ".old-" in p.name or p.name.endswith(".building")] == []


def test_an_index_opened_before_adds_keeps_answering_from_its_version(corpus, tmp_path):
    ix = tmp_path / "ix"
    shutil.copytree(corpus["base"].path, ix)
    before = neighbours_digest(PatchIndex.open(ix))
    lazy = PatchIndex.open(ix)  # nothing loaded yet: every sub-index is read after the adds
    attributor = Attributor.open(ix, device="cpu")
    q = pixels(12, 2)
    want = attributor.attribute(q, [100], k=32, candidates=8).scores
    for name in ("b", "c"):
        add_to_index(ix, corpus["stores"][name], progress=False)
    assert lazy.count == 24 and neighbours_digest(lazy) == before
    np.testing.assert_array_equal(attributor.attribute(q, [100], k=32, candidates=8).scores, want)
    assert PatchIndex.open(ix).count == 40


def test_an_index_replaced_after_opening_keeps_what_it_loaded_and_refuses_to_mix(corpus, tmp_path):
    ix = tmp_path / "ix"
    a, ab = corpus["stores"]["a"], corpus["stores"]["ab"]
    build_index(a, ix, SCALES, progress=False)
    loaded = PatchIndex.open(ix)
    before = neighbours_digest(loaded)  # every sub-index now memory-mapped
    lazy = PatchIndex.open(ix)
    build_index(ab, ix, SCALES, overwrite=True, progress=False)  # the old folder is renamed away and deleted
    assert neighbours_digest(loaded) == before  # open mappings outlive the deletion
    with pytest.raises(IndexError_, match="replaced .* open it again"):
        neighbours_digest(lazy)  # its files would now come from the new version
    assert PatchIndex.open(ix).count == 32


def test_a_store_replaced_after_opening_keeps_its_pixels_and_refuses_new_records(tmp_path):
    old = pixels(1, 6)
    store = write_store(tmp_path / "s", old, [f"old{i}" for i in range(6)])
    np.save(tmp_path / "new.npy", pixels(2, 9))
    ingest(tmp_path / "new.npy", tmp_path / "s", R, overwrite=True, workers=1, progress=False)
    np.testing.assert_array_equal(np.asarray(store.images), old)  # the mapping of the old pixels lives on
    with pytest.raises(StoreError, match="replaced .* open it again"):
        store.sources()  # records not yet read: they would be the new store's
    assert Store.open(tmp_path / "s").count == 9


# racing writers --------------------------------------------------------------------------------------------

def test_an_add_that_read_the_manifest_before_another_add_finished_loses_nothing(corpus, tmp_path, monkeypatch):
    ix = tmp_path / "ix"
    shutil.copytree(corpus["base"].path, ix)
    real = build_mod.resolve_gpu

    def meanwhile(gpu):  # runs after this add read the manifest and before it takes the lock
        monkeypatch.setattr(build_mod, "resolve_gpu", real)
        add_to_index(ix, corpus["stores"]["c"], progress=False)
        return real(gpu)
    monkeypatch.setattr(build_mod, "resolve_gpu", meanwhile)
    with pytest.raises(IndexError_, match="another build or add changed this index"):
        add_to_index(ix, corpus["stores"]["b"], progress=False)
    index = PatchIndex.open(ix)
    assert index.count == 32 and [s["fingerprint"] for s in index.manifest["stores"]] == [
        corpus["stores"]["a"].fingerprint, corpus["stores"]["c"].fingerprint]
    assert add_to_index(ix, corpus["stores"]["b"], progress=False).count == 40  # run again: both kept


def test_a_second_build_or_add_while_one_holds_the_lock_is_refused(corpus, tmp_path):
    ix = tmp_path / "ix"
    shutil.copytree(corpus["base"].path, ix)
    with build_mod.index_lock(ix):
        with pytest.raises(IndexError_, match="another build or add is running"):
            add_to_index(ix, corpus["stores"]["b"], progress=False)
        with pytest.raises(IndexError_, match="another build or add is running"):
            build_index(corpus["stores"]["b"], ix, SCALES, overwrite=True, progress=False)
    assert PatchIndex.open(ix).count == 24


def test_a_second_ingest_into_the_same_store_is_refused(tmp_path):
    np.save(tmp_path / "src.npy", pixels(1, 4))
    with PartialIngest((tmp_path / "s").absolute()).locked():
        with pytest.raises(StoreError, match="another ingest into this store is running"):
            ingest(tmp_path / "src.npy", tmp_path / "s", R, workers=1, progress=False)
    assert ingest(tmp_path / "src.npy", tmp_path / "s", R, workers=1, progress=False).count == 4
