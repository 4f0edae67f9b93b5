"""tools/bench_recall.py's measures against naive versions: recall of a ranking and the ceiling of a
perfect re-ranker of a pool."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
from bench_recall import pool_ceiling, ranked_by, recall  # noqa: E402


def test_recall_is_one_for_the_exact_ranking_and_the_naive_ratio_otherwise(rng):
    mass = rng.pareto(1.5, size=500)
    assert recall(mass, ranked_by(mass), 50) == 1.0
    chosen = rng.permutation(500)
    naive = sum(mass[i] for i in chosen[:50]) / sum(sorted(mass, reverse=True)[:50])
    assert np.isclose(recall(mass, chosen, 50), naive)
    assert recall(mass, ranked_by(-mass), 50) < 0.5  # the worst 50 of a heavy tail hold little


def test_pool_ceiling_is_the_pools_best_m_and_grows_with_the_pool(rng):
    mass = rng.pareto(1.5, size=400)
    ranked = rng.permutation(400)
    for pool in (1, 2, 4):
        cand = ranked[: pool * 20]
        naive = sorted((mass[i] for i in cand), reverse=True)[:20]
        assert np.isclose(pool_ceiling(mass, ranked, 20, pool), sum(naive) / sum(sorted(mass, reverse=True)[:20]))
    ceilings = [pool_ceiling(mass, ranked, 20, p) for p in (1, 2, 4, 8, 20)]
    assert ceilings == sorted(ceilings) and ceilings[-1] == 1.0
    assert np.isclose(ceilings[0], recall(mass, ranked, 20))


def _offset_setup(rng, images: int = 3, size: int = 8):
    """A tiny attributor stand-in (8 x 8 images, p = 3), its noised query block and its key."""
    from types import SimpleNamespace

    import torch

    from nda_ann.attribution.query_patches import NoisedBlock
    from nda_ann.scoring.patches import layout_groups
    from nda_ann.scoring.scales import Scale
    from nda_ann.scoring.schedule import NoiseSchedule

    sc = Scale.parse("3")
    pix = torch.from_numpy(rng.uniform(-1, 1, size=(images + 1, 3, size, size)).astype(np.float32))
    corpus = SimpleNamespace(count=images, shape=(3, size, size), take=lambda ids: pix[1:][torch.as_tensor(np.asarray(ids))])
    att = SimpleNamespace(corpus=corpus, groups={sc: layout_groups(size, sc)})
    nb = NoisedBlock.make(pix[:1], 100, NoiseSchedule("linear"), 0, 1, [sc])
    return att, nb, nb.keys[0], sc


def _naive_offset_score(att, nb, sc, pool, allowed) -> np.ndarray:
    """(len(pool),) sum over query positions u of the pool softmax of log sum_v exp(-||q_u - c_v||^2 / (2 sigma^2)),
    v of u's layout class with (v - u) in ``allowed[image]`` (a set of (dr, dc)); images with no such v get 0."""
    from nda_ann.scoring.patches import extract_patches, layout_of_positions

    size = att.corpus.shape[1]
    g = sc.grid(size)
    layout = layout_of_positions(size, sc).numpy()
    q = nb.vectors[nb.keys[0]][0].double().numpy()
    c = extract_patches(att.corpus.take(pool) * nb.s, sc).double().numpy()
    out = np.zeros(len(pool))
    for u in range(g * g):
        lse = np.full(len(pool), -np.inf)
        for j in range(len(pool)):
            terms = [-((q[u] - c[j, v]) ** 2).sum() / (2 * nb.sigma2) for v in range(g * g)
                     if layout[v] == layout[u] and (v // g - u // g, v % g - u % g) in allowed[j]]
            if terms:
                lse[j] = np.logaddexp.reduce(terms)
        if np.isfinite(lse).any():
            w = np.exp(lse - lse.max())
            out += w / w.sum()
    return out


def test_offset_proxies_match_a_naive_restricted_softmax_and_all_offsets_give_all_pairs(rng):
    from bench_recall import offset_proxies

    att, nb, key, sc = _offset_setup(rng)
    g, pool = sc.grid(8), np.array([2, 0, 1])
    positions = np.arange(g * g)
    # every image hit at every position by every query patch: every offset present
    image = np.tile(np.repeat(np.arange(3), g * g), (g * g, 1))
    position = np.tile(np.tile(positions, 3), (g * g, 1))
    full = offset_proxies(att, nb, key, (np.zeros(image.shape), image, position), pool, (None,))
    assert np.allclose(full["offsets, all"][0], full["all-pairs"][0]) and np.isclose(full["offsets, all"][1], 1.0)
    naive_all = _naive_offset_score(att, nb, sc, pool, [{(a, b) for a in range(-g, g) for b in range(-g, g)}] * 3)
    assert np.allclose(full["all-pairs"][0], naive_all, atol=1e-5)
    # a few hits: query patch u hits image pool[j] at v, so only offset v - u counts for it
    u, v, j = rng.integers(0, g * g, 6), rng.integers(0, g * g, 6), np.array([0, 0, 1, 1, 2, 2])
    image, position = np.full((g * g, 2), -1), np.zeros((g * g, 2), dtype=np.int64)
    for i, (uu, vv, jj) in enumerate(zip(u, v, j)):
        col = int((image[uu] >= 0).sum())
        if col < 2:
            image[uu, col], position[uu, col] = pool[jj], vv
    allowed = [set() for _ in pool]
    for uu in range(g * g):
        for col in range(2):
            if image[uu, col] >= 0:
                jj = int(np.nonzero(pool == image[uu, col])[0][0])
                allowed[jj].add((position[uu, col] // g - uu // g, position[uu, col] % g - uu % g))
    some = offset_proxies(att, nb, key, (np.zeros(image.shape), image, position), pool, (None,))
    assert np.allclose(some["offsets, all"][0], _naive_offset_score(att, nb, sc, pool, allowed), atol=1e-5)
    assert 0.0 < some["offsets, all"][1] < some["offsets, all, dilated"][1] <= 1.0 + 1e-9
