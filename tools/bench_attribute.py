"""Fidelity and speed of the index path against the exact scorer (docs/scores.md sections 5 and 7).

Real 32x32 photo crops (the embedded corpus generator), held-out queries. Everything expensive is
cached under --work (stores, indexes, exact scores), so a rerun or an interrupted run resumes.

    # fidelity curves over K, M, nprobe and mode, paper settings, t = 100 / 300 / 500
    python tools/bench_attribute.py fidelity --n 3000 --queries 6
    # speed against N: index path vs exact, batch 1 and 64
    python tools/bench_attribute.py speed --sizes 1000 5000 20000
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

CONFIGS = {
    "p7": {"scales": ["7"], "alpha": None, "topk": 100},
    "two-scale": {"scales": ["14", "10:2"], "alpha": 0.5, "topk": 100},
}


def corpus(n: int, queries: int, work: Path):
    """(store, queries (Q, C, 32, 32) float) of n training crops; the store is cached."""
    from nda_ann import Store, demo_corpus, write_store
    from nda_ann.corpus.store import uint8_to_float

    dc = demo_corpus(n_train=n, n_queries=queries, seed=0)
    path = work / f"store-{n}"
    store = Store.open(path) if (path / "manifest.json").exists() else write_store(path, dc.train, dc.train_sources)
    return store, uint8_to_float(dc.queries)


def index_for(store, scales, work: Path, factory: str, stride: int, classes: str = "all"):
    from nda_ann import PatchIndex, build_index

    name = f"index-{len(store)}-{'_'.join(s.replace(':', 'f') for s in scales)}-{factory.replace(',', '_').replace('{', '').replace('}', '')}-s{stride}"
    name += "" if classes == "all" else f"-{classes}"
    path = work / name
    t0 = time.perf_counter()
    if (path / "manifest.json").exists():
        return PatchIndex.open(path), None
    index = build_index(store, path, scales, factory=factory, candidate_stride=stride, classes=classes, progress=False)
    return index, time.perf_counter() - t0


def exact_cached(store, queries, cfg_name: str, timesteps, work: Path) -> np.ndarray:
    """(T, Q, N) exact float32-arithmetic scores, cached per (N, config, t)."""
    from nda_ann import exact_scores

    cfg = CONFIGS[cfg_name]
    out = []
    for t in timesteps:
        path = work / f"exact-{len(store)}-{cfg_name}-q{len(queries)}-t{t}.npy"
        if path.exists():
            out.append(np.load(path))
            continue
        t0 = time.perf_counter()
        s = exact_scores(store, queries, timesteps=[t], scales=cfg["scales"], alpha=cfg["alpha"], topk=cfg["topk"], precision="float32")[0]
        secs = time.perf_counter() - t0
        np.save(path.with_suffix(".tmp.npy"), s)
        Path(path.with_suffix(".tmp.npy")).replace(path)
        (work / f"{path.stem}.json").write_text(json.dumps({"seconds": secs, "queries": len(queries)}))
        out.append(s)
    return np.stack(out)


def summarize(approx: np.ndarray, exact: np.ndarray) -> dict[str, float]:
    from nda_ann.results.fidelity import fidelity_table

    rows = fidelity_table(approx[None], exact[None])
    return {k: float(np.mean([r[k] for r in rows])) for k in ("top10_overlap", "spearman", "subset_sum_spearman", "relative_l1")}


def fidelity(args) -> None:
    from nda_ann import Attributor, Store
    from nda_ann.corpus.inputs import CorpusView

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.from_json:  # only (re)write the section and plot from an earlier run's rows
        rows = json.loads((work / (args.out or f"fidelity-{args.n}.json")).read_text())
        write_fidelity(rows, args, None)
        return
    store, queries = corpus(args.n, args.queries, work)
    rows = []
    for cfg_name in args.configs:
        cfg = CONFIGS[cfg_name]
        index, build_s = index_for(store, cfg["scales"], work, args.factory, args.stride, args.classes)
        att = Attributor(index, CorpusView(Store.open(store.path)), index.scales)
        exact = exact_cached(store, queries, cfg_name, args.timesteps, work)
        for ti, t in enumerate(args.timesteps):
            settings = [("fast", k, 0, None, False) for k in args.ks if not args.no_fast]
            settings += [("rescore", k, m, None, True) for k in args.ks for m in args.ms]
            settings += [("rescore", args.ks[-1], args.ms[-2] if len(args.ms) > 1 else args.ms[0], p, True) for p in args.nprobes]
            settings += [("rescore", args.ks[-1], m, None, False) for m in args.ms if args.no_tail_rows]
            for mode, k, m, nprobe, tail in settings:
                t0 = time.perf_counter()
                res = att.attribute(queries, [t], k=k, candidates=max(m, 1), nprobe=nprobe, mode=mode, alpha=cfg["alpha"], topk=cfg["topk"], maps=0, tail=tail)
                secs = (time.perf_counter() - t0) / len(queries)
                fid = summarize(res.scores[0], exact[ti])
                out_mass = float(res.outside_mass.mean()) if mode == "rescore" else float("nan")
                row = {"config": cfg_name, "t": t, "mode": mode + ("" if tail or mode == "fast" else ", no tail"), "k": k, "m": m, "nprobe": nprobe or "default", "s_per_query": secs, "outside": out_mass, **fid}
                rows.append(row)
                print(json.dumps(row), flush=True)
    (work / (args.out or f"fidelity-{args.n}.json")).write_text(json.dumps(rows, indent=1))
    if not args.no_write:
        write_fidelity(rows, args, store)


def write_fidelity(rows, args, store) -> None:
    from bench_md import machine, update_section

    name = args.section or f"bench_attribute_fidelity_{args.n}"
    lines = [f"## Index-path fidelity, N = {args.n:,}{' (' + args.title + ')' if args.title else ''} (tools/bench_attribute.py fidelity)", "",
             f"`python tools/bench_attribute.py fidelity --n {args.n} --queries {args.queries}{' ' + args.title_args if args.title_args else ''}` on {machine()}.",
             f"{args.queries} held-out queries; exact = the exact scorer (float32) on the same noise; index factory `{args.factory}`, candidate stride {args.stride}.",
             "Columns: top-10 overlap, Spearman over all N, subset-sum Spearman (64 random 50% subsets), relative L1, estimated mass outside the candidates, seconds per query (one timestep, all scales).", "",
             "| config | t | mode | K | M | nprobe | top-10 | Spearman | subset-sum | rel. L1 | outside | s/query |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['config']} | {r['t']} | {r['mode']} | {r['k']} | {r['m'] if r['mode'].startswith('rescore') else '-'} | {r['nprobe']} | {r['top10_overlap']:.2f} | {r['spearman']:.3f} | {r['subset_sum_spearman']:.3f} | {r['relative_l1']:.3f} | {r['outside']:.3f} | {r['s_per_query']:.2f} |")
    update_section(name, "\n".join(lines))
    if not args.section:
        plot_fidelity(rows, Path(__file__).resolve().parent.parent / "docs" / f"fidelity-{args.n}.png")


def plot_fidelity(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for metric, ax in zip(("top10_overlap", "subset_sum_spearman"), axes):
        for (cfg, t), marker in zip(sorted({(r["config"], r["t"]) for r in rows}), "osd^v<>ph*"):
            sel = [r for r in rows if r["config"] == cfg and r["t"] == t and r["mode"] == "rescore"]
            ax.plot([r["s_per_query"] for r in sel], [r[metric] for r in sel], marker=marker, linestyle="", label=f"{cfg} t={t}")
        ax.set_xlabel("seconds per query (one timestep)")
        ax.set_ylabel(metric)
        ax.set_xscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("index path: fidelity against time over K, M and nprobe")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def speed(args) -> None:
    from nda_ann import Attributor, Store, exact_scores
    from nda_ann.corpus.inputs import CorpusView
    from warm import warm_page_cache

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.from_json:
        return write_speed_section(json.loads((work / "speed.json").read_text()), args)
    rows = []
    for n in args.sizes:
        store, queries = corpus(n, max(args.batch + [args.singles]), work)
        index, build_s = index_for(store, ["7"], work, args.factory, args.stride, args.classes)
        att = Attributor(index, CorpusView(Store.open(store.path)), index.scales, thumbs=index.thumbnails())
        kw = {"nprobe": args.nprobe, **({"candidates": args.candidates} if args.candidates else {})}
        warm_page_cache([index.path, store.path])  # the index in memory, as a server has it
        att.attribute(queries[:1], 100, topk=100, maps=args.maps, **kw)  # warm-up
        row = {"n": n, "build_s": build_s, "index_bytes": sum(f.stat().st_size for f in Path(index.path).rglob("*") if f.is_file())}
        for b in args.batch:
            if b == 1:  # batch 1: each of the first --singles queries on its own, the mean; with the default maps and without
                for maps in (args.maps, 0):
                    times = []
                    for q in range(args.singles):
                        t0 = time.perf_counter()
                        att.attribute(queries[q : q + 1], 100, topk=100, maps=maps, **kw)
                        times.append(time.perf_counter() - t0)
                    tag = "" if maps == args.maps else "_nomaps"
                    row[f"index_s_per_query_b1{tag}"], row[f"index_s_b1_min_max{tag}"] = float(np.mean(times)), [min(times), max(times)]
                continue
            t0 = time.perf_counter()
            att.attribute(queries[:b], 100, topk=100, maps=args.maps, **kw)
            row[f"index_s_per_query_b{b}"] = (time.perf_counter() - t0) / b
        t0 = time.perf_counter()
        exact_scores(store, queries[: args.exact_queries], timesteps=100, scales=["7"], topk=100, precision="float32")
        row["exact_s_per_query"] = (time.perf_counter() - t0) / args.exact_queries
        rows.append(row)
        print(json.dumps(row), flush=True)
    (work / "speed.json").write_text(json.dumps(rows, indent=1))
    if not args.no_write:
        write_speed_section(rows, args)


def write_speed_section(rows: list[dict], args) -> None:
    """The bench_attribute_speed section of docs/benchmarks/speed.md from the speed rows."""
    from bench_md import machine, simd, update_section

    m = f"M = {args.candidates}" if args.candidates else ("M the default (re-scored in rounds until 30% of the softmax mass is estimated "
                                                           "outside the M, at most 1,000; every image where N <= 256)")
    batches = [b for b in args.batch if b != 1]
    lines = ["## Index path vs exact: time against N (tools/bench_attribute.py speed)", "",
             f"`python tools/bench_attribute.py speed --sizes {' '.join(map(str, args.sizes))} --batch {' '.join(map(str, args.batch))}"
             f"{f' --nprobe {args.nprobe}' if args.nprobe else ''}` on {machine()}; {simd()}.{f' {args.note}' if args.note else ''}",
             f"p = 7, t = 100, topk 100, K = 1024, {m}, nprobe {args.nprobe or 'of each index'}, index factory `{args.factory}`, "
             f"candidate stride {args.stride}, classes {args.classes}; index and store read once into the page cache before timing (as a "
             f"server has them); batch 1 is the mean of {args.singles} queries attributed one call each (fastest and slowest in brackets), "
             f"with the default {args.maps} heatmaps kept (what the CLI and API do) and without"
             f"{''.join(f'; batch {b} one call' for b in batches)}; exact: {args.exact_queries} query; one run, so the ratios are the figures "
             "to read.", "",
             f"| N | index on disk | index s/query (batch 1, {args.maps} maps) | without maps |"
             + "".join(f" index s/query (batch {b}) |" for b in batches) + " exact s/query | exact / index |",
             "|---|---|---|---|" + "---|" * len(batches) + "---|---|"]
    for r in rows:
        spread = f" ({r['index_s_b1_min_max'][0]:.2f}-{r['index_s_b1_min_max'][1]:.2f})" if "index_s_b1_min_max" in r else ""
        nomaps = f"{r['index_s_per_query_b1_nomaps']:.3f}" if "index_s_per_query_b1_nomaps" in r else "-"
        b1 = r["index_s_per_query_b1"]
        lines.append(f"| {r['n']:,} | {r['index_bytes'] / 2**30:.2f} GiB | {b1:.3f}{spread} | {nomaps} |"
                     + "".join(f" {r[f'index_s_per_query_b{b}']:.3f} |" for b in batches)
                     + f" {r['exact_s_per_query']:.2f} | {r['exact_s_per_query'] / b1:.1f}x |")
    update_section("bench_attribute_speed", "\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="results/bench", help="cache folder for stores, indexes and exact scores")
    ap.add_argument("--factory", default="auto")
    ap.add_argument("--stride", type=int, default=1)
    ap.add_argument("--classes", choices=["all", "interior"], default="all")
    ap.add_argument("--no-write", action="store_true")
    sub = ap.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fidelity")
    f.add_argument("--n", type=int, default=3000)
    f.add_argument("--queries", type=int, default=6)
    f.add_argument("--configs", nargs="+", default=list(CONFIGS))
    f.add_argument("--timesteps", type=int, nargs="+", default=[100, 300, 500])
    f.add_argument("--ks", type=int, nargs="+", default=[256, 1024])
    f.add_argument("--ms", type=int, nargs="+", default=[50, 100, 200, 500])
    f.add_argument("--nprobes", type=int, nargs="*", default=[])
    f.add_argument("--no-tail-rows", action="store_true", help="also rescore rows with tail=False (docs/scores.md section 5's estimator)")
    f.add_argument("--no-fast", action="store_true", help="skip the fast-mode rows")
    f.add_argument("--out", default=None, help="results JSON name under --work (default fidelity-N.json)")
    f.add_argument("--from-json", action="store_true", help="write the section from --out's rows; run nothing")
    f.add_argument("--section", default=None, help="BENCHMARKS.md section name (default bench_attribute_fidelity_N; no plot when given)")
    f.add_argument("--title", default="", help="words added to the section title")
    f.add_argument("--title-args", default="", help="the extra arguments of the run, shown in the section")
    s = sub.add_parser("speed")
    s.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000, 20000])
    s.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    s.add_argument("--exact-queries", type=int, default=1)
    s.add_argument("--singles", type=int, default=8, help="queries timed one at a time for the batch-1 figure (their mean)")
    s.add_argument("--candidates", type=int, default=None, help="M (default: the library default)")
    s.add_argument("--nprobe", type=int, default=None, help="IVF lists probed (default: each index's manifest)")
    s.add_argument("--maps", type=int, default=8, help="heatmaps kept (the CLI and API default); batch 1 is also timed without")
    s.add_argument("--from-json", action="store_true", help="write the section from --work's speed.json; run nothing")
    s.add_argument("--note", default="", help="a sentence on the machine's load, added to the section")
    args = ap.parse_args()
    fidelity(args) if args.cmd == "fidelity" else speed(args)


if __name__ == "__main__":
    main()
