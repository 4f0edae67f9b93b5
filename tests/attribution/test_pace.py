"""A time budget plans with the costs of the earlier queries (attribution/pace.py): the first round takes
only what the rest of the budget pays for, and the last round leaves the finish its time."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

import nda_ann.attribution.attributor as attributor_mod
import nda_ann.attribution.rounds as rounds_mod
from nda_ann.attribution.attributor import Attributor
from nda_ann.attribution.pace import Pace, overrun_warning
from nda_ann.attribution.rescore import Rescoring
from nda_ann.attribution.rounds import RoundsRecord
from nda_ann.corpus.store import uint8_to_float
from nda_ann.index.torch_search import TorchFlatSearch


def test_running_costs_average_the_newest_with_the_earlier_ones():
    pace = Pace()
    assert pace.per_image is None
    pace.note("per_image", 4e-3)
    assert pace.per_image == 4e-3
    pace.note("per_image", 2e-3)
    assert pace.per_image == pytest.approx(3e-3)


def test_the_overrun_warning_names_the_late_queries_and_a_fixed_cost_past_the_budget():
    def rec(seconds, before):
        return RoundsRecord(100, 0.2, False, 2, "time", seconds=seconds, before_rounds=before)

    assert overrun_warning({(0, 0): rec(1.05, 0.4), (0, 1): rec(0.9, 0.3)}, 1.0) is None  # within the tolerance
    rounds_late = overrun_warning({(0, 0): rec(1.5, 0.4), (0, 1): rec(0.9, 0.3)}, 1.0)
    assert rounds_late.startswith("1 of 2 queries ran past the time budget of 1.00 s") and "slowest 1.50 s" in rounds_late
    assert "cannot answer" not in rounds_late  # its rounds, not what preceded them, ran late
    fixed = overrun_warning({(0, 0): rec(1.9, 1.4), (0, 1): rec(2.5, 1.6), (0, 2): rec(1.2, 0.5)}, 1.0)
    assert fixed.startswith("3 of 3 queries") and "slowest 2.50 s" in fixed
    assert "2 spent 1.50 s (median) before their first round" in fixed and "cannot answer within the budget" in fixed


def test_the_first_round_takes_what_the_rest_of_the_budget_pays_for():
    assert Pace().first_round(128, 0.5, 32) == 128  # nothing measured yet: as before
    pace = Pace(per_image=5e-3, setup=0.3, finish=0.1)
    assert pace.first_round(128, None, 32) == 128  # no budget
    assert pace.first_round(128, 2.0, 32) == 128  # room for 320
    assert pace.first_round(128, 0.9, 32) == 100  # (0.9 - 0.3 - 0.1) / 5 ms
    assert pace.first_round(128, 0.1, 32) == 32  # spent: the least a query re-scores
    assert pace.first_round(20, 0.1, 32) == 20  # never more than the cap


class _FakeRounds:
    """Re-scoring on a fake clock: 1 ms per image; known logits 100 ms."""

    def __init__(self, clock: list[float]):
        self.clock, self.ids, self.known_calls = clock, [], 0

    def add(self, ids):
        self.clock[0] += 1e-3 * len(ids)
        self.ids += list(ids)

    def cand(self):
        return np.sort(np.array(self.ids))

    def outside(self, retrieved, sampled):
        return np.ones(1)  # never meets a target: only the time stops the rounds

    def known_of(self, cand):
        self.known_calls += 1
        self.clock[0] += 0.1
        return {}


@pytest.fixture
def fake_clock(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(rounds_mod, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    monkeypatch.setattr(rounds_mod, "retrieved_outside", lambda known: known)
    return clock


def test_the_last_round_leaves_the_finish_its_time(fake_clock):
    plain = _FakeRounds(fake_clock)
    rounds_mod.grow(plain, np.arange(10_000), 32, plain.known_of, {}, None, 1.0)
    ended_plain = fake_clock[0]
    fake_clock[0] = 0.0
    kept = _FakeRounds(fake_clock)
    pace = Pace()
    _, _, record = rounds_mod.grow(kept, np.arange(10_000), 32, kept.known_of, {}, None, 1.0, finish=0.3, pace=pace)
    assert fake_clock[0] <= 1.0 - 0.3 + 1e-9 < ended_plain  # the finish's 0.3 s are kept free
    assert fake_clock[0] > 1.0 - 0.3 - 0.1 - 1e-3 * rounds_mod.MIN_ROUND  # and the rest is used
    assert record.stopped_by == "time" and pace.per_image == pytest.approx(1e-3)


def test_a_later_round_plans_for_the_top_up_that_follows_it(fake_clock):
    """The top-up (200 ms here) follows later rounds only, so a first query whose second round is the
    last one that fits cannot know it and ends past its deadline; the next query plans for it from the
    first one's costs and keeps to the deadline."""
    def topup(cand, known, round_):
        fake_clock[0] += 0.2
        return {}

    pace, ends = Pace(), []
    for _ in range(2):
        fake_clock[0] = 0.0
        res = _FakeRounds(fake_clock)
        rounds_mod.grow(res, np.arange(10_000), 32, res.known_of, {}, None, 0.3, topup, pace=pace)
        ends.append(fake_clock[0])
    assert ends[0] > 0.3 + 0.1 and ends[1] <= 0.3 + 1e-9
    assert pace.after == pytest.approx(0.3)  # known logits 0.1 + top-up 0.2


