#!/usr/bin/env python
"""Fidelity as the corpus grows: exact scores at 5k to 1M images on two corpora, and the index path against them.

    python tools/bench_scale.py store --corpus photos --size 100k                # the first 100k images as a store
    python tools/bench_scale.py exact --corpus crops --size 100k --t 100 300     # resumable, per query
    python tools/bench_scale.py status

Exact scores (p = 7, topk 100, float32, the same noise as the index path) are cached under
WORK/exact/<corpus>-<size>-t<t>-q<query>.npy; a run scores the missing queries in groups (one pass over
the store per group) and can be stopped and rerun at any point. Corpora and queries: scale_corpora.py.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT))

from scale_corpora import QUERIES, SIZES, queries, source_dir, store_path  # noqa: E402

SCALES, TOPK = ["7"], 100


def exact_path(work: Path, corpus: str, size: str, t: int, q: int, kind: str = "") -> Path:
    """The cached exact scores (``kind`` "mass": the softmax mass per image, the score without topk)."""
    return Path(work) / "exact" / f"{corpus}-{size}-t{t}-q{q}{'-' + kind if kind else ''}.npy"


def load_exact(work: Path, corpus: str, size: str, t: int, count: int = QUERIES, kind: str = "") -> tuple[list[int], np.ndarray]:
    """(query indices done, (Q', N) exact scores of those queries)."""
    done = [q for q in range(count) if exact_path(work, corpus, size, t, q, "mass").exists()]
    return done, np.stack([np.load(exact_path(work, corpus, size, t, q, kind)) for q in done]) if done else np.zeros((0, 0))


def stage_exact(work: Path, corpus: str, size: str, ts: list[int], group: int, budget: str) -> None:
    """Exact scores of every query not yet cached, ``group`` queries per pass over the store."""
    from nda_ann import Store, exact_attribution
    from nda_ann.atomic import write_json_atomic

    store = Store.open(store_path(work, corpus, size))
    images, names, _ = queries(work, corpus)
    for t in ts:
        todo = [q for q in range(len(images)) if not exact_path(work, corpus, size, t, q, "mass").exists()]
        for lo in range(0, len(todo), group):
            part = todo[lo : lo + group]
            t0 = time.perf_counter()
            res = exact_attribution(store, images[part], timesteps=[t], scales=SCALES, topk=TOPK, precision="float32",
                                    memory_budget=budget, progress=True, keep_mass=True)
            secs = time.perf_counter() - t0
            for i, q in enumerate(part):
                for kind, arr in (("", res.scores[0, i]), ("mass", res.mass[0, i])):  # the mass last: it marks the query done
                    path = exact_path(work, corpus, size, t, q, kind)
                    path.parent.mkdir(parents=True, exist_ok=True)
                    tmp = path.with_name(path.stem + ".tmp.npy")
                    np.save(tmp, arr)
                    tmp.replace(path)
            log = Path(work) / "exact" / "log.json"
            entries = json.loads(log.read_text()) if log.exists() else []
            entries.append({"corpus": corpus, "size": size, "t": t, "queries": part, "seconds": secs, "images": len(store)})
            write_json_atomic(log, entries)
            print(f"exact {corpus} {size} t={t} queries {part}: {secs:.0f} s ({secs / len(part):.0f} s per query)", flush=True)


def stage_store(work: Path, corpus: str, size: str, workers: int) -> None:
    """The store of a size-n corpus: the first n images of the 1M shards (a slice of shard 0 below one shard)."""
    import subprocess

    import pyarrow.parquet as pq

    from nda_ann.atomic import atomic_file

    store = store_path(work, corpus, size)
    if (store / "manifest.json").exists():
        return
    shards = sorted(source_dir(work, corpus).glob("shard-*.parquet"))
    per = pq.ParquetFile(shards[0]).metadata.num_rows
    n = SIZES[size]
    src = store.parent / f"source-{size}"
    src.mkdir(parents=True, exist_ok=True)
    if n % per:
        part = src / "part-00000.parquet"
        if not part.exists():
            with atomic_file(part) as tmp:
                pq.write_table(pq.read_table(shards[0]).slice(0, n), tmp)
    else:
        for shard in shards[: n // per]:
            link = src / shard.name
            if not link.exists():
                link.symlink_to(shard.resolve())
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "nda_ann", "ingest", str(src), str(store), "-r", "32", "--workers", str(workers),
                    "--no-progress"], check=True, cwd=ROOT)
    print(f"store {corpus} {size}: {time.perf_counter() - t0:.0f} s", flush=True)


def stage_status(work: Path) -> None:
    for corpus in ("crops", "photos"):
        for size in SIZES:
            for t in (100, 300):
                done, _ = load_exact(work, corpus, size, t)
                if done:
                    print(f"{corpus:7s} {size:5s} t={t}: exact for queries {done}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stage", choices=["store", "exact", "status"])
    ap.add_argument("--work", type=Path, default=ROOT / "results")
    ap.add_argument("--corpus", choices=["crops", "photos"], default="crops")
    ap.add_argument("--size", choices=list(SIZES), default="100k")
    ap.add_argument("--t", type=int, nargs="+", default=[100])
    ap.add_argument("--group", type=int, default=4, help="queries per pass over the store")
    ap.add_argument("--budget", default="4G", help="memory budget of the exact scorer")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    if args.stage == "store":
        stage_store(args.work, args.corpus, args.size, args.workers)
    elif args.stage == "exact":
        stage_exact(args.work, args.corpus, args.size, args.t, args.group, args.budget)
    else:
        stage_status(args.work)


if __name__ == "__main__":
    main()
