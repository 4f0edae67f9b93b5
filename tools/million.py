#!/usr/bin/env python
"""The million-image run: generate, ingest, build, serve and attribute on one machine, and measure it.

    python tools/million.py all                  # every stage for 5k, 100k, 300k and 1M images
    python tools/million.py build --size 1m      # one stage, one size (stages below)
    python tools/million.py report               # BENCHMARKS.md section + docs/benchmarks/million.png

Stages, each resumable and cached under --work (default results/million, not committed):

- corpus: ``tools/make_corpus.py`` writes 1,000,000 distinct 32x32 crops as 20 Parquet shards of
  50,000 PNGs (HF image layout); a size-n subset is the first n rows (the first shards, or a
  slice of shard 0 for 5k).
- store: ``nda-ann ingest`` of that subset (a subprocess, timed, peak RSS).
- build: ``nda-ann build --recipe indexes/million.toml`` (a subprocess, timed, peak RSS, bytes).
- serve: a fresh process opens the index memory-mapped, attributes the held-out queries of the
  demo corpus at t = 100 with the recipe's attribution settings, and reports seconds per query
  image (after one warm-up query) and its resident memory (VmHWM, VmRSS).
- exact: the exact scorer on the same queries and noise (only up to --exact-max images), cached
  per query, so an interrupted run keeps the queries already done.
- fidelity: docs/scores.md section 7 metrics of the serve scores (and of variants) against exact.

Every stage appends its figures to WORK/records/STAGE-SIZE.json; ``report`` reads them.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
from warm import warm_page_cache  # noqa: E402

SIZES = {"5k": 5_000, "100k": 100_000, "300k": 300_000, "1m": 1_000_000}
SHARD = 50_000
RECIPE = ROOT / "indexes" / "million.toml"
QUERIES = 4
# attribution settings of the million-image configuration (the serve stage and the CLI example)
# K = 256: on 5k crops the same fidelity as K = 1,024 (configs/sweep tables), and a third less search.
# M = 300: at 100k M = 400 lifts subset-sum Spearman 0.43 -> 0.52 over M = 200 (top-10 overlap
# unchanged) but made 1M queries 1.6 - 2.3 s, at the 2 s budget; M = 300 keeps headroom. M = 800
# gives 0.55 / 0.64 at 2.4 s per query at 100k (records/fidelity-100k.json, BENCHMARKS.md
# "Reading the million-image run").
SERVE = {"k": 256, "candidates": 300, "nprobe": 16, "topk": 100, "tail": True}
# 5k: 245k interior vectors cannot train the recipe's 8,192 lists; the auto nlist rule gives 2,048
FACTORY_OVERRIDE: dict[str, list[str]] = {}  # the recipe's auto nlist fits every size


def work_paths(work: Path, size: str) -> dict[str, Path]:
    return {"source": work / f"source-{size}", "store": work / f"store-{size}", "index": work / f"index-{size}",
            "records": work / "records"}


def record(work: Path, stage: str, size: str, data: dict) -> None:
    from nda_ann.atomic import write_json_atomic

    (work / "records").mkdir(parents=True, exist_ok=True)
    write_json_atomic(work / "records" / f"{stage}-{size}.json", {"stage": stage, "size": size, **data})


def load_record(work: Path, stage: str, size: str) -> dict | None:
    path = work / "records" / f"{stage}-{size}.json"
    return json.loads(path.read_text()) if path.exists() else None


def timed(cmd: list[str], log: Path) -> dict:
    """Run ``cmd`` as a subprocess; wall seconds and the child's peak RSS (bytes)."""
    t0 = time.perf_counter()
    with open(log, "ab") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"{' '.join(cmd)} failed with exit code {code}; see {log}")
    return {"seconds": time.perf_counter() - t0, "peak_rss": usage.ru_maxrss * 1024, "command": " ".join(cmd)}


