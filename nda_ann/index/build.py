"""Offline build: staged, resumable, published atomically; and `add`, which appends a store.

A build works in the deterministic sibling folder ``.<name>.building``: ``plan.json`` first, then
the trained templates, then each shard folder, each written atomically with a checkpoint. Rerunning
the same build resumes from what is finished; a different plan starts over. Only a complete index
is published, in one rename.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

from ..atomic import publish_dir, write_json_atomic
from ..errors import IndexError_, InputError
from ..scoring.scales import Scale, ScaleLike, parse_scales
from ..corpus.store import Store
from .factory import FLAT_MAX, IVF_MAX, parse_memory
from .gpu import device_name, resolve_gpu
from .layout_ids import INDEX_CLASSES, ClassLayout
from .manifest import (ID_SPACE, INDEX_FORMAT, INDEX_SCHEMA_VERSION, MANIFEST_FILE, TRAINED_DIR, check_files,
                       layouts_of, now, read_manifest, resolve_index_path, shard_dir, store_entry, versions)
from .phases import RATES, human_bytes, human_seconds, log, phase
from .plan import approximations, batch_images, kind_factories, plan_scale, shard_ranges, specs_of
from .search import PatchIndex
from .shard import build_shard, read_done_shard
from .thumbs import append_thumbs, build_thumbs, prune_thumbs
from .train import kmeans_seconds, train_templates

PLAN_FILE = "plan.json"
KILL_AFTER_ENV = "NDA_ANN_TEST_KILL_AFTER_SHARDS"  # test hook: SIGKILL self after this many new shards


@contextmanager
def index_lock(final: Path) -> Iterator[None]:
    """An exclusive lock on ``.<name>.lock`` next to the index: one build or add at a time."""
    final.parent.mkdir(parents=True, exist_ok=True)
    lock_path = final.with_name(f".{final.name}.lock")
    with open(lock_path, "a") as fh:
        try:
            import fcntl
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # not POSIX: no lock
            pass
        except OSError as err:
            raise IndexError_(final, "another build or add is running on this index") from err
        yield


def _open_store(store: Store | str | Path) -> Store:
    return store if isinstance(store, Store) else Store.open(store)


def _shard_expect(entry: dict[str, Any], fingerprint: str, rows: tuple[int, int], first: int) -> dict[str, Any]:
    return {"scale": entry["scale"], "store_fingerprint": fingerprint, "rows": list(rows),
            "first_image": first, "images": rows[1] - rows[0],
            "factories": [c["factory"] for c in entry["classes"]]}


def _estimate_add(entry: dict[str, Any], images: int) -> tuple[float, float]:
    """(seconds, peak bytes) to stream ``images`` images into one shard of this scale."""
    vecs = images * sum(c["indexed"] for c in entry["classes"])
    secs = images * entry["grid"] ** 2 / RATES["extract"]
    secs += sum(images * c["indexed"] / RATES.get(c["tier"], RATES["explicit"]) for c in entry["classes"])
    return secs, vecs and images * entry["bytes_per_image"] * 2


def done_shard(store: Store, entry: dict[str, Any], scale_root: Path, rows: tuple[int, int], offset: int,
               sid: int) -> dict[str, Any] | None:
    """The checkpoint of shard ``sid`` (store rows ``rows``) if it is already built for this plan, else None."""
    return read_done_shard(scale_root / shard_dir(sid), _shard_expect(entry, store.fingerprint, rows, offset + rows[0]))


def shard_entry(sid: int, done: dict[str, Any]) -> dict[str, Any]:
    """The manifest entry of shard ``sid`` from its checkpoint."""
    return {"id": sid, "dir": shard_dir(sid), "first_image": done["first_image"],
            "images": done["images"], "ntotal": done["ntotal"], "files": done["files"]}


def build_range(store: Store, entry: dict[str, Any], layouts: Sequence[ClassLayout], scale_root: Path,
                template_dir: Path, rows: tuple[int, int], offset: int, sid: int, batch: int, use_gpu: bool,
                progress: bool, templates: dict[int, bytes] | None = None) -> tuple[dict[str, Any], bool]:
    """Add store rows ``rows`` (global ids from ``offset + rows[0]``) to shard ``sid`` of one scale, or
    reuse it when checkpointed: (its manifest entry, whether it was built now). Local and Ray builds
    both run this; ``templates`` are the class templates as bytes (else read from ``template_dir``)."""
    scale = Scale(entry["patch"], entry["factor"])
    done = done_shard(store, entry, scale_root, rows, offset, sid)
    if done is not None:
        log.info("scale %s: shard %d already built, reused", scale, sid)
        return shard_entry(sid, done), False
    secs, peak = _estimate_add(entry, rows[1] - rows[0])
    with phase(f"scale {scale}: shard {sid}, images [{offset + rows[0]}, {offset + rows[1]})",
               est_seconds=secs, est_bytes=peak):
        done = build_shard(store, rows, offset + rows[0], scale, layouts, specs_of(entry), template_dir,
                           scale_root / shard_dir(sid), batch, use_gpu,
                           _shard_expect(entry, store.fingerprint, rows, offset + rows[0]), progress, templates)
    return shard_entry(sid, done), True


def count_built(counter: list[int]) -> None:
    """Count one newly built shard; the test hook KILL_AFTER_ENV SIGKILLs this process at its count."""
    counter[0] += 1
    if os.environ.get(KILL_AFTER_ENV) and counter[0] >= int(os.environ[KILL_AFTER_ENV]):
        import signal
        os.kill(os.getpid(), signal.SIGKILL)


def _build_shards(store: Store, entry: dict[str, Any], layouts: Sequence[ClassLayout], scale_root: Path,
                  template_dir: Path, rows_list: Sequence[tuple[int, int]], offset: int, first_shard: int, batch: int,
                  use_gpu: bool, progress: bool, counter: list[int]) -> list[dict[str, Any]]:
    """Build (or reuse, when checkpointed) the shards of store rows ``rows_list``; their manifest entries."""
    out = []
    for k, rows in enumerate(rows_list):
        shard, built = build_range(store, entry, layouts, scale_root, template_dir, rows, offset, first_shard + k,
                                   batch, use_gpu, progress)
        if built:
            count_built(counter)
        out.append(shard)
    return out


def _shard_runner(engine: str, address: str | None, workers: int | None):
    """The function that builds a scale's shards: ``_build_shards`` here, or its Ray counterpart."""
    if engine == "local":
        return _build_shards
    if engine == "ray":
        from ..distributed.build import ray_shard_runner

        return ray_shard_runner(address, workers)
    raise InputError(None, f"engine must be 'local' or 'ray', got {engine!r}")


