"""The sampled estimate of the non-candidates' mass (outside.py) against a naive computation."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from nda_ann.attribution.attributor import Attributor
from nda_ann.scoring.exact import exact_scores
from nda_ann.corpus.inputs import CorpusView
from nda_ann.attribution.outside import Guide, _counted, estimate_outside, non_candidates
from nda_ann.scoring.patches import extract_patches, layout_groups
from nda_ann.scoring.scales import Scale
from nda_ann.corpus.store import uint8_to_float
from nda_ann.index.torch_search import TorchFlatSearch


@pytest.fixture(scope="module")
def crops():
    from nda_ann.corpus.demo_corpus import demo_corpus

    dc = demo_corpus(n_train=30, n_queries=2, seed=5)
    small = torch.nn.functional.avg_pool2d(uint8_to_float(dc.train), 2)[:, :, 3:13, 3:13].contiguous()  # 10x10
    queries = torch.nn.functional.avg_pool2d(uint8_to_float(dc.queries), 2)[:, :, 3:13, 3:13].contiguous()
    return small, queries


def test_counted_marks_exactly_the_sampled_pairs_each_row_knows():
    """Against Python sets; keys that share their low bits (the screening table's slot) included."""
    rng = np.random.default_rng(1)
    known = rng.integers(0, 5_000_000, (40, 300))
    known[rng.random(known.shape) < 0.2] = -1
    known[3, :4] = [7, 7 + (1 << 16), 7 + (2 << 16), -1]  # one slot, three keys
    keys = np.concatenate([known[rng.integers(0, 40, 30), rng.integers(0, 300, 30)], rng.integers(0, 5_000_000, 30), [7 + (1 << 16), 7 + (5 << 16)]])
    keys[keys < 0] = 11
    keys[:3] = keys[3]  # a key drawn several times
    rows = [set(r.tolist()) - {-1} for r in known]
    want = np.array([[int(k) in r for k in keys] for r in rows])
    got = _counted(keys, known)
    assert got.shape == want.shape and (got == want).all() and want.sum() >= 20 and got[3, -2] and not got[3, -1]


def test_guide_draws_non_candidates_and_weights_them_to_stand_for_all():
    n, cand = 50, np.array([0, 3, 4, 9, 49])
    free = np.setdiff1d(np.arange(n), cand)
    np.testing.assert_array_equal(non_candidates(cand, np.arange(len(free))), free)
    ids, log_w = Guide(n, cand).draw(20, np.random.default_rng(0))
    assert len(set(ids.tolist())) == 20 and np.isin(ids, free).all()
    assert np.exp(log_w).sum() == pytest.approx(len(free))  # 20 of 45, each standing for 45 / 20
    mass = np.zeros(n)
    mass[[3, 7, 8]] = [5.0, 2.0, 1.0]  # 3 is a candidate: its mass must not count
    guide = Guide(n, cand, mass, share=0.5)
    totals, counts = [], np.zeros(n)
    for seed in range(400):
        ids, log_w = guide.draw(10, np.random.default_rng(seed))
        assert np.isin(ids, free).all()
        totals.append(np.exp(log_w).sum())
        np.add.at(counts, ids, 1)
    assert np.mean(totals) == pytest.approx(len(free), rel=0.05)  # unbiased count of the non-candidates
    assert counts[7] > 5 * counts[free[~np.isin(free, [7, 8])]].mean() and counts[7] > counts[8]


def _naive_outside(corpus, qp, scale, s, sigma2, cand, counted):
    """(L,) log of the exact mass of every non-candidate patch of the same layout not in ``counted``
    (a set of (u, image, position)), by a loop over images."""
    size = corpus.shape[-1]
    cp = extract_patches(corpus.double() * s, scale)  # (N, L, D)
    out = torch.full((qp.shape[0],), -math.inf, dtype=torch.float64)
    for group in layout_groups(size, scale):
        for u in group.positions.tolist():
            terms = [-((qp[u] - cp[n, v]) ** 2).sum() / (2 * sigma2)
                     for n in range(len(corpus)) if n not in cand for v in group.positions.tolist() if (u, n, v) not in counted]
            if terms:
                out[u] = torch.logsumexp(torch.stack(terms), 0)
    return out


@pytest.mark.parametrize("scale", ["3", "4:2"])
def test_exhaustive_sample_is_the_exact_outside_mass_less_the_counted_pairs(crops, scale):
    corpus, queries = crops
    sc = Scale.parse(scale)
    s, sigma2 = 0.9, 0.2
    qp = extract_patches(queries[:1].double(), sc)[0]
    npos = qp.shape[0]
    cand = np.array([2, 7, 11])
    rng = np.random.default_rng(1)
    known_img = rng.integers(-1, len(corpus), (npos, 5))
    known_img[np.isin(known_img, cand)] = -1
    known_pos = np.where(known_img >= 0, rng.integers(0, npos, (npos, 5)), -1)
    counted = {(u, int(i), int(p)) for u in range(npos) for i, p in zip(known_img[u], known_pos[u]) if i >= 0}
    got = estimate_outside(CorpusView(corpus), qp, layout_groups(10, sc), sc, s, 1 / (2 * sigma2), known_img, known_pos, 10**6, Guide(len(corpus), cand), rng)
    want = _naive_outside(corpus, qp, sc, s, sigma2, set(cand.tolist()), counted)
    torch.testing.assert_close(got, want, rtol=2e-6, atol=0)  # patch vectors are read as float32


@pytest.mark.parametrize("guided", [False, True])
def test_sampled_estimate_is_unbiased(crops, guided):
    corpus, queries = crops
    sc = Scale(3)
    s, sigma2 = 0.9, 0.5
    qp = extract_patches(queries[:1].double(), sc)[0]
    cand = np.array([0, 1, 2])
    none = np.full((qp.shape[0], 1), -1)
    groups = layout_groups(10, sc)
    mass = np.random.default_rng(3).random(len(corpus)) ** 4 if guided else None
    est = lambda size, seed: torch.exp(estimate_outside(CorpusView(corpus), qp, groups, sc, s, 1 / (2 * sigma2), none, none, size, Guide(len(corpus), cand, mass), np.random.default_rng(seed)))
    want = est(10**6, 0)
    draws = torch.stack([est(12, i) for i in range(400)])  # 12 of 27 images, one position per class each
    mean, sem = draws.mean(0), draws.std(0) / 20
    assert (draws.std(0) > 0).all()
    assert ((mean - want).abs() <= 4 * sem).float().mean() >= 0.95


def test_with_an_exhaustive_outside_sample_candidates_score_exactly(crops):
    """Exact normaliser: the candidates' retrieved mass, the non-candidates' retrieved mass and the
    sample of the rest add up to the whole, so each candidate gets its exact score."""
    corpus, queries = crops
    exact = exact_scores(corpus, queries, timesteps=[100, 300], scales=[3, "2:2"], topk=4)
    att = Attributor(TorchFlatSearch(corpus, [3, "2:2"]), corpus, [3, "2:2"])
    got = att.attribute(queries, [100, 300], k=8, candidates=6, topk=4, tail=False, outside_sample=10**6, precision="float64")
    for (ti, q), (ids, vals) in got.sparse.items():
        assert len(ids) == 6
        np.testing.assert_allclose(vals, exact[ti, q, ids], rtol=2e-6)  # patch vectors are read as float32
        assert 0 < got.outside_mass[ti, q].min() and got.outside_mass[ti, q].max() < 1


def _per_class_outside(corpus, qp, groups, scale, s, inv, known_image, known_position, size, guide, rng):
    """estimate_outside's sampled estimator written pair by pair (one chunk): the same draws in the
    same order, so the same estimate. Returns (estimate (L,), the number of sampled pairs excluded
    as already counted)."""
    from nda_ann.scoring.patches import patch_view

    npos = qp.shape[0]
    out = torch.full((npos,), -math.inf, dtype=torch.float64)
    dropped = 0
    ids, log_w = guide.draw(size, rng)
    view = patch_view(corpus.take(ids).to(qp.dtype) * s, scale)
    grid = view.shape[1]
    for group in groups:
        pos = group.positions.numpy()
        at = pos[rng.integers(0, len(pos), len(ids))]
        y = view[torch.arange(len(ids)), torch.from_numpy(at // grid), torch.from_numpy(at % grid)].reshape(len(ids), -1)
        for u in pos.tolist():
            logits = -((qp[u] - y) ** 2).sum(-1) * inv + torch.from_numpy(log_w + math.log(len(pos)))
            known = {(int(i), int(p)) for i, p in zip(known_image[u], known_position[u]) if i >= 0}
            drop = torch.tensor([(int(i), int(a)) in known for i, a in zip(ids, at)])
            logits[drop] = -math.inf
            dropped += int(drop.sum())
            out[u] = torch.logsumexp(logits, 0)
    return out, dropped


@pytest.mark.parametrize("scale", ["3", "4:2"])
def test_sampled_estimate_equals_a_pair_by_pair_computation_over_the_same_draws(crops, scale):
    """The sampled (guided) estimate equals a loop over query positions and sampled pairs that uses
    the same draws, with retrieved pairs excluded by identity."""
    corpus, queries = crops
    sc = Scale.parse(scale)
    qp = extract_patches(queries[:1].double(), sc)[0]
    npos = qp.shape[0]
    cand = np.array([1, 5])
    rng = np.random.default_rng(4)
    known_img = rng.integers(-1, len(corpus), (npos, 40))
    known_img[np.isin(known_img, cand)] = -1
    known_pos = np.where(known_img >= 0, rng.integers(0, npos, (npos, 40)), -1)
    mass = np.random.default_rng(3).random(len(corpus)) ** 4
    groups = layout_groups(10, sc)
    args = (CorpusView(corpus), qp, groups, sc, 0.9, 1.7, known_img, known_pos, 9)
    got = estimate_outside(*args, Guide(len(corpus), cand, mass), np.random.default_rng(6))
    want, dropped = _per_class_outside(*args, Guide(len(corpus), cand, mass), np.random.default_rng(6))
    assert torch.isfinite(want).all() and dropped > 0
    torch.testing.assert_close(got, want, rtol=1e-9, atol=0)


def test_chunked_reading_gives_the_same_estimate(crops):
    """A memory budget of a few images per chunk changes how the sample is read, not the estimate's
    exact part; the sampled part stays unbiased (same draws of images, positions drawn per chunk)."""
    corpus, queries = crops
    sc = Scale(3)
    qp = extract_patches(queries[:1].double(), sc)[0]
    none = np.full((qp.shape[0], 1), -1)
    args = (CorpusView(corpus), qp, layout_groups(10, sc), sc, 0.9, 1.0, none, none)
    whole = estimate_outside(*args, 10**6, Guide(len(corpus), np.array([4])), np.random.default_rng(0))
    chunked = estimate_outside(*args, 10**6, Guide(len(corpus), np.array([4])), np.random.default_rng(0), budget=4 * 3 * 10 * 10 * 3)
    torch.testing.assert_close(chunked, whole, rtol=1e-12, atol=0)


def test_bad_outside_sample_is_named(crops):
    corpus, queries = crops
    att = Attributor(TorchFlatSearch(corpus, [3]), corpus, [3])
    for bad in (-1, 2.5):
        with pytest.raises(ValueError, match="outside_sample"):
            att.attribute(queries, 100, k=4, candidates=3, outside_sample=bad)
