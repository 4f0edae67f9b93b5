"""Candidate recall by ranking: how much of the exact mass the M candidates hold, and what would raise it.

    python tools/bench_recall.py --corpus crops --size 100k --index INDEX      # needs bench_scale.py's exact cache

For each query whose exact scores are cached (tools/bench_scale.py exact), the index is searched as the
attributor searches it, and M candidates are chosen by several rankings. Each is scored by its
**recall**: the chosen M's share of the exact softmax mass over the exact top M's share (1 = the best
M images). Rows:

- ``retrieved``: the shipped ranking, each image's softmax mass over the K retrieved patches;
- ``retrieved, exact distances``: the same hits with distances re-measured from the store's pixels
  (what a lossless code would give);
- ``k`` / ``nprobe``: more neighbours, more probed lists;
- ``refined``: the first R hits of each query patch re-measured exactly at every same-layout position
  of their stride-4 cell (4 x 4 positions, the grid point and the 15 between it and the next), their
  logits replaced by the cell's log-sum-exp: what indexing every position would give those hits;
- ``--rerank`` proxy: a pool of 4 x M by retrieved mass, re-ranked by exact mass at a subset of query
  positions (attribution/rerank.py: every border position and 1 in 9 interior ones);
- ``perfect re-rank of P x M``: the ceiling of any re-ranker of that pool (the pool's best M by exact mass).

Nothing here is timed: recall does not depend on the machine or its load.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_scale import load_exact  # noqa: E402
from scale_corpora import queries  # noqa: E402

MS = (300, 500, 1000)
POOLS = (2, 4, 8)


def recall(exact_mass: np.ndarray, chosen: np.ndarray, m: int) -> float:
    """The first ``m`` of ``chosen`` (ids) hold this share of the exact mass held by the exact top ``m``."""
    best = np.sort(exact_mass)[::-1][:m].sum()
    return float(exact_mass[chosen[:m]].sum() / best) if best > 0 else 1.0


def pool_ceiling(exact_mass: np.ndarray, ranked: np.ndarray, m: int, pool: int) -> float:
    """Recall at ``m`` of a perfect re-ranker of the first ``pool`` x ``m`` of ``ranked``."""
    cand = ranked[: pool * m]
    return recall(exact_mass, cand[np.argsort(-exact_mass[cand], kind="stable")], m)


def ranked_by(mass: np.ndarray) -> np.ndarray:
    """Image ids by ``mass`` (N,), largest first (ties by id, as the attributor breaks them)."""
    return np.argsort(-mass, kind="stable")


def remeasured_mass(att, nb, key, hits, kk: int) -> np.ndarray:
    """(N,) retrieved softmax mass from the first ``kk`` hits of each query patch, distances exact."""
    from nda_ann.attribution.candidates import sum_by_image

    dist, image, position = (a[:, :kk] for a in hits)
    ok = image >= 0
    u, k = np.nonzero(ok)
    qv = nb.vectors[key][0].double() / nb.s
    y = att.corpus.patch_vectors(image[u, k], position[u, k], key[1]).double()
    exact = np.full(image.shape, np.inf)
    exact[u, k] = (qv[torch.from_numpy(u)] - y).square().sum(-1).numpy()
    logits = torch.from_numpy(exact * (-(nb.s * nb.s) / (2 * nb.sigma2)))
    w = torch.softmax(logits, -1).nan_to_num_(0.0).numpy()
    return sum_by_image(np.where(ok, image, -1), w, att.corpus.count)


def refined_mass(att, nb, key, hits, r: int) -> np.ndarray:
    """(N,) retrieved softmax mass, the first ``r`` hits of each query patch refined to the log-sum-exp of
    their exact logits over the same-layout positions of their stride-4 cell (offsets -2..1 on each axis)."""
    from nda_ann.attribution.candidates import sum_by_image
    from nda_ann.scoring.patches import layout_of_positions

    dist, image, position = hits
    sc = key[1]
    g = sc.grid(att.corpus.shape[1])
    layout = layout_of_positions(att.corpus.shape[1], sc).numpy()
    offs = np.array([(a, b) for a in range(-2, 2) for b in range(-2, 2)])  # (16, 2)
    u, k = np.nonzero(image[:, :r] >= 0)
    img, pos = image[u, k], position[u, k]
    ny, nx = (pos // g)[:, None] + offs[None, :, 0], (pos % g)[:, None] + offs[None, :, 1]  # (E, 16)
    ok = (ny >= 0) & (ny < g) & (nx >= 0) & (nx < g)
    cell = np.where(ok, ny * g + nx, pos[:, None])
    ok &= layout[cell] == layout[pos][:, None]
    qv = nb.vectors[key][0].double() / nb.s
    y = att.corpus.patch_vectors(np.repeat(img, len(offs)), cell.ravel(), sc).double()
    scale = -(nb.s * nb.s) / (2 * nb.sigma2)
    d = (qv[torch.from_numpy(np.repeat(u, len(offs)))] - y).square().sum(-1).view(-1, len(offs))
    logits = np.where(image >= 0, dist * scale, -np.inf)
    logits[u, k] = torch.logsumexp((d * scale).masked_fill(~torch.from_numpy(ok), -np.inf), -1).numpy()
    w = torch.softmax(torch.from_numpy(logits), -1).nan_to_num_(0.0).numpy()
    return sum_by_image(np.where(image >= 0, image, -1), w, att.corpus.count)


def measure(corpus: str, size: str, index: Path, work: Path, t: int) -> tuple[list[str], np.ndarray, dict]:
    """(row names, (rows, queries, len(MS)) recall, extras): every ranking of the module docstring."""
    from nda_ann import Attributor
    from nda_ann.attribution.candidates import candidate_mass
    from nda_ann.attribution.query_patches import NoisedBlock
    from nda_ann.attribution.rerank import proxy_scores
    from nda_ann.corpus.queries import load_query_batch
    from nda_ann.scoring.schedule import NoiseSchedule

    done, mass_all = load_exact(work, corpus, size, t, kind="mass")
    if not done:
        raise SystemExit(f"no exact scores for {corpus} {size} t={t}: run tools/bench_scale.py exact first")
    att = Attributor.open(index)
    images, _, _ = queries(work, corpus)
    names: list[str] = []
    table: dict[str, list[list[float]]] = {}

    def add(name: str, values: list[float]) -> None:
        if name not in table:
            names.append(name)
            table[name] = []
        table[name].append(values)

    for qi, q in enumerate(done):
        ex = mass_all[qi].astype(np.float64)
        batch = load_query_batch(images[q : q + 1], att.corpus.shape)
        nb = NoisedBlock.make(batch.images, t, NoiseSchedule("linear"), 0, 1, att.scales)
        key = nb.keys[0]

        def search(k: int, nprobe: int | None):
            d, i, p = att.searcher.search(key[1], nb.search_vectors(key), k, nprobe)
            return d[0], i[0], p[0]

        def retrieved(hits) -> np.ndarray:
            return candidate_mass({key: hits}, att.scales, [1.0], 1, att.corpus.count, nb.s, nb.sigma2)

        hits = search(1024, None)
        base = ranked_by(retrieved(hits))
        add("retrieved (K = 1,024, default nprobe)", [recall(ex, base, m) for m in MS])
        exact_hits = ranked_by(remeasured_mass(att, nb, key, hits, 256))
        add("retrieved, first 256 re-measured exactly", [recall(ex, exact_hits, m) for m in MS])
        add("retrieved, first 256 as the index gives them", [recall(ex, ranked_by(retrieved(tuple(a[:, :256] for a in hits))), m) for m in MS])
        for r in (16, 64):
            add(f"retrieved, first {r} hits refined to their exact stride-1 cell", [recall(ex, ranked_by(refined_mass(att, nb, key, hits, r)), m) for m in MS])
        for k, nprobe in ((4096, None), (1024, 64)):
            label = f"retrieved, K = {k:,}" + ("" if nprobe is None else f", nprobe {nprobe}")
            add(label, [recall(ex, ranked_by(retrieved(search(k, nprobe))), m) for m in MS])
        for pool in POOLS:
            add(f"perfect re-rank of a pool of {pool} x M", [pool_ceiling(ex, base, m, pool) for m in MS])
        # the shipped proxy (--rerank 4) at M = 500
        patches = nb.of(0, torch.device("cpu"), torch.float32)
        pool = base[: 4 * 500]
        proxy = proxy_scores(att.corpus, pool, patches, att.groups, att.scales, [1.0], 1, nb.s, nb.sigma2, att.budget)
        reranked = pool[np.argsort(-proxy, kind="stable")]
        add("--rerank 4 proxy (M = 500 only)", [np.nan, recall(ex, reranked, 500), np.nan])
        print(f"query {q}: " + ", ".join(f"{n.split(' (')[0]} {table[n][-1][1]:.3f}" for n in names[:1] + names[-4:]), flush=True)
    extras = {"queries": len(done)}
    return names, np.array([table[n] for n in names]), extras


def section(corpus: str, size: str, index: Path, t: int, names: list[str], values: np.ndarray, extras: dict) -> str:
    from bench_md import machine, simd

    lines = [f"## Candidate recall by ranking: {corpus}, {size} images, t = {t} (tools/bench_recall.py)", "",
             f"`python tools/bench_recall.py --corpus {corpus} --size {size} --index {index.name}` on {machine()}; {simd()}. "
             f"{extras['queries']} held-out queries, p = 7; recall = the chosen M's share of the exact softmax mass over the "
             "exact top M's (mean over queries); the exact scores are bench_scale.py's cache. Nothing is timed.", "",
             "| ranking | " + " | ".join(f"M = {m:,}" for m in MS) + " |", "|---|" + "---|" * len(MS)]
    for name, row in zip(names, values.mean(1)):
        lines.append(f"| {name} | " + " | ".join("" if np.isnan(v) else f"{v:.3f}" for v in row) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    from bench_md import update_section

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", choices=("crops", "photos"), required=True)
    ap.add_argument("--size", required=True)
    ap.add_argument("--index", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=Path(__file__).resolve().parent.parent / "results", help="bench_scale.py's work folder")
    ap.add_argument("--t", type=int, default=100)
    args = ap.parse_args()
    names, values, extras = measure(args.corpus, args.size, args.index, args.work, args.t)
    body = section(args.corpus, args.size, args.index, args.t, names, values, extras)
    print(body)
    update_section(f"scale_recall_{args.corpus}_{args.size}_t{args.t}", body)


if __name__ == "__main__":
    main()
