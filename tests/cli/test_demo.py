"""The demo end to end at a tiny size, through the CLI; and a sanity check of what it attributes."""
from __future__ import annotations

import importlib.util
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import Image

from nda_ann.demo import open_or_write_store
from nda_ann.corpus.demo_corpus import demo_corpus
from nda_ann.scoring.exact import exact_scores
from nda_ann.results.figures import figure_size
from nda_ann.corpus.store import Store, uint8_to_float

if importlib.util.find_spec("skimage") is None:
    pytest.skip("the demo photographs ship with scikit-image", allow_module_level=True)


def test_demo_command_end_to_end(tmp_path):
    from nda_ann.cli.demo_cmd import demo  # noqa: F401  (registers the command)
    from nda_ann.cli.group import main

    out = tmp_path / "demo"
    res = CliRunner().invoke(main, ["demo", "--out", str(out), "--n-train", "60", "--queries", "2", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert "query q0" in res.output and "query q1" in res.output and "rank" in res.output

    store = Store.open(out / "store", verify=True)
    corpus = demo_corpus(60, 2)
    assert np.array_equal(np.asarray(store.images), corpus.train)

    table = pq.read_table(out / "scores.parquet")
    assert table.column_names == ["query", "timestep", "image_id", "source", "score", "rank"]
    for q in ("q0", "q1"):
        rows = table.filter(table.column("query").to_numpy(zero_copy_only=False) == q).to_pylist()
        assert [r["rank"] for r in rows] == list(range(1, len(rows) + 1))
        assert all(a["score"] >= b["score"] for a, b in zip(rows, rows[1:]))
        assert all(r["source"] == store.sources()[r["image_id"]] for r in rows)
        assert {r["timestep"] for r in rows} == {100}

    summary = json.loads((out / "demo.json").read_text())
    assert summary["store_fingerprint"] == store.fingerprint
    for q, fig in enumerate(summary["figures"]):
        with Image.open(fig) as im:
            assert im.size == figure_size(8, heatmaps=True, title=True)
        top5 = [r["image_id"] for r in table.to_pylist() if r["query"] == f"q{q}"][:5]
        assert summary["top"][f"q{q}"][:5] == top5


def test_store_is_reused_only_when_the_pixels_match(tmp_path):
    corpus = demo_corpus(30, 1)
    first, reused = open_or_write_store(tmp_path / "store", corpus)
    assert not reused
    again, reused = open_or_write_store(tmp_path / "store", corpus)
    assert reused and again.fingerprint == first.fingerprint
    other, reused = open_or_write_store(tmp_path / "store", demo_corpus(30, 1, seed=1))
    assert not reused and other.fingerprint != first.fingerprint


def test_an_exact_copy_of_a_training_crop_ranks_it_first():
    corpus = demo_corpus(80, 1)
    train = uint8_to_float(corpus.train)
    picks = [3, 71]
    scores = exact_scores(train, train[picks], timesteps=[100], scales=[7], topk=100, device="cpu", precision="float32")
    assert scores.shape == (1, 2, 80)
    assert scores[0].argmax(axis=1).tolist() == picks
