"""The outside share read with its sampled part smoothed over query positions (outside.smoothed_share),
against naive per-position implementations."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from nda_ann.attribution.outside import smooth_over_positions, smoothed_share


def logs(*arrays: np.ndarray) -> list[torch.Tensor]:
    """Natural logs as tensors (log 0 = -inf: no mass)."""
    with np.errstate(divide="ignore"):
        return [torch.from_numpy(np.log(a)) for a in arrays]


def naive_gaussian(values: np.ndarray, g: int, sigma: float) -> np.ndarray:
    """(g * g,) linear values smoothed by a normalised Gaussian of radius ceil(3 sigma), edges replicated."""
    radius = max(1, math.ceil(3 * sigma))
    taps = np.array([math.exp(-(d * d) / (2 * sigma * sigma)) for d in range(-radius, radius + 1)])
    taps /= taps.sum()
    grid = values.reshape(g, g)
    out = np.zeros_like(grid)
    for i in range(g):
        for j in range(g):
            total = 0.0
            for a, di in enumerate(range(-radius, radius + 1)):
                for b, dj in enumerate(range(-radius, radius + 1)):
                    total += taps[a] * taps[b] * grid[min(max(i + di, 0), g - 1), min(max(j + dj, 0), g - 1)]
            out[i, j] = total
    return out.ravel()


@pytest.mark.parametrize("sigma", [0.5, 0.75, 1.3])
def test_smoothing_matches_a_naive_gaussian_with_replicated_edges(sigma):
    rng = np.random.default_rng(3)
    g = 9
    log_mass = rng.normal(0, 30, g * g)  # masses spanning many orders of magnitude
    log_mass[rng.choice(g * g, 10, replace=False)] = -np.inf  # positions with no sampled mass
    got = smooth_over_positions(torch.from_numpy(log_mass), sigma).numpy()
    top = log_mass[np.isfinite(log_mass)].max()
    want = naive_gaussian(np.exp(log_mass - top), g, sigma)
    np.testing.assert_allclose(np.exp(got - top), want, rtol=1e-9, atol=1e-300)


def test_no_smoothing_where_sigma_is_zero_or_the_positions_are_not_a_square_grid():
    x = torch.randn(50, dtype=torch.float64)
    assert torch.equal(smooth_over_positions(x, 0.0), x)
    assert torch.equal(smooth_over_positions(x, 0.75), x)  # 50 is not a square


def test_the_share_without_smoothing_is_the_plain_outside_share():
    rng = np.random.default_rng(5)
    z_in, known, sampled = (rng.lognormal(0, 3, 64) for _ in range(3))
    sampled[:7] = 0.0
    got = smoothed_share(*logs(z_in, known, sampled), 0.0).numpy()
    np.testing.assert_allclose(got, (known + sampled) / (z_in + known + sampled), rtol=1e-12)


def test_a_share_whose_sampled_ratio_is_the_same_everywhere_is_left_as_it_is():
    """Smoothing acts on sampled / known, so a constant ratio with known parts of any scale is unchanged."""
    rng = np.random.default_rng(7)
    z_in, known = rng.lognormal(0, 20, 64), rng.lognormal(0, 20, 64)
    sampled = 0.3 * (z_in + known)
    args = logs(z_in, known, sampled)
    np.testing.assert_allclose(smoothed_share(*args, 1.0).numpy(), smoothed_share(*args, 0.0).numpy(), rtol=1e-10)


def test_the_smoothed_share_is_between_the_known_share_and_one_and_spreads_an_isolated_hit():
    g = 8
    z_in = np.ones(g * g)
    known = np.full(g * g, 0.1)
    sampled = np.zeros(g * g)
    sampled[3 * g + 3] = 50.0  # one drawn image matches at one position only
    args = logs(z_in, known, sampled)
    plain, smooth = smoothed_share(*args, 0.0).numpy(), smoothed_share(*args, 0.75).numpy()
    known_share = known / (z_in + known)
    assert np.all(smooth >= known_share - 1e-12) and np.all(smooth <= 1.0)
    assert smooth[3 * g + 3] < plain[3 * g + 3]  # the hit's own position gives up part of it
    assert smooth[3 * g + 4] > plain[3 * g + 4] and smooth[3 * g + 2] > plain[3 * g + 2]  # its neighbours gain
    assert smooth[7 * g + 7] == pytest.approx(plain[7 * g + 7])  # far away: unchanged
