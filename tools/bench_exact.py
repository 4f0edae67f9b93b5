"""Benchmark of the exact scorer: seconds per query image and peak RSS against corpus size N.

Each configuration runs in a fresh subprocess so that its peak RSS is its own. Real 32x32 photo
crops (the embedded corpus generator), p = 7, one timestep, topk 100 (the paper's setting).

    python tools/bench_exact.py --sizes 1000 5000 --queries 2
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))


def run_one(n: int, queries: int, precision: str, scale: str, timestep: int) -> dict:
    """Time exact_scores for ``queries`` queries against n images (runs in the child process)."""
    import torch

    from nda_ann import demo_corpus, exact_scores
    from nda_ann.corpus.store import uint8_to_float

    dc = demo_corpus(n_train=n, n_queries=queries, seed=0)
    corpus, q = uint8_to_float(dc.train), uint8_to_float(dc.queries)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    exact_scores(corpus[:50], q[:1], timesteps=timestep, scales=[scale], topk=100, precision=precision)  # warm-up
    t0 = time.perf_counter()
    exact_scores(corpus, q, timesteps=timestep, scales=[scale], topk=100, precision=precision)
    secs = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"n": n, "queries": queries, "precision": precision, "scale": scale, "seconds_per_query": secs / queries,
            "peak_rss_mib": peak / 1024, "corpus_mib": corpus.numel() * 4 / 2**20, "threads": torch.get_num_threads(), "rss_before_mib": base / 1024}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000])
    ap.add_argument("--queries", type=int, default=2)
    ap.add_argument("--precisions", nargs="+", default=["float32", "float64"])
    ap.add_argument("--scale", default="7")
    ap.add_argument("--timestep", type=int, default=100)
    ap.add_argument("--child", nargs=3, metavar=("N", "PRECISION", "QUERIES"), help=argparse.SUPPRESS)
    ap.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = ap.parse_args()
    if args.child:
        n, precision, queries = args.child
        print(json.dumps(run_one(int(n), int(queries), precision, args.scale, args.timestep)))
        return
    rows = []
    for precision in args.precisions:
        for n in args.sizes:
            out = subprocess.run([sys.executable, __file__, "--child", str(n), precision, str(args.queries), "--scale", args.scale, "--timestep", str(args.timestep)],
                                 check=True, capture_output=True, text=True)
            row = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(f"N={n:>6} {precision}: {row['seconds_per_query']:.2f} s/query, peak RSS {row['peak_rss_mib']:.0f} MiB", flush=True)
    from bench_md import machine, simd, update_section

    lines = [
        "## Exact scorer (tools/bench_exact.py)",
        "",
        f"`python tools/bench_exact.py --sizes {' '.join(map(str, args.sizes))} --queries {args.queries}` on {machine()}; {simd()}.",
        f"Real 32x32 photo crops, p = {args.scale}, t = {args.timestep}, topk 100, {args.queries} queries batched; peak RSS of a fresh process",
        "(includes Python, torch and the corpus as float32).",
        "",
        "| N | precision | s / query | per 1,000 images | peak RSS (MiB) | corpus float32 (MiB) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['n']:,} | {r['precision']} | {r['seconds_per_query']:.2f} | {1000 * r['seconds_per_query'] / r['n']:.2f} | {r['peak_rss_mib']:.0f} | {r['corpus_mib']:.0f} |")
    by = {(r["precision"], r["n"]): r for r in rows}
    if len(args.sizes) >= 2:
        a, b = args.sizes[0], args.sizes[-1]
        for p in args.precisions:
            ratio = by[(p, b)]["seconds_per_query"] / by[(p, a)]["seconds_per_query"]
            verdict = "linear in N" if abs(ratio / (b / a) - 1) < 0.3 else "off linear: other load on the machine during this run; rerun to refresh"
            lines.append(f"\n{p}: time grows {ratio:.1f}x from N = {a:,} to {b:,} ({b / a:.0f}x the images): {verdict}.")
    if "float32" in args.precisions and "float64" in args.precisions:
        n = args.sizes[-1]
        lines.append(f"float64 (the reference default) costs {by[('float64', n)]['seconds_per_query'] / by[('float32', n)]['seconds_per_query']:.1f}x float32 at N = {n:,}.")
    lines.append("Memory is bounded by the chunk budget (1 GiB of logits) plus Q x L x N log-masses (or two passes past the budget), not by N x L patch vectors.")
    if not args.no_write:
        update_section("bench_exact", "\n".join(lines))
        print("updated BENCHMARKS.md")


if __name__ == "__main__":
    main()
