"""`nda-ann attribute` / `compare` end to end through click, and bad input reaching them."""
from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner

from nda_ann.cli import main

from serve_helpers import build_small_index


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return build_small_index(tmp_path_factory.mktemp("cli"), held_out=2).root


def test_attribute_index_writes_scores_summary_and_figures(built):
    out = built / "out"
    r = CliRunner().invoke(main, ["attribute", str(built / "index"), str(built / "queries"), "-t", "100", "-t", "300", "--topk", "10", "-m", "20", "--k", "64", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "copy11.png" in r.output
    rows = pq.read_table(out / "scores.parquet").to_pylist()
    best = [x for x in rows if x["query"] == "copy11.png" and x["timestep"] == 100 and x["rank"] == 1][0]
    assert best["image_id"] == 11
    summary = json.loads((out / "summary.json").read_text())
    assert summary["settings"]["candidates"] == 20 and summary["settings"]["k"] == 64
    assert set(summary["outside_mass"]["copy11.png"]["t=300"]) == {"5", "4:2"}
    assert len(list(out.glob("*.png"))) == 3
    # rerunning into the same results folder is allowed; a foreign non-empty folder is not
    (built / "foreign").mkdir()
    (built / "foreign" / "notes.txt").write_text("mine")
    r = CliRunner().invoke(main, ["attribute", str(built / "index"), str(built / "queries" / "gen0.png"), "--out", str(built / "foreign")])
    assert r.exit_code != 0 and "non-empty folder" in r.output
    assert (built / "foreign" / "notes.txt").read_text() == "mine"


def test_attribute_exact_and_compare(built):
    out = built / "exact"
    r = CliRunner().invoke(main, ["attribute", "--exact", str(built / "store"), str(built / "queries" / "copy11.png"), "--scale", "5", "-t", "100", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert pq.read_table(out / "scores.parquet").to_pylist()[0]["image_id"] == 11
    r = CliRunner().invoke(main, ["compare", str(built / "index"), str(built / "queries"), "-t", "100", "-m", "60", "--k", "32", "--json", str(built / "cmp.json")])
    assert r.exit_code == 0, r.output
    rows = json.loads((built / "cmp.json").read_text())["rows"]
    # M = N: the index path re-scores every image, so it reproduces the exact scores
    assert all(row["top10_overlap"] == 1.0 and row["relative_l1"] < 1e-3 for row in rows)


def test_bad_queries_give_clear_errors(built):
    bad = built / "bad"
    bad.mkdir()
    (bad / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    r = CliRunner().invoke(main, ["attribute", str(built / "index"), str(bad / "broken.png"), "--out", str(built / "o1")])
    assert r.exit_code != 0 and "broken.png" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(main, ["attribute", str(built / "index"), str(built / "queries"), "-t", "1000", "--out", str(built / "o2")])
    assert r.exit_code != 0 and "outside" in r.output
    r = CliRunner().invoke(main, ["attribute", "--exact", str(built / "store"), str(built / "queries"), "--scale", "17", "--out", str(built / "o3")])
    assert r.exit_code != 0 and "larger than" in r.output
    r = CliRunner().invoke(main, ["attribute", "--exact", str(built / "store"), str(built / "queries"), "--scale", "5:2", "--out", str(built / "o4")])
    assert r.exit_code != 0 and "multiple of factor" in r.output


def test_python_api_refuses_mismatched_float_queries(built):
    from nda_ann import Attributor
    from nda_ann.errors import InputError

    att = Attributor.open(built / "index")
    with pytest.raises(InputError, match="resize queries"):
        att.attribute(torch.zeros(1, 3, 20, 20))
    with pytest.raises(InputError, match="NaN or Inf"):
        att.attribute(torch.full((1, 3, 16, 16), float("inf")))
    with pytest.raises(InputError, match="1x16x16|resize"):
        att.attribute(torch.zeros(1, 1, 16, 16))
    res = att.attribute(torch.zeros(1, 3, 16, 16), k=10_000, candidates=10_000)  # more than exist: clipped
    assert res.scores.shape == (1, 1, 60)
