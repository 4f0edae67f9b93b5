"""Property tests (hypothesis) of the exact scorer: symmetries any correct NDA score must have."""
from __future__ import annotations

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nda_ann.scoring.exact import exact_scores

SETTINGS = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def images(seed: int, n: int, c: int = 2, size: int = 6) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand((n, c, size, size), generator=g) * 2 - 1
    return torch.nn.functional.avg_pool2d(torch.nn.functional.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)


scale_st = st.sampled_from([[3], [(4, 2)], [(4, 1), (2, 2)]])
topk_st = st.one_of(st.none(), st.integers(1, 6))
t_st = st.integers(0, 999)


@SETTINGS
@given(seed=st.integers(0, 10_000), scales=scale_st, topk=topk_st, t=t_st, perm_seed=st.integers(0, 100))
def test_reordering_the_corpus_permutes_the_scores(seed, scales, topk, t, perm_seed):
    corpus, query = images(seed, 5), images(seed + 1, 1)
    perm = np.random.default_rng(perm_seed).permutation(5)
    a = exact_scores(corpus, query, timesteps=t, scales=scales, topk=topk)
    b = exact_scores(corpus[torch.as_tensor(perm)], query, timesteps=t, scales=scales, topk=topk)
    np.testing.assert_allclose(b, a[..., perm], rtol=1e-9, atol=1e-12 * a.max())


@SETTINGS
@given(seed=st.integers(0, 10_000), scales=scale_st, topk=topk_st, t=t_st)
def test_duplicate_training_images_get_equal_scores(seed, scales, topk, t):
    base = images(seed, 4)
    corpus = torch.cat([base, base[1:2]])  # image 4 duplicates image 1
    s = exact_scores(corpus, images(seed + 7, 2), timesteps=t, scales=scales, topk=topk)
    np.testing.assert_allclose(s[..., 4], s[..., 1], rtol=1e-9, atol=1e-12 * s.max())


@SETTINGS
@given(seed=st.integers(0, 10_000), t=t_st, p=st.integers(1, 6))
def test_without_topk_scores_sum_to_the_patch_positions(seed, t, p):
    s = exact_scores(images(seed, 3), images(seed + 3, 2), timesteps=t, scales=[p])
    g = 6 + 2 * ((p - 1) // 2) - p + 1
    np.testing.assert_allclose(s.sum(-1), g * g, rtol=1e-9)


@SETTINGS
@given(seed=st.integers(0, 10_000), noise_seed=st.integers(0, 50))
def test_scores_are_deterministic_for_a_fixed_seed(seed, noise_seed):
    corpus, q = images(seed, 4), images(seed + 1, 1)
    a = exact_scores(corpus, q, timesteps=[100, 400], scales=[3], seed=noise_seed, noise_draws=2)
    b = exact_scores(corpus, q, timesteps=[100, 400], scales=[3], seed=noise_seed, noise_draws=2)
    assert np.array_equal(a, b)