def build_index(store: Store | str | Path, index_path: str | Path, scales: Sequence[ScaleLike],
                factory: str = "auto", memory_budget: str | int = "8G", candidate_stride: int = 1,
                gpu: str = "auto", overwrite: bool = False, seed: int = 0, progress: bool = True,
                classes: str = "all", engine: str = "local", address: str | None = None,
                workers: int | None = None) -> PatchIndex:
    """Build a patch index of ``store`` at every scale and publish it at ``index_path``.

    A bare name lands under ``indexes/`` (or $NDA_ANN_INDEXES). Each scale stores the unscaled patch
    vectors y (projected for f > 1) in one FAISS sub-index per layout class, sharded by image range
    when the scale would exceed a third of ``memory_budget``. Rerunning an interrupted build resumes.
    ``engine="ray"`` (extra ``nda-ann[ray]``) adds the shards' image ranges in parallel Ray tasks, at most
    ``workers`` at once, on the cluster at ``address`` (None: the running one or a new local one);
    training, the plan, the checkpoints and the publish stay on this process, and the shards are the same.
    """
    t0 = time.time()
    final = resolve_index_path(index_path)
    store = _open_store(store)
    try:
        scale_list = parse_scales(scales)
        for s in scale_list:
            s.check_fits(store.resolution)
    except ValueError as err:
        raise InputError(None, str(err)) from err
    if final.exists() and not overwrite:
        raise IndexError_(final, "already exists; pass --overwrite to replace it, or `nda-ann add` to append a store")
    if int(candidate_stride) < 1:
        raise InputError(None, f"candidate stride must be >= 1, got {candidate_stride}")
    if classes not in INDEX_CLASSES:
        raise InputError(None, f"classes must be one of {', '.join(INDEX_CLASSES)}, got {classes!r}")
    budget = parse_memory(memory_budget)
    use_gpu = resolve_gpu(gpu)
    run_shards = _shard_runner(engine, address, workers)
    entries = [plan_scale(s, len(store), store.resolution, store.channels, int(candidate_stride), factory, budget,
                          classes) for s in scale_list]
    batch = batch_images(budget, store.resolution, store.channels, scale_list)
    plan = {"store_fingerprint": store.fingerprint, "count": len(store), "resolution": store.resolution,
            "channels": store.channels, "factory": factory, "memory_budget": budget, "seed": seed,
            "candidate_stride": int(candidate_stride), "classes": classes, "scales": entries}
    staging = final.with_name(f".{final.name}.building")
    with index_lock(final):
        _prepare_staging(staging, plan)
        log.info("building %s from %s on %s: %d images, scales %s, batch %d images, budget %s",
                 final, store.path, device_name(use_gpu), len(store), [e["scale"] for e in entries],
                 batch, human_bytes(budget))
        counter = [0]
        for entry, scale in zip(entries, scale_list):
            layouts = layouts_of(plan, entry)
            root = staging / entry["dir"]
            _log_plan(entry, len(store))
            entry["templates"] = train_templates(store, scale, layouts, specs_of(entry), root / TRAINED_DIR,
                                                 seed, batch, budget, use_gpu, progress)
            ranges = shard_ranges(len(store), entry["images_per_shard"])
            entry["shards"] = run_shards(store, entry, layouts, root, root / TRAINED_DIR, ranges,
                                         0, 0, batch, use_gpu, progress, counter)
        manifest = _manifest(plan, entries, final, store, gpu, use_gpu, time.time() - t0)
        if engine != "local":
            manifest["history"][-1]["engine"] = engine
        manifest["thumbnails"] = build_thumbs(staging, [store])
        write_json_atomic(staging / MANIFEST_FILE, manifest)
        try:
            publish_dir(staging, final, overwrite=overwrite)
        except FileExistsError:
            raise IndexError_(final, "already exists (published by another build while this one ran); "
                                     "pass --overwrite to replace it") from None
        (final / PLAN_FILE).unlink()  # the staging checkpoint; a crash before this only leaves it behind
    log.info("published %s in %.1f s", final, time.time() - t0)
    return PatchIndex.open(final)