def test_a_round_slower_than_the_one_before_it_measured_is_planned_for(fake_clock):
    """Round 1 runs at 1 ms an image, round 2 at 3 ms: planned at round 1's cost, round 2 overruns; the
    next query plans with the overrun measured and keeps to its deadline."""
    class Slower(_FakeRounds):
        def add(self, ids):
            self.clock[0] += (1e-3 if not self.ids else 3e-3) * len(ids)
            self.ids += list(ids)

    pace, ends = Pace(), []
    for _ in range(2):
        fake_clock[0] = 0.0
        res = Slower(fake_clock)
        rounds_mod.grow(res, np.arange(10_000), 200, res.known_of, {}, None, 0.55, pace=pace)
        ends.append(fake_clock[0])
    assert ends[0] > 0.55 + 0.1 and ends[1] <= 0.55 + 1e-9
    assert pace.overrun == pytest.approx(3.0)


def test_known_logits_the_caller_has_are_not_computed_again(fake_clock):
    res = _FakeRounds(fake_clock)
    _, _, record = rounds_mod.grow(res, np.arange(100), 32, res.known_of, {}, None, None, first_known=({"k": 1}, 0.1))
    assert record.stopped_by == "fixed" and res.known_calls == 0


@pytest.fixture(scope="module")
def crops():
    from nda_ann.corpus.demo_corpus import demo_corpus

    dc = demo_corpus(n_train=120, n_queries=2, seed=5)
    small = torch.nn.functional.avg_pool2d(uint8_to_float(dc.train), 2)[:, :, 2:14, 2:14].contiguous()
    queries = torch.nn.functional.avg_pool2d(uint8_to_float(dc.queries), 2)[:, :, 2:14, 2:14].contiguous()
    return small, queries


def test_an_attributor_sizes_its_first_round_from_its_earlier_queries(crops, monkeypatch):
    """A second query under the same settings starts with fewer candidates when the first one's costs say
    the usual first round would not fit the budget, and its rounds then still measure and grow."""
    monkeypatch.setattr(attributor_mod, "ADAPTIVE_FIRST", 16)
    monkeypatch.setattr(rounds_mod, "MIN_ROUND", 1)
    corpus, queries = crops
    firsts: list[int] = []
    add = Rescoring.add

    def spy(self, ids):
        if not self.order:
            firsts.append(len(ids))
        add(self, ids)

    monkeypatch.setattr(Rescoring, "add", spy)
    att = Attributor(TorchFlatSearch(corpus, [3]), corpus, [3])
    kw = dict(k=32, topk=4, maps=0, candidates=59, outside_sample=16, time_budget=30.0)
    att.attribute(queries[:1], 300, **kw)
    assert firsts == [16]  # nothing measured yet
    (pace,) = att._paces.values()
    assert pace.per_image > 0 and pace.setup > 0 and pace.finish > 0
    pace.per_image = 3.0  # as if each image took 3 s: 30 s pay for about 9
    got = att.attribute(queries[1:], 300, **kw)
    assert 5 <= firsts[1] <= 10
    assert got.rounds[(0, 0)].candidates >= firsts[1]
    assert pace.per_image < 3.0  # the round measured its own cost
