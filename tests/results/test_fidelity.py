"""docs/scores.md section 7 metrics against scipy and hand-computed cases."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from nda_ann.results.fidelity import fidelity, rankdata, relative_l1, spearman, subset_sum_spearman, top_overlap


def test_rankdata_and_spearman_match_scipy_with_ties(rng):
    a = rng.integers(0, 5, size=200).astype(float)
    b = a + rng.normal(size=200)
    np.testing.assert_allclose(rankdata(a), stats.rankdata(a))
    assert spearman(a, b) == pytest.approx(stats.spearmanr(a, b).statistic, abs=1e-12)


def test_top_overlap_and_relative_l1():
    exact = np.arange(20, dtype=float)
    approx = exact.copy()
    approx[[19, 18]] = 0  # two of the top ten lost
    assert top_overlap(approx, exact) == 0.8
    assert relative_l1(exact, exact) == 0
    assert relative_l1(2 * exact, exact) == pytest.approx(1.0)


def test_subset_sum_spearman_is_one_for_scaled_scores_and_drops_with_noise(rng):
    exact = rng.exponential(size=500)
    assert subset_sum_spearman(3 * exact, exact) == pytest.approx(1.0)
    noisy = exact + rng.exponential(size=500) * 5
    assert subset_sum_spearman(noisy, exact) < 0.9
    out = fidelity(exact, exact)
    assert out["top10_overlap"] == 1 and out["spearman"] == pytest.approx(1)
