#!/usr/bin/env python
"""Fidelity as the corpus grows: exact scores at 5k to 1M images on two corpora, and the index path against them.

    python tools/bench_scale.py store --corpus photos --size 100k                # the first 100k images as a store
    python tools/bench_scale.py exact --corpus crops --size 100k --t 100 300     # resumable, per query
    python tools/bench_scale.py speed --corpus crops --size 300k --index INDEX     # time only, where exact is not cached
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


def stage_exact(work: Path, corpus: str, size: str, ts: list[int], group: int, budget: str, count: int = QUERIES) -> None:
    """Exact scores of the first ``count`` queries not yet cached, ``group`` queries per pass over the store."""
    from nda_ann import Store, exact_attribution
    from nda_ann.atomic import write_json_atomic

    store = Store.open(store_path(work, corpus, size))
    images, names, _ = queries(work, corpus)
    for t in ts:
        todo = [q for q in range(min(count, len(images))) if not exact_path(work, corpus, size, t, q, "mass").exists()]
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


def fidelity_path(work: Path, corpus: str, size: str, t: int) -> Path:
    return Path(work) / "fidelity" / f"{corpus}-{size}-t{t}.json"


def open_warm(index: Path):
    """The index's Attributor, with the index and its stores read into the page cache first."""
    from warm import warm_page_cache

    from nda_ann import Attributor

    att = Attributor.open(index)
    warm_page_cache([Path(index), *att.searcher.store_paths()])
    return att


def read_rows(path: Path) -> list[dict]:
    """The rows recorded in ``path`` so far ([] before the first)."""
    return json.loads(path.read_text()) if path.exists() else []


def attribute_each(att, images: np.ndarray, qs: list[int], t: int, cfg: dict, before=None):
    """Yield (i, q, result, seconds) for each query ``q`` of ``qs`` attributed alone (what a user waits
    for), after one warm-up query; ``before(i)`` (if given) runs before each, the warm-up's included."""
    if before is not None:
        before(0)
    att.attribute(images[qs[0] : qs[0] + 1], t, **cfg)
    for i, q in enumerate(qs):
        if before is not None:
            before(i)
        t0 = time.perf_counter()
        res = att.attribute(images[q : q + 1], t, **cfg)
        yield i, q, res, time.perf_counter() - t0


def stage_fidelity(work: Path, corpus: str, size: str, t: int, index: Path, configs: list[dict], repeat: bool = False) -> None:
    """The index path against exact on the queries scored exactly, one row per settings in ``configs``
    (keyword arguments of ``Attributor.attribute``), each query attributed alone (what a user waits for).
    A settings entry ``"oracle_pool": true`` is not passed on: it ranks the pool the rounds draw from by
    the exact mass instead of the retrieved one (perfect candidate recall, the rest of the path as it is),
    which separates what the candidates cost from what the normaliser and the tail cost."""
    from bench_attribute import summarize

    from nda_ann.atomic import write_json_atomic

    done, exact = load_exact(work, corpus, size, t)
    if not done:
        raise SystemExit(f"no exact scores for {corpus} {size} t={t}: run the exact stage first")
    _, mass = load_exact(work, corpus, size, t, kind="mass")
    images, names, kinds = queries(work, corpus)
    att = open_warm(index)
    path = fidelity_path(work, corpus, size, t)
    rows = read_rows(path)
    for cfg in configs:
        cfg = {"topk": TOPK, **cfg}  # the exact scores' topk, whatever the attributor's default
        key = {"index": Path(index).name, **cfg}
        if not repeat and any(r["key"] == key for r in rows):
            continue
        scores, secs, recs, cand_exact, tail_exact = [], [], [], [], []
        kwargs = {k: v for k, v in cfg.items() if k != "oracle_pool"}
        shipped_pool = att._pool
        before = None
        if cfg.get("oracle_pool"):
            def before(i: int) -> None:
                att._pool = lambda _mass, cap, *rest: np.argsort(-mass[i], kind="stable")[:cap]
        for i, q, res, sec in attribute_each(att, images, done, t, kwargs, before):
            secs.append(sec)
            scores.append(res.scores[0, 0])
            cand = res.candidate_ids.get((0, 0), np.zeros(0, dtype=np.int64))
            held = float(mass[i][cand].sum())
            best = float(np.sort(mass[i])[::-1][: len(cand)].sum())
            total = float(mass[i].sum())
            is_cand = np.zeros(len(mass[i]), dtype=bool)
            is_cand[cand] = True
            cand_exact.append(np.where(is_cand, exact[i], scores[-1]))  # the re-scored images' exact scores, the tail as it is
            tail_exact.append(np.where(is_cand, scores[-1], exact[i]))  # the other way round
            rec = res.rounds.get((0, 0))
            recs.append({"m": len(cand), "est_outside": float(res.outside_mass[0, 0].mean()), "true_outside": 1 - held / total,
                         "recall": held / best if best > 0 else 1.0, "met": bool(rec.met) if rec else None, "kind": kinds[q],
                         "before_rounds": rec.before_rounds if rec else None})
        att._pool = shipped_pool
        scores = np.stack(scores)
        row = {"key": key, "queries": [names[q] for q in done], "s_per_query": secs, "per_query": recs,
               **summarize(scores, exact),
               # where the row loses: with the candidates' exact scores (their normaliser's error gone) or with the
               # non-candidates' exact scores (the tail's error gone), the other part as measured
               "with_exact_candidates": summarize(np.stack(cand_exact), exact), "with_exact_tail": summarize(np.stack(tail_exact), exact)}
        for kind in sorted(set(kinds[q] for q in done)):
            sel = [i for i, q in enumerate(done) if kinds[q] == kind]
            if len(sel) < len(done):
                row[f"by_kind_{kind}"] = summarize(scores[sel], exact[sel])
        rows = [r for r in rows if r["key"] != key] + [row]
        write_json_atomic(path, rows)
        print(json.dumps({k: v for k, v in row.items() if k not in ("per_query", "queries")}), flush=True)