def _prepare_staging(staging: Path, plan: dict[str, Any]) -> None:
    """Resume in ``staging`` if it holds the same plan, else start it afresh."""
    ppath = staging / PLAN_FILE
    if staging.exists():
        try:
            same = json.loads(ppath.read_text()) == json.loads(json.dumps(plan))
        except (OSError, ValueError):
            same = False
        if same:
            log.info("resuming the interrupted build in %s", staging)
            return
        log.info("discarding %s: it was started with other settings or another store", staging)
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    write_json_atomic(ppath, plan)


def _log_plan(entry: dict[str, Any], count: int) -> None:
    """Log what one scale will hold, how, and the a-priori time and size estimates."""
    kinds = kind_factories(entry)
    train_s = sum(kmeans_seconds(spec, entry["dim"]) for spec in specs_of(entry) if spec.train_size)
    add_s, _ = _estimate_add(entry, count)
    log.info("scale %s: %d layout classes, %s vectors of dim %d, %s per image, %d shard(s) of <= %d images; %s; "
             "est. %s training + %s adding, %s of index",
             entry["scale"], len(entry["classes"]), f"{count * sum(c['indexed'] for c in entry['classes']):,}",
             entry["dim"], human_bytes(entry["bytes_per_image"]), -(-count // entry["images_per_shard"]),
             entry["images_per_shard"], "; ".join(f"{k}: {', '.join(v)}" for k, v in kinds.items()),
             human_seconds(train_s), human_seconds(add_s), human_bytes(count * entry["bytes_per_image"]))


def _manifest(plan: dict[str, Any], entries: list[dict[str, Any]], final: Path, store: Store, gpu_choice: str,
              use_gpu: bool, seconds: float) -> dict[str, Any]:
    for entry in entries:
        entry["factories"] = kind_factories(entry)
        entry["approximations"] = approximations(entry)
    return {
        "format": INDEX_FORMAT, "schema_version": INDEX_SCHEMA_VERSION, "created": now(), "updated": now(),
        "index_id": _index_id([store.fingerprint], plan),
        "versions": versions(), "device": device_name(use_gpu),
        "resolution": store.resolution, "channels": store.channels, "count": len(store),
        "stores": [store_entry(store.path, final, store.fingerprint, len(store), 0)],
        "params": {"factory": plan["factory"], "memory_budget": plan["memory_budget"], "seed": plan["seed"],
                   "candidate_stride": plan["candidate_stride"], "classes": plan["classes"], "gpu": gpu_choice,
                   "scales": [e["scale"] for e in entries]},
        "build_seconds": round(seconds, 2),
        "id_space": ID_SPACE, "distance": "squared L2 between unscaled patch vectors (query q / s, rescale by s^2)",
        "scales": entries,
        "history": [{"op": "build", "time": now(), "seconds": round(seconds, 2), "store": store.fingerprint,
                     "images": len(store), "device": device_name(use_gpu)}],
    }


def add_to_index(index_path: str | Path, store: Store | str | Path, gpu: str = "auto",
                 progress: bool = True) -> PatchIndex:
    """Append the images of ``store`` to an index (ids continue after the existing images).

    New shards reuse each class's trained template; manifest.json is replaced atomically at the end,
    so readers see the old or the new version. An incompatible store is refused and nothing changes.
    """
    t0 = time.time()
    final = resolve_index_path(index_path)
    manifest = read_manifest(final)
    check_files(final, manifest)
    store = _open_store(store)
    if (store.resolution, store.channels) != (manifest["resolution"], manifest["channels"]):
        raise IndexError_(store.path, f"incompatible store: {store.resolution}x{store.resolution}x{store.channels} images, "
                                      f"the index holds {manifest['resolution']}x{manifest['resolution']}x{manifest['channels']}; "
                                      "nothing was changed (ingest the source at the index's resolution)")
    if any(s["fingerprint"] == store.fingerprint for s in manifest["stores"]):
        raise IndexError_(store.path, "this store is already in the index (same fingerprint); nothing was changed")
    use_gpu = resolve_gpu(gpu)
    offset = int(manifest["count"])
    budget = int(manifest["params"]["memory_budget"])
    batch = batch_images(budget, manifest["resolution"], manifest["channels"],
                         [Scale(e["patch"], e["factor"]) for e in manifest["scales"]])
    staging = final.with_name(f".{final.name}.add-{store.fingerprint[:12]}-{offset}")
    with index_lock(final):
        if read_manifest(final) != manifest:  # read before the lock: another add finished in between
            raise IndexError_(final, "another build or add changed this index while this add started; "
                                     "nothing was changed, run the add again")
        staging.mkdir(exist_ok=True)
        counter = [0]
        new_shards = []
        for entry in manifest["scales"]:
            layouts = layouts_of(manifest, entry)
            root = staging / entry["dir"]
            root.mkdir(exist_ok=True)
            _warn_outgrown(entry, offset + len(store))
            ranges = shard_ranges(len(store), entry["images_per_shard"])
            shards = _build_shards(store, entry, layouts, root, final / entry["dir"] / TRAINED_DIR, ranges,
                                   offset, len(entry["shards"]), batch, use_gpu, progress, counter)
            new_shards.append(shards)
        for entry, shards in zip(manifest["scales"], new_shards):
            for shard in shards:
                target = final / entry["dir"] / shard["dir"]
                if target.exists():  # left by an add that died before publishing its manifest
                    shutil.rmtree(target)
                os.rename(staging / entry["dir"] / shard["dir"], target)
            entry["shards"] = entry["shards"] + shards
        old_thumbs = manifest.get("thumbnails")
        manifest["thumbnails"] = append_thumbs(final, old_thumbs, store, lambda: [Store.open(p) for p in PatchIndex(final, manifest, True).store_paths()])
        manifest["count"] = offset + len(store)
        manifest["stores"].append(store_entry(store.path, final, store.fingerprint, len(store), offset))
        manifest["updated"] = now()
        manifest["index_id"] = _index_id([s["fingerprint"] for s in manifest["stores"]], manifest["params"])
        manifest["history"].append({"op": "add", "time": now(), "seconds": round(time.time() - t0, 2),
                                    "store": store.fingerprint, "images": len(store), "offset": offset,
                                    "device": device_name(use_gpu)})
        write_json_atomic(final / MANIFEST_FILE, manifest)
        shutil.rmtree(staging, ignore_errors=True)
        # the previous manifest's thumbnails stay (a reader may have read that manifest and not yet
        # opened its files); older generations go
        prune_thumbs(final, keep={manifest["thumbnails"]["file"], *([old_thumbs["file"]] if old_thumbs else [])})
    log.info("added %d images to %s in %.1f s", len(store), final, time.time() - t0)
    return PatchIndex.open(final)


def _index_id(fingerprints: list[str], settings: dict[str, Any]) -> str:
    """Identifies the indexed content: member stores in order, build settings, creation time."""
    text = json.dumps([fingerprints, settings, now()], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _warn_outgrown(entry: dict[str, Any], count: int) -> None:
    """Log when a class has grown past the size its index kind was chosen for."""
    for c in entry["classes"]:
        n = count * c["indexed"]
        if (c["tier"] == "flat" and n > FLAT_MAX) or (c["tier"] in ("ivf-flat", "ivf-sq8", "ivf-sq8-pixel") and n > IVF_MAX):
            log.warning("scale %s class %d now holds %s vectors, beyond what %s was chosen for; "
                        "consider rebuilding with `nda-ann build --overwrite`", entry["scale"], c["index"], f"{n:,}", c["factory"])
            return
