"""The outside sample topped up in later rounds (outside.OutsideSample.pooled, outside.top_up): the
pooled estimate against a naive weighted average, its unbiasedness once the candidates have grown (a
simulation with a known truth), and the rounds drawing and recording it."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from nda_ann.attribution.outside import Guide, OutsideSample, top_up


def sample_of(masses: np.ndarray, cand: np.ndarray, guide_mass: np.ndarray, size: int, seed: int) -> OutsideSample:
    """A one-position sample (L = 1) of the images outside ``cand`` drawn as the attributor draws them."""
    ids, log_w = Guide(len(masses), cand, guide_mass, 0.5).draw(size, np.random.default_rng(seed))
    with np.errstate(divide="ignore"):
        contrib = np.log(masses[ids]) + log_w
    return OutsideSample(ids, torch.from_numpy(contrib)[None])


def test_the_pooled_estimate_is_the_draw_weighted_average_of_the_samples():
    rng = np.random.default_rng(0)
    parts = [OutsideSample(rng.integers(0, 50, s), torch.from_numpy(rng.normal(size=(6, s)))) for s in (5, 12, 3)]
    exclude = np.array([4, 9, 17, 30])
    pooled = OutsideSample.pooled(parts)
    naive = np.zeros(6)
    for part in parts:
        kept = ~np.isin(part.ids, exclude)
        naive += len(part.ids) / 20 * np.exp(part.log_contrib.numpy()[:, kept]).sum(-1)
    np.testing.assert_allclose(np.exp(pooled.log_mass(exclude).numpy()), naive, rtol=1e-12)
    assert len(pooled.ids) == 20


def test_a_pooled_top_up_stays_unbiased_and_varies_less_once_the_candidates_grow():
    """Heavy-tailed image masses; the guide favours the heavy images, round 1's candidates are the 20 it
    ranks first and round 2 adds the next 60, where most of the guided draws fell. The old sample with those
    images left out and its pool with a fresh draw against round 2's candidates both estimate the mass
    outside round 2's candidates without bias; the pool varies less."""
    rng = np.random.default_rng(1)
    n = 400
    masses = np.exp(rng.normal(0, 2.0, n))
    guide_mass = masses * np.exp(rng.normal(0, 0.5, n))
    ranked = np.argsort(-guide_mass)
    cand0, cand1 = np.sort(ranked[:20]), np.sort(ranked[:80])
    truth = masses.sum() - masses[cand1].sum()
    old_only, pooled = [], []
    for seed in range(3000):
        first = sample_of(masses, cand0, guide_mass, 32, seed)
        fresh = sample_of(masses, cand1, guide_mass, 16, 10_000 + seed)
        old_only.append(math.exp(first.log_mass(cand1)[0].item()))
        pooled.append(math.exp(top_up({"k": first}, {"k": fresh})["k"].log_mass(cand1)[0].item()))
    for values in (old_only, pooled):
        mean, se = np.mean(values), np.std(values) / math.sqrt(len(values))
        assert abs(mean - truth) <= 4 * se, (mean, truth, se)
    assert np.std(pooled) < np.std(old_only)


def test_an_exact_top_up_replaces_the_sample_and_an_exact_sample_is_kept():
    sampled = OutsideSample(np.array([3, 8]), torch.zeros((4, 2)), smoothing=1.0)
    exact = OutsideSample(np.arange(10), torch.zeros((4, 10)), exact=True)
    assert top_up({"k": sampled}, {"k": exact})["k"] is exact
    assert top_up({"k": exact}, {"k": sampled})["k"] is exact
    pooled = top_up({"k": sampled}, {"k": OutsideSample(np.array([5]), torch.zeros((4, 1)))})["k"]
    assert list(pooled.ids) == [3, 8, 5] and pooled.smoothing == 1.0


@pytest.fixture(scope="module")
def attributor(tmp_path_factory):
    from nda_ann import Attributor, build_index, demo_corpus, write_store

    tmp = tmp_path_factory.mktemp("topup")
    dc = demo_corpus(n_train=500, n_queries=2, seed=5)
    store = write_store(tmp / "store", dc.train)
    index = build_index(store, tmp / "index", ["7"], progress=False, factory="PCA64,IVF{nlist},SQ8", candidate_stride=4,
                        classes="all")
    return Attributor.open(index.path), dc.queries


def test_the_rounds_top_up_the_sample_and_record_the_setting(attributor, monkeypatch):
    import nda_ann.attribution.attributor as attributor_mod
    import nda_ann.attribution.rounds as rounds_mod

    att, queries = attributor
    monkeypatch.setattr(attributor_mod, "ADAPTIVE_FIRST", 16)
    monkeypatch.setattr(rounds_mod, "MIN_ROUND", 8)
    sizes: list[int] = []
    real_top_up = rounds_mod.top_up

    def spy(sampled, fresh):
        out = real_top_up(sampled, fresh)
        sizes.append(max(len(x.ids) for x in out.values()))
        return out

    monkeypatch.setattr(rounds_mod, "top_up", spy)
    res = att.attribute(queries, 100, max_outside=0.05, candidates=200, outside_sample=24, outside_topup=8, maps=0)
    grown = [r for r in res.rounds.values() if r.rounds > 1]
    assert grown, res.rounds
    assert sizes and min(sizes) > 24  # every later round pooled 8 more draws with the first 24
    assert res.settings["outside_topup"] == 8
    sizes.clear()
    off = att.attribute(queries, 100, max_outside=0.05, candidates=200, outside_sample=24, outside_topup=0, maps=0)
    assert not sizes and off.settings["outside_topup"] == 0


def test_outside_topup_rejects_what_is_not_a_count(attributor):
    att, queries = attributor
    for bad in (-1, 2.5, True):
        with pytest.raises(ValueError, match="outside_topup"):
            att.attribute(queries, 100, outside_topup=bad, maps=0)


def test_the_top_up_defaults_to_64_images_with_or_without_a_time_budget():
    from nda_ann.attribution.settings import DEFAULT_OUTSIDE_TOPUP, AttributionSettings
    from nda_ann.scoring.schedule import NoiseSchedule

    sched = NoiseSchedule("linear")
    assert AttributionSettings.create(100, sched).outside_topup == DEFAULT_OUTSIDE_TOPUP == 64
    assert AttributionSettings.create(100, sched, time_budget=2.0).outside_topup == 64
    assert AttributionSettings.create(100, sched, time_budget=2.0, outside_topup=32).outside_topup == 32
    assert AttributionSettings.create(100, sched, max_outside=0.2, outside_topup=0).outside_topup == 0