def queries():
    """(Q, 3, 32, 32) float held-out queries (the demo corpus's held-out strips) and their names."""
    from nda_ann.corpus.demo_corpus import demo_corpus
    from nda_ann.corpus.store import uint8_to_float

    dc = demo_corpus(n_train=100, n_queries=QUERIES, seed=0)
    return uint8_to_float(dc.queries)


# stages -----------------------------------------------------------------------------------------
def stage_corpus(work: Path, size: str, args) -> None:
    corpus = work / "corpus-1m"
    if (corpus / "corpus.json").exists():
        return
    out = timed([sys.executable, "tools/make_corpus.py", str(corpus), "--count", str(SIZES["1m"]),
                 "--shard-size", str(SHARD), "--seed", "0", "--workers", str(args.workers)], work / "corpus.log")
    record(work, "corpus", "1m", out)


def stage_store(work: Path, size: str, args) -> None:
    p = work_paths(work, size)
    if (p["store"] / "manifest.json").exists():
        return
    n = SIZES[size]
    p["source"].mkdir(parents=True, exist_ok=True)
    if n % SHARD:
        import pyarrow.parquet as pq

        from nda_ann.atomic import atomic_file

        part = p["source"] / "part-00000.parquet"
        if not part.exists():
            table = pq.read_table(work / "corpus-1m" / "shard-00000.parquet").slice(0, n)
            with atomic_file(part) as tmp:
                pq.write_table(table, tmp)
    else:
        for k in range(n // SHARD):
            link = p["source"] / f"shard-{k:05d}.parquet"
            if not link.exists():
                link.symlink_to((work / "corpus-1m" / f"shard-{k:05d}.parquet").resolve())
    out = timed([sys.executable, "-m", "nda_ann", "ingest", str(p["source"]), str(p["store"]), "-r", "32", "--workers", str(args.workers),
                 "--no-progress"], work / f"store-{size}.log")
    record(work, "store", size, {**out, "bytes": dir_bytes(p["store"])})


def stage_build(work: Path, size: str, args) -> None:
    p = work_paths(work, size)
    if (p["index"] / "manifest.json").exists():
        return
    out = timed([sys.executable, "-m", "nda_ann", "build", "--recipe", str(RECIPE), str(p["store"]), str(p["index"]), "--no-progress",
                *FACTORY_OVERRIDE.get(size, [])],
                work / f"build-{size}.log")
    manifest = json.loads((p["index"] / "manifest.json").read_text())
    vectors = sum(sum(s["ntotal"]) for e in manifest["scales"] for s in e["shards"])
    record(work, "build", size, {**out, "bytes": dir_bytes(p["index"]), "vectors": vectors,
                                 "factories": manifest["scales"][0]["factories"]})


def stage_serve(work: Path, size: str, args) -> None:
    """Attribute the queries in a fresh process (so its RSS is the serving RSS), with the index and
    the store in the page cache (read once beforehand: other work on the machine evicts them, and
    a cold index made 1M queries 2 - 6 s, see BENCHMARKS.md)."""
    p = work_paths(work, size)
    out_npz = work / f"serve-{size}.npz"
    warm_bytes, warm_s = warm_page_cache([p["index"], p["store"]])
    code = f"""
import json, sys, time, numpy as np
sys.path.insert(0, {str(ROOT / 'tools')!r})
from million import queries, SERVE
from nda_ann import Attributor
t0 = time.perf_counter()
att = Attributor.open({str(p['index'])!r})
open_s = time.perf_counter() - t0
qs = queries()
att.attribute(qs[:1], 100, maps=0, **SERVE)  # warm-up: thumbnails, first pages of the index
times, outside, ids, vals = [], [], [], []
for q in range(len(qs)):
    t1 = time.perf_counter()
    r = att.attribute(qs[q : q + 1], 100, maps=8, **SERVE)
    times.append(time.perf_counter() - t1)
    outside.append(float(r.outside_mass.mean()))
    i, v = r.sparse[(0, 0)]
    ids.append(i); vals.append(v)
status = dict(l.split(":", 1) for l in open("/proc/self/status").read().splitlines() if ":" in l)
kib = lambda k: int(status[k].split()[0]) * 1024
np.savez({str(out_npz)!r}, **{{f"ids{{q}}": a for q, a in enumerate(ids)}}, **{{f"vals{{q}}": a for q, a in enumerate(vals)}})
print(json.dumps({{"open_s": open_s, "s_per_query": times, "outside_mass": outside, "vm_hwm": kib("VmHWM"),
                  "vm_rss": kib("VmRSS"), "rss_anon": kib("RssAnon"), "rss_file": kib("RssFile"),
                  "device": r.device, "settings": SERVE}}))
"""
    log = work / f"serve-{size}.log"
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    log.write_text(res.stdout + res.stderr)
    if res.returncode != 0:
        raise SystemExit(f"serve {size} failed; see {log}")
    data = json.loads(res.stdout.strip().splitlines()[-1])
    record(work, "serve", size, {**data, "median_s_per_query": float(np.median(data["s_per_query"])),
                                 "page_cache_warmed_bytes": warm_bytes, "page_cache_warm_s": warm_s})


def stage_exact(work: Path, size: str, args) -> None:
    """Exact scores (float32) of each query at t = 100, cached per query."""
    from nda_ann import Store, exact_scores

    if SIZES[size] > args.exact_max:
        return
    store = Store.open(work_paths(work, size)["store"])
    qs = queries()
    secs = []
    for q in range(len(qs)):
        path = work / f"exact-{size}-q{q}.npy"
        if path.exists():
            continue
        t0 = time.perf_counter()
        s = exact_scores(store, qs[q : q + 1], timesteps=[100], scales=["7"], topk=SERVE["topk"], precision="float32")[0, 0]
        secs.append(time.perf_counter() - t0)
        tmp = path.with_name(path.stem + ".tmp.npy")
        np.save(tmp, s)
        tmp.replace(path)
        print(f"exact {size} query {q}: {secs[-1]:.0f} s", flush=True)
    if secs:
        prev = load_record(work, "exact", size) or {"s_per_query": []}
        record(work, "exact", size, {"s_per_query": prev["s_per_query"] + secs})


def stage_fidelity(work: Path, size: str, args) -> None:
    """docs/scores.md section 7 metrics of the serve scores, and of K / M / tail variants, against exact."""
    from nda_ann import Attributor
    from nda_ann.results.fidelity import fidelity_table

    n = SIZES[size]
    done = [q for q in range(QUERIES) if (work / f"exact-{size}-q{q}.npy").exists()]
    if not done:
        return
    exact = np.stack([np.load(work / f"exact-{size}-q{q}.npy") for q in done])  # (Q', N)
    served = np.load(work / f"serve-{size}.npz")
    approx = np.zeros_like(exact)
    for row, q in enumerate(done):
        approx[row, served[f"ids{q}"]] = served[f"vals{q}"]
    rows = [{"variant": "served", **SERVE, **mean_fidelity(fidelity_table(approx[None], exact[None]))}]
    att = Attributor.open(work_paths(work, size)["index"])
    qs = queries()[done]
    for variant in args.variants:
        settings = {**SERVE, **variant}
        t0 = time.perf_counter()
        res = att.attribute(qs, 100, maps=0, **settings)
        secs = (time.perf_counter() - t0) / len(qs)
        fid = mean_fidelity(fidelity_table(res.scores, exact[None]))
        rows.append({"variant": "sweep", **settings, "s_per_query": secs,
                     "outside": float(res.outside_mass.mean()), **fid})
        print(json.dumps(rows[-1]), flush=True)
    record(work, "fidelity", size, {"rows": rows, "n": n, "queries": done})


# which single-machine configuration to ship: candidate grids and codes compared at one size
CONFIGS = {
    "stride 1, all classes, auto": {"candidate_stride": 1, "classes": "all", "factory": "auto"},
    "stride 1, interior, auto": {"candidate_stride": 1, "classes": "interior", "factory": "auto"},
    "stride 2, interior, PCA64+SQ8": {"candidate_stride": 2, "classes": "interior", "factory": "PCA64,IVF{nlist},SQ8"},
    "stride 4, all classes, PCA64+SQ8": {"candidate_stride": 4, "classes": "all", "factory": "PCA64,IVF{nlist},SQ8"},
    "stride 4, interior, PCA64+SQ8": {"candidate_stride": 4, "classes": "interior", "factory": "PCA64,IVF{nlist},SQ8"},
    "stride 4, interior, IVF-Flat": {"candidate_stride": 4, "classes": "interior", "factory": "IVF{nlist},Flat"},
}


def stage_configs(work: Path, size: str, args) -> None:
    """Build each of CONFIGS on one store and measure fidelity (M = 200, 500) against exact."""
    from nda_ann import Attributor, build_index
    from nda_ann.results.fidelity import fidelity_table

    done = [q for q in range(QUERIES) if (work / f"exact-{size}-q{q}.npy").exists()]
    if not done:
        raise SystemExit(f"configs {size}: run the exact stage for {size} first")
    exact = np.stack([np.load(work / f"exact-{size}-q{q}.npy") for q in done])[None]
    qs = queries()[done]
    prev = load_record(work, "configs", size) or {"rows": []}
    rows = prev["rows"]
    for name, cfg in CONFIGS.items():
        if any(r["config"] == name for r in rows):
            continue
        path = work / f"config-{size}-{cfg['candidate_stride']}-{cfg['classes']}-{cfg['factory'].split(',')[0]}-{cfg['factory'].split(',')[-1]}"
        t0 = time.perf_counter()
        index = build_index(work_paths(work, size)["store"], path, ["7"], overwrite=True, progress=False, **cfg)
        build_s = time.perf_counter() - t0
        att = Attributor.open(path)
        att.attribute(qs[:1], 100, maps=0, **SERVE)
        for m in (200, 500):
            settings = {**SERVE, "candidates": m}
            t0 = time.perf_counter()
            res = att.attribute(qs, 100, maps=0, **settings)
            secs = (time.perf_counter() - t0) / len(qs)
            rows.append({"config": name, **cfg, "m": m, "build_s": build_s, "bytes": dir_bytes(path),
                         "vectors": int(sum(sum(sh["ntotal"]) for sh in index.manifest["scales"][0]["shards"])),
                         "s_per_query": secs, "outside": float(res.outside_mass.mean()),
                         **mean_fidelity(fidelity_table(res.scores, exact))})
            print(json.dumps(rows[-1]), flush=True)
        record(work, "configs", size, {"rows": rows})


def mean_fidelity(rows: list[dict]) -> dict:
    return {k: float(np.mean([r[k] for r in rows])) for k in ("top10_overlap", "spearman", "subset_sum_spearman", "relative_l1")}


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


STAGES = {"corpus": stage_corpus, "store": stage_store, "build": stage_build, "serve": stage_serve,
          "exact": stage_exact, "fidelity": stage_fidelity, "configs": stage_configs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stage", choices=[*STAGES, "all", "report"])
    ap.add_argument("--size", choices=list(SIZES), action="append", help="repeatable; default all sizes")
    ap.add_argument("--work", type=Path, default=ROOT / "results" / "million")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--exact-max", type=int, default=100_000, help="largest corpus scored exactly")
    ap.add_argument("--variants", type=json.loads, default=[
        {"k": 1024}, {"candidates": 200}, {"candidates": 400}, {"candidates": 800}, {"nprobe": 8}, {"nprobe": 64}, {"tail": False},
        {"rerank": 4}])
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    sizes = args.size or list(SIZES)
    if args.stage == "report":
        from million_report import report

        report(args.work, SIZES, SERVE)
        return
    stages = [s for s in STAGES if s != "configs"] if args.stage == "all" else [args.stage]
    for stage in stages:
        for size in (["1m"] if stage == "corpus" else sizes):
            print(f"== {stage} {size}", flush=True)
            STAGES[stage](args.work, size, args)


if __name__ == "__main__":
    main()
