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
- ``perfect re-rank of P x M``: the ceiling of any re-ranker of that pool (the pool's best M by exact mass);
- ``offsets``: a pool of 4 x M by retrieved mass, re-ranked by exact mass at every query position but only
  over the pairs (u, u + delta) whose offset delta one of the image's retrieved hits has (its T heaviest
  offsets, or all; ``dilated``: and their 8 neighbours), normalised over the pool; ``all-pairs`` is the
  same with every pair (the pool re-scored exactly, its normaliser the pool's). The ``covered`` extra
  is the share of the pool's exact mass those pairs hold. This asks whether the hits' offsets could
  stand in for a full re-scoring when ranking.

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


def offset_proxies(att, nb, key, hits, pool: np.ndarray, tops: tuple[int | None, ...]) -> dict[str, tuple[np.ndarray, float]]:
    """Per variant name: ((len(pool),) proxy score, covered share of the pool's exact mass): each pooled
    image's exact softmax mass (over the pool) at every query position, its terms restricted to the pairs
    (u, u + delta) whose offset is among the image's ``top`` heaviest retrieved-hit offsets (None: all),
    exactly or dilated by one position; and ``all-pairs``, every pair. Dense and naive (one (U, b, U)
    logit block per layout class and 50 images), as a measurement only."""
    from nda_ann.attribution.candidates import softmax_over_retrieved
    from nda_ann.scoring.patches import extract_patches

    dist, image, position = hits
    sc = key[1]
    g = sc.grid(att.corpus.shape[1])
    width = 2 * g - 1
    slot = np.full(att.corpus.count, -1)
    slot[pool] = np.arange(len(pool))
    inv = 1.0 / (2.0 * nb.sigma2)
    w = softmax_over_retrieved(dist, nb.s, nb.sigma2).numpy()
    u, k = np.nonzero(image >= 0)
    n = slot[image[u, k]]
    u, k, n = u[n >= 0], k[n >= 0], n[n >= 0]
    v = position[u, k]
    code = (v // g - u // g + g - 1) * width + (v % g - u % g + g - 1)  # the offset delta = v - u
    offset_w = np.zeros((len(pool), width * width))
    np.add.at(offset_w, (n, code), w[u, k])
    allowed: dict[str, torch.Tensor] = {}
    for top in tops:
        for dil in (0, 1):
            keep = offset_w > 0
            if top is not None:
                order = np.argsort(-offset_w, 1)[:, :top]
                keep = np.zeros_like(keep)
                np.put_along_axis(keep, order, True, 1)
                keep &= offset_w > 0
            if dil:
                grid2 = keep.reshape(len(pool), width, width)
                out = grid2.copy()
                for a in (-1, 0, 1):
                    for b in (-1, 0, 1):
                        out |= np.roll(np.roll(grid2, a, 1), b, 2)  # wraps at |delta| = g - 1, where no pair exists
                keep = out.reshape(len(pool), -1)
            allowed[f"offsets, {'all' if top is None else f'heaviest {top}'}{', dilated' if dil else ''}"] = torch.from_numpy(keep)
    qp = nb.of(0, torch.device("cpu"), torch.float32)[(0, sc)][0]  # (L, D)
    lse = {name: torch.full((qp.shape[0], len(pool)), -np.inf, dtype=torch.float64) for name in ["all-pairs", *allowed]}
    for lo in range(0, len(pool), 50):
        b = min(50, len(pool) - lo)
        cp = extract_patches(att.corpus.take(pool[lo : lo + b]).to(torch.float32) * nb.s, sc)  # (b, L, D)
        cn = cp.square().sum(-1)
        for grp in att.groups[sc]:
            pos = grp.positions
            logits = torch.addmm(cn[:, pos].reshape(1, -1), qp[pos], cp[:, pos].reshape(-1, cp.shape[-1]).T, beta=-1.0, alpha=2.0)
            logits = logits.mul_(inv).view(len(pos), b, len(pos))  # (u, image, v), less the constant -inv ||q_u||^2
            lse["all-pairs"][pos, lo : lo + b] = torch.logsumexp(logits, -1).double()
            r, c = pos // g, pos % g
            delta = ((r[None, :] - r[:, None]) + g - 1) * width + (c[None, :] - c[:, None]) + g - 1  # (u, v)
            for name, keep in allowed.items():
                mask = keep[lo : lo + b][:, delta].permute(1, 0, 2)  # (u, image, v)
                lse[name][pos, lo : lo + b] = torch.logsumexp(logits.masked_fill(~mask, -np.inf), -1).double()
    full_w = torch.softmax(lse["all-pairs"], 1)
    out = {}
    for name, x in lse.items():
        covered = float((full_w * (x - lse["all-pairs"]).exp().nan_to_num(0.0)).sum() / full_w.sum())
        out[name] = (torch.softmax(x, 1).nan_to_num(0.0).sum(0).numpy(), covered)
    return out


def measure(corpus: str, size: str, index: Path, work: Path, t: int, offsets: bool = True) -> tuple[list[str], np.ndarray, dict]:
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
    extras: dict = {}

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
        for name, (score, covered) in (offset_proxies(att, nb, key, hits, pool, (16, None)) if offsets else {}).items():
            add(f"pool of 4 x M re-ranked: {name} (M = 500 only)", [np.nan, recall(ex, pool[np.argsort(-score, kind="stable")], 500), np.nan])
            extras.setdefault("covered", {}).setdefault(name, []).append(covered)
        print(f"query {q}: " + ", ".join(f"{n.split(' (')[0]} {table[n][-1][1]:.3f}" for n in names[:1] + names[-4:]), flush=True)
    extras["queries"] = len(done)
    return names, np.array([table[n] for n in names]), extras


def section(corpus: str, size: str, index: Path, t: int, names: list[str], values: np.ndarray, extras: dict, tag: str = "") -> str:
    from bench_md import machine, simd

    lines = [f"## Candidate recall by ranking: {corpus}, {size} images, t = {t}{', ' + tag if tag else ''} (tools/bench_recall.py)", "",
             f"`python tools/bench_recall.py --corpus {corpus} --size {size} --index {index.name}` on {machine()}; {simd()}. "
             f"{extras['queries']} held-out queries, p = 7; recall = the chosen M's share of the exact softmax mass over the "
             "exact top M's (mean over queries); the exact scores are bench_scale.py's cache. Nothing is timed.", "",
             "| ranking | " + " | ".join(f"M = {m:,}" for m in MS) + " |", "|---|" + "---|" * len(MS)]
    for name, row in zip(names, values.mean(1)):
        lines.append(f"| {name} | " + " | ".join("" if np.isnan(v) else f"{v:.3f}" for v in row) + " |")
    if extras.get("covered"):
        lines += ["", "Share of the pool's exact mass (4 x 500 images) on the pairs each offsets row keeps (mean over queries): "
                  + "; ".join(f"{name} {np.mean(v):.3f}" for name, v in extras["covered"].items()) + "."]
    return "\n".join(lines) + "\n"


def main() -> None:
    from bench_md import update_section

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", choices=("crops", "photos"), required=True)
    ap.add_argument("--size", required=True)
    ap.add_argument("--index", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=Path(__file__).resolve().parent.parent / "results", help="bench_scale.py's work folder")
    ap.add_argument("--t", type=int, default=100)
    ap.add_argument("--tag", default="", help="a section of its own for this index (e.g. 'stride 2'), beside the default one")
    ap.add_argument("--skip-offsets", action="store_true", help="leave out the offsets rows (the slow part)")
    args = ap.parse_args()
    names, values, extras = measure(args.corpus, args.size, args.index, args.work, args.t, not args.skip_offsets)
    body = section(args.corpus, args.size, args.index, args.t, names, values, extras, args.tag)
    print(body)
    suffix = f"_{args.tag.replace(' ', '_')}" if args.tag else ""  # as bench_scale.py report names its tagged sections
    update_section(f"scale_recall_{args.corpus}_{args.size}_t{args.t}{suffix}", body)


if __name__ == "__main__":
    main()
