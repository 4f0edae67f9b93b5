"""Candidates sized by the measured outside mass (attribution/rounds.py): rounds grow M until the
estimated outside share meets the target or the time is spent, and a tighter target moves the scores
towards the exact ones."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import nda_ann.attribution.attributor as attributor_mod
import nda_ann.attribution.rounds as rounds_mod
from nda_ann.attribution.attributor import Attributor
from nda_ann.attribution.candidates import ranked_candidates, select_candidates
from nda_ann.attribution.outside import OutsideSample
from nda_ann.corpus.store import uint8_to_float
from nda_ann.index.torch_search import TorchFlatSearch
from nda_ann.results.fidelity import fidelity
from nda_ann.scoring.exact import exact_scores


@pytest.fixture(scope="module")
def crops():
    from nda_ann.corpus.demo_corpus import demo_corpus

    dc = demo_corpus(n_train=120, n_queries=2, seed=5)
    small = torch.nn.functional.avg_pool2d(uint8_to_float(dc.train), 2)[:, :, 2:14, 2:14].contiguous()
    queries = torch.nn.functional.avg_pool2d(uint8_to_float(dc.queries), 2)[:, :, 2:14, 2:14].contiguous()
    exact = exact_scores(small, queries, timesteps=[300], scales=[3], topk=4)[0]
    return small, queries, exact


@pytest.fixture
def small_rounds(monkeypatch):
    monkeypatch.setattr(attributor_mod, "ADAPTIVE_FIRST", 6)
    monkeypatch.setattr(rounds_mod, "MIN_ROUND", 1)


def test_rounds_grow_until_the_estimated_outside_share_meets_the_target(crops, small_rounds):
    corpus, queries, exact = crops
    att = Attributor(TorchFlatSearch(corpus, [3]), corpus, [3])
    kw = dict(k=32, topk=4, maps=0, outside_sample=64, candidates=59)  # M < N / 2: the index path, not the full one
    loose = att.attribute(queries, 300, max_outside=0.9, **kw)
    tight = att.attribute(queries, 300, max_outside=0.05, **kw)
    for q in range(len(queries)):
        lo, hi = loose.rounds[(0, q)], tight.rounds[(0, q)]
        assert lo.met and lo.stopped_by == "target" and lo.outside <= 0.9
        assert hi.candidates > lo.candidates and hi.rounds > lo.rounds
        assert hi.met == (hi.outside <= 0.05) and hi.stopped_by in ("target", "pool")
        assert hi.met or hi.candidates == 59
        assert tight.outside_mass[0, q].mean() == pytest.approx(hi.outside)
        assert tight.candidates_used[0, q] == hi.candidates
        # more candidates, closer to the exact scores
        assert fidelity(tight.scores[0, q], exact[q])["relative_l1"] <= fidelity(loose.scores[0, q], exact[q])["relative_l1"] + 1e-9
    report = tight.candidates_report()
    assert set(report) == set(tight.query_names) and all("t=300" in v for v in report.values())


def test_a_spent_time_budget_stops_after_the_first_round(crops, small_rounds):
    corpus, queries, _ = crops
    att = Attributor(TorchFlatSearch(corpus, [3]), corpus, [3])
    got = att.attribute(queries, 300, k=32, topk=4, maps=0, candidates=59, time_budget=1e-9)
    assert all(r.stopped_by == "time" and r.rounds == 1 and not r.met for r in got.rounds.values())
    # the first query knows no costs yet and takes the usual first round; the second, planned from the
    # first's costs, only the least a query re-scores (MIN_ROUND, 1 here)
    assert [got.rounds[(0, q)].candidates for q in range(2)] == [6, 1]


def test_a_budget_the_query_cannot_keep_is_reported_and_warned_of(crops, small_rounds, caplog):
    """Each query's seconds (and those before its first round) reach summary.json's report; under a budget
    shorter than the search and set-up, every query says it ran past it and the run warns why."""
    corpus, queries, _ = crops
    att = Attributor(TorchFlatSearch(corpus, [3]), corpus, [3])
    kw = dict(k=32, topk=4, maps=0, candidates=59)
    with caplog.at_level("WARNING", logger="nda_ann.attribution.attributor"):
        late = att.attribute(queries, 300, time_budget=1e-6, **kw)
    rows = [late.candidates_report()[name]["t=300"] for name in late.query_names]
    assert all(0 < r["seconds_before_rounds"] < r["seconds"] and r["within_budget"] is False for r in rows)
    assert "2 of 2 queries ran past the time budget" in caplog.text and "cannot answer within the budget" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="nda_ann.attribution.attributor"):
        kept = att.attribute(queries, 300, time_budget=600.0, **kw)
    assert all(kept.candidates_report()[name]["t=300"]["within_budget"] for name in kept.query_names)
    assert "time budget" not in caplog.text
    assert all(label.endswith(", past its budget") for label in late.rounds_labels().values())
    assert not any("past its budget" in label for label in kept.rounds_labels().values())
    untimed = att.attribute(queries, 300, max_outside=0.5, **kw).candidates_report()
    assert all("within_budget" not in v["t=300"] and v["t=300"]["seconds"] > 0 for v in untimed.values())


def test_rounds_with_the_whole_pool_equal_one_round_of_the_same_candidates(crops, small_rounds):
    """Re-scoring in rounds (shifts raised and columns reordered on the way) gives the scores of re-scoring
    the same candidates at once, and its outside estimate drops the sampled images that became candidates."""
    corpus, queries, _ = crops
    att = Attributor(TorchFlatSearch(corpus, [3]), corpus, [3])
    kw = dict(k=32, topk=4, maps=0, outside_sample=0, tail=False)
    rounds = att.attribute(queries, 300, max_outside=1e-6, candidates=40, **kw)
    once = att.attribute(queries, 300, candidates=40, **kw)
    assert all(r.candidates == 40 for r in rounds.rounds.values())
    np.testing.assert_allclose(rounds.scores, once.scores, rtol=1e-5, atol=1e-9)


def test_ranked_candidates_prefixes_follow_the_thumbnail_share():
    rng = np.random.default_rng(0)
    mass = rng.random(200)
    assert set(ranked_candidates(mass, 50)[:20].tolist()) == set(select_candidates(mass, 20).tolist())
    thumbs = rng.random((200, 12)).astype(np.float16)
    q = torch.from_numpy(rng.random(12).astype(np.float32))
    ranked = ranked_candidates(mass, 60, thumbs, q, 0.5)
    assert len(ranked) == 60 == len(set(ranked.tolist()))
    assert len(set(ranked[:40].tolist()) & set(select_candidates(mass, 40, thumbs, q, 0.5).tolist())) >= 36


def test_outside_sample_leaves_out_images_that_became_candidates():
    contrib = torch.log(torch.tensor([[1.0, 2.0, 4.0], [0.5, 0.0, 1.0]], dtype=torch.float64))
    sample = OutsideSample(np.array([3, 7, 9]), contrib)
    torch.testing.assert_close(sample.log_mass(), torch.log(torch.tensor([7.0, 1.5], dtype=torch.float64)))
    torch.testing.assert_close(sample.log_mass(np.array([1, 7])), torch.log(torch.tensor([5.0, 1.5], dtype=torch.float64)))
    assert torch.isinf(sample.log_mass(np.array([3, 7, 9]))).all()


def test_cli_max_outside_reports_the_rounds_in_summary_json(tmp_path):
    import json
    import re

    from click.testing import CliRunner
    from PIL import Image

    from nda_ann import build_index, demo_corpus, write_store
    from nda_ann.cli import main
    from nda_ann.scoring.operands import kernel_path

    dc = demo_corpus(n_train=300, n_queries=1, seed=2)
    store = write_store(tmp_path / "store", dc.train)
    build_index(store, tmp_path / "ix", ["7"], progress=False)
    Image.fromarray(dc.queries[0]).save(tmp_path / "q.png")
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["attribute", str(tmp_path / "ix"), str(tmp_path / "q.png"), "--candidates", "140",
                                  "--max-outside", "0.2", "--time-budget", "60", "--outside-topup", "32", "--out", str(out)])
    assert r.exit_code == 0, r.output
    summary = json.loads((out / "summary.json").read_text())
    rec = summary["candidates"]["q.png"]["t=100"]
    assert summary["settings"]["max_outside"] == 0.2 and summary["settings"]["time_budget"] == 60
    assert summary["settings"]["outside_topup"] == 32
    assert summary["settings"]["kernel"] == kernel_path(torch.device("cpu"), torch.float32)  # the path that ran
    assert summary["settings"]["conv_layout"] and set(summary["settings"]["conv_layout"]) <= {"direct", "unfold"}
    assert 0 < rec["candidates"] <= 140 and rec["target_met"] == (rec["outside"] <= 0.2)
    assert rec["stopped_by"] in ("target", "pool")
    # the printed table says what the rounds reached, beside the query's name
    shown = re.search(r"query q\.png \(M (\d+), est\. outside (\d\.\d\d), (\d+\.\d\d) s\), t=100", r.output)
    assert shown, r.output
    assert int(shown[1]) == rec["candidates"] and abs(float(shown[2]) - rec["outside"]) <= 0.006
    assert abs(float(shown[3]) - rec["seconds"]) <= 0.006
    assert "past its budget" not in r.output


def test_a_time_budget_plans_for_the_known_logits_that_follow_each_round(monkeypatch):
    """On a fake clock: re-scoring costs 1 ms per image and each round's known logits 100 ms after it; the
    rounds stop within the deadline (planning on re-scoring alone would end the last round's known logits
    56 ms past it), and use the time: the last round fills what is left."""
    from types import SimpleNamespace

    clock = [0.0]
    monkeypatch.setattr(rounds_mod, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    monkeypatch.setattr(rounds_mod, "retrieved_outside", lambda known: known)

    class Res:
        def __init__(self):
            self.ids: list[int] = []

        def add(self, ids):
            clock[0] += 1e-3 * len(ids)
            self.ids += list(ids)

        def cand(self):
            return np.sort(np.array(self.ids))

        def outside(self, retrieved, sampled):
            return np.ones(1)  # never meets a target: only the time stops the rounds

    def known_of(cand):
        clock[0] += 0.1
        return {}

    res = Res()
    _, _, record = rounds_mod.grow(res, np.arange(10_000), 32, known_of, {}, None, 0.6)
    assert clock[0] <= 0.6 + 1e-9 and record.stopped_by == "time"
    assert clock[0] > 0.6 - 0.1 - 1e-3 * rounds_mod.MIN_ROUND  # no round that fitted was left out
    assert len(res.ids) == record.candidates == len(set(res.ids))
