"""How well the index path estimates the non-candidates' mass, and what it costs the scores.

For one corpus, timestep and M, with p = 7 and topk 100 (paper settings), against the exact scorer:
- the shipped estimator (outside.py) at several sample sizes, guided (the default) and uniform;
- an oracle normaliser: the exact softmax normaliser of every query position, so the candidates
  score exactly: what a perfect outside estimate would give;
- oracle candidates as well: the exact top M images, the limit of the two-stage estimator at M.

    python tools/bench_outside.py --n 5000 --t 300 --m 500          # bench corpus (cached stores)
    python tools/bench_outside.py --million /work/big/million --size 100k --m 200   # million run

The million mode uses tools/million.py's index, queries and cached exact scores (no oracle
normaliser there: it would cost an exact run per query).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import nda_ann.attribution.attributor as attribution  # noqa: E402
from nda_ann.attribution.settings import DEFAULT_OUTSIDE_SAMPLE  # noqa: E402
from bench_attribute import summarize  # noqa: E402
from nda_ann import Attributor, Store  # noqa: E402
from nda_ann.attribution.rescore import Rescored  # noqa: E402
from nda_ann.scoring.dense import log_masses  # noqa: E402
from nda_ann.corpus.inputs import CorpusView  # noqa: E402
from nda_ann.scoring.patches import extract_patches  # noqa: E402
from nda_ann.scoring.schedule import NoiseSchedule, noise_images  # noqa: E402


def exact_log_normalisers(view: CorpusView, queries: torch.Tensor, att: Attributor, t: int, work: Path) -> torch.Tensor:
    """(Q, L) float64 log of the exact softmax normaliser at every query position (cached)."""
    path = work / f"logz-{view.count}-p7-q{len(queries)}-t{t}.npy"
    if path.exists():
        return torch.from_numpy(np.load(path))
    sc = att.scales[0]
    s, sigma2 = NoiseSchedule("linear").signal_and_noise(t)
    qp = extract_patches(noise_images(queries, t, NoiseSchedule("linear"), 0, 0).double(), sc)
    out = torch.full(qp.shape[:2], -math.inf, dtype=torch.float64)
    for lo in range(0, view.count, 250):
        cp = extract_patches(view.rows(lo, min(lo + 250, view.count)).double() * s, sc)
        out = torch.logaddexp(out, torch.logsumexp(log_masses(qp, cp, att.groups[sc], 1 / (2 * sigma2), None)[0], -1))
    np.save(path, out.numpy())
    return out


class OracleAttributor(Attributor):
    """The index path with an oracle normaliser and, optionally, oracle candidates (one scale)."""

    log_z: torch.Tensor | None = None
    exact: np.ndarray | None = None

    def _candidates(self, q, mass, m, *args, **kwargs):
        if self.exact is None:
            return super()._candidates(q, mass, m, *args, **kwargs)
        return np.sort(np.argsort(-self.exact[q], kind="stable")[:m])

    def _rescore(self, q, cand, patches, weights, settings, s, sigma2, retrieved_out, sampled, hint=None):
        if self.log_z is None:
            return super()._rescore(q, cand, patches, weights, settings, s, sigma2, retrieved_out, sampled, hint)
        sc = self.scales[0]
        full, agg = log_masses(patches[(0, sc)].double(), extract_patches(self.corpus.take(cand).double() * s, sc), self.groups[sc], 1 / (2 * sigma2), settings.topk)
        log_z = self.log_z[q]
        scores = torch.exp(agg[0] - log_z[:, None]).sum(0).numpy()
        outside = 1 - float(torch.exp(torch.logsumexp(full[0], -1) - log_z).mean())
        return Rescored(cand, scores, {}, np.array([outside]), {(0, sc): log_z})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--t", type=int, default=300)
    ap.add_argument("--m", type=int, default=500)
    ap.add_argument("--queries", type=int, default=6)
    ap.add_argument("--samples", type=int, nargs="+", default=[512, 2048, 8192])
    ap.add_argument("--work", default="results/bench")
    ap.add_argument("--million", default=None, help="tools/million.py work folder: use its index, queries and exact scores")
    ap.add_argument("--size", default="100k")
    ap.add_argument("--index", default=None, help="with --million: another index of the same store (default: the run's)")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()

    if args.million:
        import million

        work = Path(args.million)
        done = [q for q in range(million.QUERIES) if (work / f"exact-{args.size}-q{q}.npy").exists()]
        exact = np.stack([np.load(work / f"exact-{args.size}-q{q}.npy") for q in done])
        base = Attributor.open(args.index or million.work_paths(work, args.size)["index"])
        att = OracleAttributor(base.searcher, base.corpus, base.scales, thumbs=base._thumbs)
        queries, t, settings = million.queries()[done], 100, {**million.SERVE, "candidates": args.m}
        log_z = None
        label = f"million run, {args.size}, t = 100, M = {args.m}, K = {settings['k']}, nprobe {settings['nprobe']}"
        label += f", index {Path(args.index).name}" if args.index else ""
        cmd = f"python tools/bench_outside.py --million WORK --size {args.size} --m {args.m}" + (f" --index WORK/{Path(args.index).name}" if args.index else "")
    else:
        from bench_attribute import corpus, exact_cached, index_for

        work = Path(args.work)
        store, queries = corpus(args.n, args.queries, work)
        index, _ = index_for(store, ["7"], work, "auto", 1)
        view = CorpusView(Store.open(store.path))
        att = OracleAttributor(index, view, index.scales)
        exact = exact_cached(store, queries, "p7", [args.t], work)[0]
        t, settings = args.t, {"k": 1024, "candidates": args.m, "topk": 100}
        log_z = exact_log_normalisers(view, queries, att, t, work)
        label = f"{args.n:,} crops, t = {t}, M = {args.m}, K = 1,024, stride-1 index"
        cmd = f"python tools/bench_outside.py --n {args.n} --t {t} --m {args.m}"

    rows = []

    def run(name: str, oracle_z: bool = False, oracle_cand: bool = False, sample: int | None = None, guide: float = 0.5):
        att.log_z = log_z if oracle_z else None
        att.exact = exact if oracle_cand else None
        attribution.GUIDE_SHARE = guide
        t0 = time.perf_counter()
        res = att.attribute(queries, t, maps=0, outside_sample=sample, **settings)
        secs = (time.perf_counter() - t0) / len(queries)
        rows.append({"estimator": name, "s_per_query": secs, "outside": float(res.outside_mass.mean()), **summarize(res.scores[0], exact)})
        print(json.dumps(rows[-1]), flush=True)

    for size in args.samples:
        run(f"guided sample of {size:,} images (default: {DEFAULT_OUTSIDE_SAMPLE:,})", sample=size)
    for size in args.samples:
        run(f"uniform sample of {size:,} images", sample=size, guide=0.0)
    run("retrieved patches only (no sample)", sample=0)
    if log_z is not None:
        run("oracle normaliser", oracle_z=True)
        run("oracle normaliser and oracle candidates", oracle_z=True, oracle_cand=True)
    run("oracle candidates, default estimator", oracle_cand=True)
    attribution.GUIDE_SHARE = 0.5

    if args.no_write:
        return
    from bench_md import machine, update_section

    true_out = ""
    if log_z is not None:
        true_out = " The true mass outside the M is in the oracle-normaliser rows' `outside` column."
    lines = [f"## Estimating the mass outside the candidates: {label} (tools/bench_outside.py)", "",
             f"`{cmd}` on {machine()}; {len(queries)} queries, p = 7, topk 100, tail scores on.",
             "Columns: top-10 overlap, subset-sum Spearman, relative L1 against exact; mean estimated share of the "
             f"softmax mass outside the M candidates; seconds per query (one timestep).{true_out}", "",
             "| estimator | top-10 | subset-sum | rel. L1 | outside | s/query |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['estimator']} | {r['top10_overlap']:.2f} | {r['subset_sum_spearman']:.3f} | {r['relative_l1']:.3f} | {r['outside']:.3f} | {r['s_per_query']:.2f} |")
    name = (f"outside_{args.size}" + (f"_{Path(args.index).name}" if args.index else "")) if args.million else f"outside_{args.n}_t{t}"
    update_section(name, "\n".join(lines))


if __name__ == "__main__":
    main()