def speed_path(work: Path, corpus: str, size: str, t: int) -> Path:
    return Path(work) / "speed" / f"{corpus}-{size}-t{t}.json"


def stage_speed(work: Path, corpus: str, size: str, t: int, index: Path, configs: list[dict], count: int) -> None:
    """The index path where no exact scores are cached (300k, 1M): seconds per query, M reached and the
    estimated outside share of the first ``count`` queries, one row per settings in ``configs``, each
    query attributed alone after a warm-up, index and store in the page cache; the process's peak RSS."""
    from nda_ann.atomic import write_json_atomic

    images, names, _ = queries(work, corpus)
    att = open_warm(index)
    path = speed_path(work, corpus, size, t)
    rows = read_rows(path)
    for cfg in configs:
        cfg = {"topk": TOPK, **cfg}
        key = {"index": Path(index).name, **cfg}
        secs, recs = [], []
        for _, _, res, sec in attribute_each(att, images, list(range(min(count, len(images)))), t, cfg):
            secs.append(sec)
            rec = res.rounds.get((0, 0))
            recs.append({"m": int(res.candidates_used[0, 0]), "est_outside": float(res.outside_mass[0, 0].mean()),
                         "stopped_by": rec.stopped_by if rec else None, "before_rounds": rec.before_rounds if rec else None})
        status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
        row = {"key": key, "queries": [names[q] for q in range(len(secs))], "s_per_query": secs, "per_query": recs,
               "vm_hwm_bytes": int(status["VmHWM"].split()[0]) * 1024, "images": att.corpus.count}
        rows = [r for r in rows if r["key"] != key] + [row]
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, rows)
        print(json.dumps({"key": key, "median_s": float(np.median(secs)), "m": [r["m"] for r in recs],
                          "est_outside": [round(r["est_outside"], 3) for r in recs]}), flush=True)


def oracle_rows(exact: np.ndarray, mass: np.ndarray, ms: list[int]) -> list[dict]:
    """What M candidates can give at best: the exact scores of the exact top M by score (the rest 0),
    against exact, and the share of the softmax mass the top M images hold."""
    from bench_attribute import summarize

    rows = []
    for m in ms:
        trunc = np.zeros_like(exact)
        top = np.argsort(-exact, axis=1)[:, :m]
        np.put_along_axis(trunc, top, np.take_along_axis(exact, top, 1), 1)
        share = float(np.mean([np.sort(mq)[::-1][:m].sum() / mq.sum() for mq in mass]))
        rows.append({"m": m, "mass_share": share, **summarize(trunc, exact)})
    return rows


def _settings_label(key: dict) -> str:
    """A short label of a fidelity row's settings (K and nprobe shown only where not the defaults)."""
    k = {a: b for a, b in key.items() if a not in ("index", "maps", "topk") and not (a == "k" and b == 1024)}
    if not k:
        return "defaults"
    names = {"candidates": "M", "time_budget": "budget s", "max_outside": "F", "outside_sample": "sample", "tail": "tail", "k": "K",
             "tail_retrieved": "tail from", "nprobe": "nprobe"}
    values = {("tail", True): "retrieved (unscaled)", ("tail", False): "off", ("tail", "scaled"): "scaled",
              ("tail_retrieved", "all"): "every retrieved patch", ("tail_retrieved", "remeasured"): "the 32 re-measured"}
    oracle = k.pop("oracle_pool", False)
    text = ", ".join(f"{names.get(a, a)} = {values.get((a, b), b)}" for a, b in k.items())
    return "pool ranked by the exact mass (oracle)" + (f", {text}" if text else "") if oracle else text


