"""The exact scorer against the independent naive float64 reference (tests/naive.py), on tiny sizes."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from naive import naive_scale_scores
from nda_ann.scoring.exact import exact_attribution, exact_scores, patch_weights
from nda_ann.scoring.patches import layout_groups
from nda_ann.scoring.scales import Scale
from nda_ann.scoring.schedule import NoiseSchedule


def smooth_images(rng, n, c=2, size=6):
    """Correlated images in [-1, 1] (neighbouring pixels alike), so the softmax is not one-hot."""
    x = rng.normal(size=(n, c, size + 2, size + 2))
    x = (x[:, :, 1:-1, 1:-1] + x[:, :, :-2, 1:-1] + x[:, :, 2:, 1:-1] + x[:, :, 1:-1, :-2] + x[:, :, 1:-1, 2:]) / 5
    return np.clip(x, -1, 1)


def naive(corpus, queries, t, scales, weights, topk=None, seed=0, draws=1, schedule="linear"):
    out = np.zeros((len(queries), len(corpus)))
    for qi, q in enumerate(queries):
        for d in range(draws):
            for (p, f), w in zip(scales, weights):
                out[qi] += w / draws * naive_scale_scores(corpus, q, t, p, f, topk, seed + d, schedule)[0]
    return out


def assert_close(got, want, tol=1e-5):
    scale = np.abs(want).max()
    assert np.abs(got - want).max() <= tol * scale, (np.abs(got - want).max(), scale)


@pytest.mark.parametrize(
    "scales,alpha,topk",
    [
        ([(3, 1)], None, None),
        ([(3, 1)], None, 2),
        ([(4, 1)], None, None),  # even patch: (H-1) x (W-1) positions
        ([(4, 2)], None, None),  # f = 2 projection
        ([(4, 2)], None, 3),
        ([(4, 1), (2, 2)], 0.3, None),  # two-scale fusion
        ([(5, 1), (4, 2)], None, 4),
    ],
)
def test_matches_naive_reference(rng, scales, alpha, topk):
    corpus = smooth_images(rng, 4)
    queries = np.concatenate([smooth_images(rng, 1), corpus[2:3] * 0.9])
    weights = [1.0] if len(scales) == 1 else [0.5 if alpha is None else alpha, 0.5 if alpha is None else 1 - alpha]
    got = exact_scores(torch.tensor(corpus), torch.tensor(queries), timesteps=[100, 300], scales=scales, alpha=alpha, topk=topk)
    assert got.shape == (2, 2, 4)
    for ti, t in enumerate([100, 300]):
        assert_close(got[ti], naive(corpus, queries, t, scales, weights, topk))


@pytest.mark.parametrize("schedule", ["scaled_linear", "squaredcos_cap_v2"])
def test_schedules_and_noise_draws_match_naive(rng, schedule):
    corpus = smooth_images(rng, 3)
    queries = smooth_images(rng, 1)
    got = exact_scores(torch.tensor(corpus), torch.tensor(queries), timesteps=500, scales=[3], seed=7, noise_draws=2, schedule=schedule)
    assert_close(got[0], naive(corpus, queries, 500, [(3, 1)], [1.0], seed=7, draws=2, schedule=schedule))


def test_schedule_reference_values():
    sched = NoiseSchedule("linear")
    assert [round(sched.alpha_bar(t), 6) for t in (100, 300, 500)] == [0.895141, 0.394011, 0.077797]
    with pytest.raises(ValueError, match="outside"):
        sched.alpha_bar(1000)


def test_float32_and_chunked_two_pass_agree_with_default(rng):
    corpus = torch.tensor(smooth_images(rng, 9, c=3, size=8))
    queries = torch.tensor(smooth_images(rng, 2, c=3, size=8))
    kw = dict(timesteps=100, scales=[(4, 1), (4, 2)], topk=5)
    ref = exact_scores(corpus, queries, **kw)
    # a budget this small forces one image per chunk and the two-pass normaliser
    tiny = exact_scores(corpus, queries, memory_budget=20_000, **kw)
    fast = exact_scores(corpus, queries, precision="float32", **kw)
    assert_close(tiny, ref, 1e-9)
    assert_close(fast, ref, 1e-3)


def test_exact_copy_of_training_image_ranks_first(rng):
    corpus = torch.tensor(smooth_images(rng, 12, c=3, size=8))
    scores = exact_scores(corpus, corpus[[5, 9]], timesteps=[100, 300], scales=[3])
    assert (scores.argmax(-1) == np.array([5, 9])).all()


def test_scores_sum_to_patch_positions_without_topk(rng):
    corpus = torch.tensor(smooth_images(rng, 5, c=3, size=8))
    queries = torch.tensor(smooth_images(rng, 2, c=3, size=8))
    single = exact_scores(corpus, queries, timesteps=[50, 700], scales=[5])
    np.testing.assert_allclose(single.sum(-1), 64.0, rtol=1e-10)
    fused = exact_scores(corpus, queries, timesteps=100, scales=[(4, 1), (4, 2)], alpha=0.25)
    np.testing.assert_allclose(fused.sum(-1), 0.25 * 49 + 0.75 * 49, rtol=1e-10)  # even p: 7x7 positions
    with_topk = exact_scores(corpus, queries, timesteps=100, scales=[5], topk=3)
    assert (with_topk.sum(-1) < 64.0).all()


def test_corner_query_patch_draws_only_on_corner_patches(rng):
    corpus = torch.tensor(smooth_images(rng, 4, c=3, size=8))
    scale = Scale(5)
    w = patch_weights(corpus, corpus[1] * 0.5, 0, timestep=300, scale=scale)  # position (0, 0)
    corner = next(g for g in layout_groups(8, scale) if 0 in g.positions.tolist())
    assert corner.positions.tolist() == [0]  # the top-left corner layout is unique to position 0
    assert np.isclose(w[:, 0].sum(), 1.0)
    w[:, 0] = 0
    assert (w == 0).all()


def test_maps_sum_to_scores_and_locate_contribution(rng):
    corpus = smooth_images(rng, 6, c=3, size=8)
    query = corpus[2].copy()
    query[:, :, 4:] = corpus[4][:, :, 4:]  # left half from image 2, right half from image 4
    res = exact_attribution(torch.tensor(corpus), torch.tensor(query[None]), timesteps=100, scales=[(4, 1), (4, 2)], maps_for=2)
    top = np.argsort(-res.scores[0, 0])[:2]
    assert set(top.tolist()) == {2, 4}
    maps = res.maps(0, 0, [2, 4])
    np.testing.assert_allclose(maps.sum(axis=(1, 2)), res.scores[0, 0, [2, 4]], rtol=1e-9)
    assert maps[0][:, :3].sum() > maps[0][:, 5:].sum()  # image 2 feeds the left
    assert maps[1][:, 5:].sum() > maps[1][:, :3].sum()  # image 4 feeds the right


def test_bad_arguments_are_named(rng):
    corpus = torch.tensor(smooth_images(rng, 3, c=3, size=8))
    with pytest.raises(ValueError, match="outside"):
        exact_scores(corpus, corpus[:1], timesteps=1000, scales=[3])
    with pytest.raises(ValueError, match="larger than"):
        exact_scores(corpus, corpus[:1], timesteps=10, scales=[9])
    with pytest.raises(ValueError, match="multiple of factor"):
        exact_scores(corpus, corpus[:1], timesteps=10, scales=["5:2"])
    with pytest.raises(Exception, match="NaN or Inf"):
        bad = corpus[:1].clone()
        bad[0, 0, 0, 0] = float("nan")
        exact_scores(corpus, bad, timesteps=10, scales=[3])
    with pytest.raises(Exception, match="resize queries"):
        exact_scores(corpus, corpus[:1, :, :6, :6], timesteps=10, scales=[3])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_largest_equals_topk_and_keeps_each_row_s_values(rng, dtype):
    from nda_ann.scoring.dense import largest_

    x = torch.from_numpy(rng.normal(size=(7, 5, 40))).to(dtype)
    x[0, 0, :10] = 3.0  # ties
    before = x.clone()
    got = largest_(x, 12).sort(-1).values
    want = before.topk(12, dim=-1).values.sort(-1).values
    assert got.shape == (7, 5, 12) and torch.equal(got, want)
    # in place on the CPU: each row reordered, its values (and so its logsumexp) unchanged
    assert torch.equal(x.sort(-1).values, before.sort(-1).values)
    got[:] = 0  # a new tensor, not a view of x
    assert torch.equal(x.sort(-1).values, before.sort(-1).values)


@pytest.mark.parametrize("budget", ["1G", 3000])  # one pass, and two passes over the corpus
def test_kept_mass_is_the_score_without_topk(rng, budget):
    corpus = torch.tensor(smooth_images(rng, 6))
    queries = torch.tensor(smooth_images(rng, 2))
    res = exact_attribution(corpus, queries, timesteps=[100], scales=[3], topk=2, keep_mass=True, memory_budget=budget)
    full = exact_scores(corpus, queries, timesteps=[100], scales=[3])
    np.testing.assert_allclose(res.mass, full, rtol=1e-9, atol=1e-12)
    assert np.all(res.scores <= res.mass + 1e-12) and not np.allclose(res.scores, res.mass)
