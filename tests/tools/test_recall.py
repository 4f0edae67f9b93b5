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
