"""Tail scores of the non-candidates: tail=True (their retrieved weights), "scaled" (those weights scaled
up to the estimated outside mass, at most SCALE_CAP times), False (0)."""
from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from nda_ann import Attributor
from nda_ann.attribution.tail import SCALE_CAP
from nda_ann.cli import main

from serve_helpers import build_small_index


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return build_small_index(tmp_path_factory.mktemp("tail"), held_out=2)


def _run(small, tail):
    att = Attributor.open(small.index)
    queries = [str(p) for p in small.queries.values()]
    return att.attribute(queries, [100], candidates=6, k=32, topk=20, tail=tail, maps=0)


def test_scaled_tail_keeps_candidate_scores_and_raises_non_candidates_at_most_the_cap(small):
    plain, scaled, off = _run(small, True), _run(small, "scaled"), _run(small, False)
    assert scaled.settings["tail"] == "scaled" and plain.settings["tail"] is True
    assert _run(small, None).settings["tail"] == "scaled"  # the default
    raised = 0
    for q in range(plain.scores.shape[1]):
        cand = plain.candidate_ids[(0, q)]
        assert np.array_equal(cand, scaled.candidate_ids[(0, q)])
        rest = np.setdiff1d(np.arange(plain.scores.shape[2]), cand)
        # candidates: the exact re-scored scores, the same normaliser whatever the tail
        np.testing.assert_allclose(scaled.scores[0, q, cand], plain.scores[0, q, cand], rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(off.scores[0, q, cand], plain.scores[0, q, cand], rtol=1e-6, atol=1e-9)
        assert np.all(off.scores[0, q, rest] == 0)
        p, s = plain.scores[0, q, rest], scaled.scores[0, q, rest]
        assert np.all(s >= p * (1 - 1e-6)) and np.all(s <= SCALE_CAP * p * (1 + 1e-6) + 1e-12)
        assert np.all((p > 0) == (s > 0))  # scaling makes no unretrieved image appear
        raised += int(np.sum(s > p * (1 + 1e-3)))
    assert raised > 0  # some outside mass is unretrieved here, so some tails were scaled up


def test_cli_tail_modes_are_recorded_and_contradicting_no_tail_is_refused(small, tmp_path):
    q = str(small.queries["gen0.png"])
    args = ["attribute", str(small.index), q, "-m", "6", "--k", "32", "--topk", "20", "--out"]
    for extra, want in (([], "scaled"), (["--tail", "retrieved"], True), (["--tail", "off"], False), (["--no-tail"], False)):
        out = tmp_path / f"run{len(extra)}{want}"
        r = CliRunner().invoke(main, [*args, str(out), *extra])
        assert r.exit_code == 0, r.output
        assert json.loads((out / "summary.json").read_text())["settings"]["tail"] == want
    for choice in ("remeasured", "all"):
        r = CliRunner().invoke(main, [*args, str(tmp_path / choice), "--tail-retrieved", choice])
        assert r.exit_code == 0, r.output
        assert json.loads((tmp_path / choice / "summary.json").read_text())["settings"]["tail_retrieved"] == choice
    r = CliRunner().invoke(main, [*args, str(tmp_path / "c"), "--tail-retrieved", "some"])
    assert r.exit_code == 2 and "--tail-retrieved" in r.output
    r = CliRunner().invoke(main, [*args, str(tmp_path / "b"), "--tail", "scaled", "--no-tail"])
    assert r.exit_code == 2 and "contradict" in r.output and not (tmp_path / "b").exists()
