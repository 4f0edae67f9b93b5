#!/usr/bin/env python
"""The Ray engine's costs: build throughput, fan-out time and bytes per query, and the 100M plan.

    nice -n 10 python tools/bench_ray.py --workdir /tmp/nda-ray --build-n 20000 \\
        --search-n 5000 --index WORK/index-100k --write

1. Build: the same store (32x32 photo crops, scale 7, ``auto``) built locally, then with
   ``engine="ray"`` and 1 and 2 workers, on a local Ray cluster started once beforehand. The
   shard phase (adding the images' vectors, the part that fans out) is timed apart from training.
2. Search: for every index (``--index PATH``, or one built over ``--search-n`` crops), held-out
   queries attributed one at a time at t = 100 by ``Attributor.open`` and by
   ``open_ray_attributor`` with ``--actors`` shard actors: the median seconds per query of each,
   their difference (the fan-out's extra time) and the bytes moved per query (query vectors out,
   top-k results back, pixels of the candidates and the outside sample).
3. The 100M-image plan re-derived from those figures (index and store bytes per image, build rate
   per worker, per-query time and bytes), with the merge of N nodes' top-k timed on this machine.

Writes a section between <!-- bench_ray --> markers of docs/benchmarks/ray.md with --write.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tools.bench_build import held_out, photo_store  # noqa: E402
from tools.bench_md import machine, update_section  # noqa: E402

SERVE = {"k": 256, "candidates": 300, "topk": 100}  # the million run's served settings (no nprobe: per index)


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def timed_build(store, out: Path, engine: str, workers: int | None, budget: str) -> dict[str, Any]:
    """Build ``store`` at ``out``; total seconds and seconds spent in the shard phase."""
    import nda_ann.index.build as build

    spent = [0.0]
    original = build._shard_runner

    def timing_runner(*args: Any) -> Any:
        run = original(*args)

        def timed(*a: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return run(*a)
            finally:
                spent[0] += time.perf_counter() - t0
        return timed

    build._shard_runner = timing_runner
    try:
        t0 = time.perf_counter()
        index = build.build_index(store, out, ["7"], memory_budget=budget, progress=False, overwrite=True,
                                  engine=engine, workers=workers)
        total = time.perf_counter() - t0
    finally:
        build._shard_runner = original
    shards = len(index.manifest["scales"][0]["shards"])
    return {"engine": engine, "workers": workers or 1, "images": index.count, "shards": shards, "seconds": total,
            "shard_seconds": spent[0], "train_seconds": total - spent[0], "images_per_s": index.count / spent[0],
            "index_bytes": folder_bytes(out), "images_per_shard": index.manifest["scales"][0]["images_per_shard"]}


def bench_build(args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    store = photo_store(work, args.build_n)
    rows = [timed_build(store, work / "build-local", "local", None, args.build_budget)]
    for w in (1, 2):
        rows.append(timed_build(store, work / f"build-ray{w}", "ray", w, args.build_budget))
    for r in rows:
        print(f"build {r['engine']} x{r['workers']}: {r['seconds']:.1f} s ({r['shard_seconds']:.1f} s adding, "
              f"{r['images_per_s']:.0f} img/s), {r['shards']} shards", flush=True)
    return rows


def per_query(att: Any, queries: np.ndarray, nprobe: int | None) -> list[float]:
    """Seconds of each query attributed alone at t = 100 (after one warm-up query)."""
    # M below N / 2: at and above it the Attributor re-scores every image and searches nothing
    kw = dict(SERVE, candidates=min(SERVE["candidates"], att.corpus.count // 2 - 1), nprobe=nprobe, maps=0)
    att.attribute(queries[:1], [100], **kw)
    out = []
    for q in queries:
        t0 = time.perf_counter()
        att.attribute(q[None], [100], **kw)
        out.append(time.perf_counter() - t0)
    return out


def bench_search(index_path: Path, args: argparse.Namespace) -> dict[str, Any]:
    from nda_ann.attribution.attributor import Attributor
    from nda_ann.distributed import open_ray_attributor

    queries = held_out(args.queries)
    nprobe = args.nprobe
    local = Attributor.open(index_path)
    t_local = per_query(local, queries, nprobe)
    del local
    remote = open_ray_attributor(index_path, actors=args.actors)
    pool = remote.searcher.pool
    try:
        per_query(remote, queries[:1], nprobe)  # warm the actors' sub-indexes
        before = dict(pool.traffic)
        t_ray = per_query(remote, queries, nprobe)
        moved = {k: (pool.traffic[k] - before.get(k, 0)) / (len(queries) + 1) for k in ("vectors", "results", "ids", "pixels")}
        actors = pool.placement.actors
    finally:
        remote.searcher.close()
    manifest = json.loads((Path(index_path) / "manifest.json").read_text())
    row = {"index": str(index_path), "images": manifest["count"], "actors": actors, "queries": len(queries),
           "local_s": statistics.median(t_local), "ray_s": statistics.median(t_ray), "bytes": moved,
           "index_bytes": folder_bytes(Path(index_path)), "images_per_shard": manifest["scales"][0]["images_per_shard"],
           "store_bytes": sum(s["count"] for s in manifest["stores"]) * manifest["resolution"] ** 2 * manifest["channels"]}
    row["extra_s"] = row["ray_s"] - row["local_s"]
    print(f"search {row['images']:,} images, {actors} actors: local {row['local_s']:.3f} s, ray {row['ray_s']:.3f} s "
          f"per query; {sum(moved.values()) / 1e6:.2f} MB moved per query", flush=True)
    return row


def merge_seconds(nodes: int, positions: int, k: int, reps: int = 3) -> float:
    """Measured time of ``merge_topk`` over ``nodes`` partial results of one query (1, L, k)."""
    from nda_ann.distributed.searcher import merge_topk

    rng = np.random.default_rng(0)
    parts = [(np.sort(rng.random((1, positions, k), dtype=np.float32), -1), rng.integers(0, 10**8, (1, positions, k)),
              rng.integers(0, 1024, (1, positions, k))) for _ in range(nodes)]
    best = math.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        merge_topk(parts, k)
        best = min(best, time.perf_counter() - t0)
    return best


def plan_100m(build_rows: list[dict[str, Any]], search_rows: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    """The 100M-image plan from the measured figures (assumptions are the arguments, named in the text)."""
    big = max(search_rows, key=lambda r: r["images"])
    index_pi, store_pi = big["index_bytes"] / big["images"], big["store_bytes"] / big["images"]
    per_node = int(args.node_ram_gb * 2**30 * args.cache_share / (index_pi + store_pi))
    nodes = math.ceil(1e8 / per_node)
    ray1 = next(r for r in build_rows if r["engine"] == "ray" and r["workers"] == 1)
    shard_images = big["images_per_shard"]
    positions, k = 676, SERVE["k"]  # interior positions of a 32x32 image at p = 7; the served K
    results = nodes * positions * k * 20  # float32 distance + two int64 ids per neighbour
    vectors = nodes * positions * 147 * 4
    merge = merge_seconds(nodes, positions, k)
    wire = (results + vectors + big["bytes"]["pixels"]) * 8 / (args.gbit * 1e9)
    return {"nodes": nodes, "images_per_node": per_node, "shards_per_node": math.ceil(per_node / shard_images),
            "node_bytes": per_node * (index_pi + store_pi), "index_per_image": index_pi, "store_per_image": store_pi,
            "build_hours": 1e8 / (ray1["images_per_s"] * nodes * args.workers_per_node) / 3600,
            "query_s": big["local_s"] + big["extra_s"] + merge + wire, "merge_s": merge, "wire_s": wire,
            "results_bytes": results, "vectors_bytes": vectors, "base_s": big["local_s"], "extra_s": big["extra_s"]}


def render(build_rows: list[dict[str, Any]], search_rows: list[dict[str, Any]], plan: dict[str, Any] | None,
           args: argparse.Namespace) -> str:
    mb = lambda b: f"{b / 1e6:.2f} MB"  # noqa: E731
    lines = [f"## The Ray engine: build throughput, fan-out per query, the 100M plan (tools/bench_ray.py)", "",
             f"`{' '.join(sys.argv)}` on {machine()}; a local Ray cluster on this machine "
             "(workers and actors share its cores with the coordinator).", ""]
    if build_rows:
        lines += [f"Build of {build_rows[0]['images']:,} photo crops, scale 7, `auto`, budget {args.build_budget} "
                  f"({build_rows[0]['shards']} shards); adding = the shard phase that fans out, training stays on the driver.", "",
                  "| engine | workers | total s | training s | adding s | images/s adding |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['engine']} | {r['workers']} | {r['seconds']:.1f} | {r['train_seconds']:.1f} | {r['shard_seconds']:.1f} | "
                  f"{r['images_per_s']:,.0f} |" for r in build_rows]
        lines.append("")
    if search_rows:
        lines += [f"Per query image at t = 100, K = {SERVE['k']}, M = {SERVE['candidates']}, top-k {SERVE['topk']} "
                  "(median of the queries, one at a time, after a warm-up); bytes moved per query by the coordinator.", "",
                  "| images | actors | local s | Ray s | extra s | vectors out | top-k back | pixels back |",
                  "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['images']:,} | {r['actors']} | {r['local_s']:.3f} | {r['ray_s']:.3f} | {r['extra_s']:+.3f} | "
                  f"{mb(r['bytes']['vectors'])} | {mb(r['bytes']['results'])} | {mb(r['bytes']['pixels'])} |" for r in search_rows]
        lines.append("")
    if plan:
        lines += ["100M images, re-derived from these figures: nodes of "
                  f"{args.node_ram_gb:g} GB RAM keeping {args.cache_share:.0%} of it as page cache for index and store, "
                  f"{args.workers_per_node} build workers per node, a {args.gbit:g} Gbit/s network (assumptions).", "",
                  f"- Per image: {plan['index_per_image']:,.0f} B of index, {plan['store_per_image']:,.0f} B of store "
                  f"(measured at {max(r['images'] for r in search_rows):,} images).",
                  f"- **{plan['nodes']} nodes** of {plan['images_per_node']:,} images, {plan['shards_per_node']} shards each "
                  f"at the largest index's budget, {plan['node_bytes'] / 2**30:.1f} GiB of mapped index and store per node.",
                  f"- **Build**: {plan['build_hours']:.2f} h of adding at the measured Ray rate per worker, plus the "
                  "training on the driver (as one machine's).",
                  f"- **Per query**: {plan['query_s']:.2f} s = {plan['base_s']:.2f} s (local path, largest index) + "
                  f"{plan['extra_s']:+.2f} s (fan-out, measured) + {plan['merge_s']:.2f} s (merging {plan['nodes']} nodes' "
                  f"top-{SERVE['k']}, measured here) + {plan['wire_s']:.2f} s on the wire for "
                  f"{mb(plan['vectors_bytes'])} of vectors out and {mb(plan['results_bytes'])} of top-k back.", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/nda-ray"))
    ap.add_argument("--build-n", type=int, default=20000, help="images of the build benchmark (0: skip it)")
    ap.add_argument("--build-budget", default="512M", help="memory budget of those builds (sets the shard count)")
    ap.add_argument("--search-n", type=int, action="append", default=[], help="build and search an index of N crops")
    ap.add_argument("--index", type=Path, action="append", default=[], help="search an existing index (repeatable)")
    ap.add_argument("--queries", type=int, default=8)
    ap.add_argument("--actors", type=int, default=2)
    ap.add_argument("--nprobe", type=int, default=None)
    ap.add_argument("--topk", type=int, default=SERVE["topk"], help="patch weights summed per image (0: all)")
    ap.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray cluster")
    ap.add_argument("--node-ram-gb", type=float, default=24.0)
    ap.add_argument("--cache-share", type=float, default=0.6)
    ap.add_argument("--workers-per-node", type=int, default=2)
    ap.add_argument("--gbit", type=float, default=10.0)
    ap.add_argument("--write", action="store_true", help="write the docs/benchmarks/ray.md section")
    args = ap.parse_args()
    SERVE["topk"] = args.topk or None
    args.workdir.mkdir(parents=True, exist_ok=True)
    import ray

    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False, logging_level="warning")
    build_rows = bench_build(args, args.workdir) if args.build_n else []
    from nda_ann.index import build_index

    indexes = list(args.index)
    for n in args.search_n:
        path = args.workdir / f"index-{n}"
        if not (path / "manifest.json").exists():
            build_index(photo_store(args.workdir, n), path, ["7"], progress=False)
        indexes.append(path)
    search_rows = [bench_search(p, args) for p in indexes]
    plan = plan_100m(build_rows, search_rows, args) if build_rows and search_rows else None
    text = render(build_rows, search_rows, plan, args)
    print(text)
    (args.workdir / "bench_ray.json").write_text(json.dumps({"build": build_rows, "search": search_rows, "plan": plan}, indent=1))
    if args.write:
        update_section("bench_ray", text)


if __name__ == "__main__":
    main()