def _before_rounds(per_query: list[dict]) -> str:
    """The median seconds before the first round over a row's queries, '-' where the row has none recorded."""
    got = [p["before_rounds"] for p in per_query if p.get("before_rounds") is not None]
    return f"{np.median(got):.2f}" if got else "-"


def stage_report(work: Path, tag: str = "") -> None:
    """The fidelity and oracle tables of every corpus, size and t measured, into docs/benchmarks/scale.md;
    ``tag`` names a run kept beside the earlier ones (its own sections, e.g. after a kernel change)."""
    from bench_md import machine, simd, update_section

    for path in sorted((Path(work) / "fidelity").glob("*.json")):
        corpus, size, t = path.stem.split("-")
        t = int(t[1:])
        rows = json.loads(path.read_text())
        done, exact = load_exact(work, corpus, size, t)
        _, mass = load_exact(work, corpus, size, t, kind="mass")
        lines = [f"## {corpus}, {SIZES[size]:,} images, t = {t}{', ' + tag if tag else ''} (tools/bench_scale.py)", "",
                 f"`python tools/bench_scale.py fidelity --corpus {corpus} --size {size} --t {t} --index INDEX --configs ...` on "
                 f"{machine()}; {simd()}. {len(done)} held-out queries ({', '.join(sorted(set(r for r in rows[0]['per_query'] for r in [r['kind']])))}), "
                 "p = 7, topk 100, each attributed alone after a warm-up, index and store in the page cache; exact = the exact "
                 "scorer (float32) on the same noise. Columns: top-10 overlap, subset-sum Spearman, relative L1; M re-scored "
                 "(mean), estimated / true share of the softmax mass outside the M (mean), candidate recall (the M's share of "
                 "the exact mass over the exact top M's), median and slowest seconds per query, and the median of them before the "
                 "first round (search, tail distances, outside sample; '-' where not recorded) (load: the section 'Reading the scale figures' below).", "",
                 "| index | settings | top-10 | subset-sum | rel. L1 | M | est. / true outside | recall | s / query | slowest | before rounds |",
                 "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            pq = r["per_query"]
            lines.append(f"| {r['key']['index']} | {_settings_label(r['key'])} | {r['top10_overlap']:.3f} | {r['subset_sum_spearman']:.3f} | "
                         f"{r['relative_l1']:.3f} | {np.mean([p['m'] for p in pq]):.0f} | {np.mean([p['est_outside'] for p in pq]):.2f} / "
                         f"{np.mean([p['true_outside'] for p in pq]):.2f} | {np.mean([p['recall'] for p in pq]):.2f} | {np.median(r['s_per_query']):.2f} | {max(r['s_per_query']):.2f} | {_before_rounds(pq)} |")
        split = [r for r in rows if "with_exact_candidates" in r]
        if split:
            lines += ["", "Where each row loses: its top-10 overlap / subset-sum Spearman as measured, with the re-scored images' "
                      "exact scores in place of theirs (the error of their normaliser gone), and with the other images' exact "
                      "scores in place of the tail's (the tail's error gone):", "",
                      "| index | settings | as measured | exact candidates | exact tail |", "|---|---|---|---|---|"]
            for r in split:
                cells = [f"{x['top10_overlap']:.3f} / {x['subset_sum_spearman']:.3f}" for x in (r, r["with_exact_candidates"], r["with_exact_tail"])]
                lines.append(f"| {r['key']['index']} | {_settings_label(r['key'])} | " + " | ".join(cells) + " |")
        lines += ["", "What the M best images can give at most (their exact scores, the rest 0), and the share of the mass they hold:", "",
                  "| M | 100 | 200 | 500 | 1,000 | 2,000 | 5,000 | 10,000 |", "|---|---|---|---|---|---|---|---|"]
        ms = [m for m in (100, 200, 500, 1000, 2000, 5000, 10000) if m < SIZES[size]]
        orc = oracle_rows(exact, mass, ms)
        for label, key, fmt in (("top-10 overlap", "top10_overlap", "{:.2f}"), ("subset-sum Spearman", "subset_sum_spearman", "{:.3f}"),
                                ("mass share", "mass_share", "{:.2f}")):
            cells = [fmt.format(o[key]) for o in orc] + ["-"] * (7 - len(orc))
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        key = f"scale_{corpus}_{size}_t{t}" + (f"_{tag.replace(' ', '_')}" if tag else "")
        update_section(key, "\n".join(lines))
        print(f"wrote {key}")


def report_speed(work: Path) -> None:
    """The speed rows (no exact scores) into docs/benchmarks/scale.md."""
    from bench_md import machine, simd, update_section

    for path in sorted((Path(work) / "speed").glob("*.json")):
        corpus, size, t = path.stem.split("-")
        rows = json.loads(path.read_text())
        lines = [f"## {corpus}, {SIZES[size]:,} images, t = {t[1:]}: time without exact scores (tools/bench_scale.py speed)", "",
                 f"`python tools/bench_scale.py speed --corpus {corpus} --size {size} --t {t[1:]} --index INDEX --configs ...` on "
                 f"{machine()}; {simd()}. {len(rows[0]['queries'])} held-out queries, p = 7, topk 100, each attributed alone after a "
                 "warm-up, index and store in the page cache. No exact scores at this size: fidelity is not measured here. "
                 "Columns: M re-scored (mean), estimated share of the mass outside the M (mean), median seconds per query, peak "
                 "resident memory of the process (load: the section 'Reading the scale figures' above).", "",
                 "| index | settings | M | est. outside | s / query | peak RSS |", "|---|---|---|---|---|---|"]
        for r in rows:
            pq = r["per_query"]
            lines.append(f"| {r['key']['index']} | {_settings_label(r['key'])} | {np.mean([p['m'] for p in pq]):.0f} | "
                         f"{np.mean([p['est_outside'] for p in pq]):.2f} | {np.median(r['s_per_query']):.2f} | "
                         f"{r['vm_hwm_bytes'] / 2**30:.1f} GiB |")
        update_section(f"scale_speed_{corpus}_{size}_{t}", "\n".join(lines))
        print(f"wrote scale_speed_{corpus}_{size}_{t}")


def stage_status(work: Path) -> None:
    for corpus in ("crops", "photos"):
        for size in SIZES:
            for t in (100, 300):
                done, _ = load_exact(work, corpus, size, t)
                if done:
                    print(f"{corpus:7s} {size:5s} t={t}: exact for queries {done}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stage", choices=["store", "exact", "fidelity", "speed", "oracle", "report", "status"])
    ap.add_argument("--index", type=Path, default=None, help="fidelity: the index to attribute through")
    ap.add_argument("--configs", type=json.loads, default=[{}], help="fidelity: JSON list of Attributor.attribute settings")
    ap.add_argument("--repeat", action="store_true", help="fidelity: measure again a settings row already recorded")
    ap.add_argument("--work", type=Path, default=ROOT / "results")
    ap.add_argument("--corpus", choices=["crops", "photos"], default="crops")
    ap.add_argument("--size", choices=list(SIZES), default="100k")
    ap.add_argument("--t", type=int, nargs="+", default=[100])
    ap.add_argument("--group", type=int, default=4, help="queries per pass over the store")
    ap.add_argument("--budget", default="4G", help="memory budget of the exact scorer")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--tag", default="", help="report: sections of their own for this run (e.g. 'conv kernel'), beside the earlier ones")
    ap.add_argument("--queries", type=int, default=QUERIES, help="exact / speed: only the first N queries (the large sizes)")
    args = ap.parse_args()
    if args.stage == "store":
        stage_store(args.work, args.corpus, args.size, args.workers)
    elif args.stage == "exact":
        stage_exact(args.work, args.corpus, args.size, args.t, args.group, args.budget, args.queries)
    elif args.stage == "oracle":
        for t in args.t:
            done, exact = load_exact(args.work, args.corpus, args.size, t)
            _, mass = load_exact(args.work, args.corpus, args.size, t, kind="mass")
            for row in oracle_rows(exact, mass, [100, 200, 500, 1000, 2000, 5000, 10000]):
                print(json.dumps({"t": t, "queries": len(done), **row}))
    elif args.stage == "fidelity":
        for t in args.t:
            stage_fidelity(args.work, args.corpus, args.size, t, args.index, args.configs, args.repeat)
    elif args.stage == "speed":
        for t in args.t:
            stage_speed(args.work, args.corpus, args.size, t, args.index, args.configs, args.queries)
    elif args.stage == "report":
        stage_report(args.work, args.tag)
        report_speed(args.work)
    else:
        stage_status(args.work)


if __name__ == "__main__":
    main()
