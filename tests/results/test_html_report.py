"""report.html of a results folder: self-contained (every picture a data URI, nothing fetched), the
scores of scores.parquet, heatmaps that sum to the scores, and clear errors on folders that lack
what it needs."""
from __future__ import annotations

import base64
import io
import json
import shutil
from html.parser import HTMLParser

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import Image

from nda_ann.cli import main

from serve_helpers import build_small_index


class Collect(HTMLParser):
    """The img sources, td.score data-score values, tr.proponent image ids and h2 texts, in order."""

    def __init__(self):
        super().__init__()
        self.imgs, self.scores, self.ids, self.h2, self.tags = [], [], [], [], []
        self._in_h2 = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append((tag, a))
        if tag == "img":
            self.imgs.append(a["src"])
        if tag == "td" and a.get("class") == "score":
            self.scores.append(float(a["data-score"]))
        if tag == "tr" and a.get("class") == "proponent":
            self.ids.append(int(a["data-image-id"]))
        self._in_h2 = tag == "h2"

    def handle_data(self, data):
        if self._in_h2:
            self.h2.append(data)
            self._in_h2 = False


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    small = build_small_index(tmp_path_factory.mktemp("report"))
    out = small.root / "results"
    r = CliRunner().invoke(main, ["attribute", str(small.index), str(small.root / "queries"), "-t", "100", "-t", "300", "--out", str(out), "--html"])
    assert r.exit_code == 0, r.output
    assert "report.html" in r.output
    return small, out


def test_report_is_self_contained_and_shows_the_scores(results):
    small, out = results
    text = (out / "report.html").read_text()
    page = Collect()
    page.feed(text)
    assert "http://" not in text and "https://" not in text and "<link" not in text and "<script" not in text
    assert page.imgs and all(src.startswith("data:image/png;base64,") for src in page.imgs)
    for src in page.imgs:
        Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).verify()
    rows = pq.read_table(out / "scores.parquet").to_pylist()
    summary = json.loads((out / "summary.json").read_text())
    per_query = len(page.ids) // 2
    assert per_query == 8 and len(page.scores) == 16
    for q, name in enumerate(summary["queries"]):
        mean = sorted((r for r in rows if r["query"] == name and r["timestep"] == -1), key=lambda r: r["rank"])[:8]
        assert page.ids[q * 8 : q * 8 + 8] == [r["image_id"] for r in mean]
        assert page.scores[q * 8 : q * 8 + 8] == [r["score"] for r in mean]
        assert any(name in h for h in page.h2)
        outside = [v for per_t in summary["outside_mass"][name].values() for v in per_t.values()]
        shown = [float(a["data-outside"]) for tag, a in page.tags if a.get("class") == "outside"][q]
        assert shown == pytest.approx(np.mean(outside))
    assert page.ids[0] == 11  # copy11.png: training image 11 is its own top proponent


def test_report_data_holds_the_query_proponents_and_maps_that_sum_to_scores(results):
    small, out = results
    from nda_ann.results.report_data import read_report_data

    rows = pq.read_table(out / "scores.parquet").to_pylist()
    names = json.loads((out / "summary.json").read_text())["queries"]
    data = read_report_data(out)
    assert [d.query.shape for d in data] == [(16, 16, 3)] * 2
    copy = data[names.index("copy11.png")]
    assert np.array_equal(copy.query, small.images[11])
    for name, d in zip(names, data):
        assert np.array_equal(d.images, small.images[d.ids])
        score = {r["image_id"]: r["score"] for r in rows if r["query"] == name and r["timestep"] == -1}
        np.testing.assert_allclose(d.maps.sum(axis=(1, 2)), [score[i] for i in d.ids.tolist()], rtol=1e-4)


def test_report_command_and_its_errors(results, tmp_path):
    small, out = results
    r = CliRunner().invoke(main, ["report", str(out), "--out", str(tmp_path / "elsewhere.html")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "elsewhere.html").read_text() == (out / "report.html").read_text()
    lacking = tmp_path / "old-results"
    shutil.copytree(out, lacking)
    (lacking / "report.npz").unlink()
    r = CliRunner().invoke(main, ["report", str(lacking)])
    assert r.exit_code != 0 and "no report.npz" in r.output and "rerun" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(main, ["report", str(small.root / "store")])
    assert r.exit_code != 0 and "not an nda-ann results folder" in r.output
    r = CliRunner().invoke(main, ["report", str(tmp_path / "missing")])
    assert r.exit_code != 0 and "no such results folder" in r.output
    (lacking / "report.npz").write_bytes(b"not a zip")
    r = CliRunner().invoke(main, ["report", str(lacking)])
    assert r.exit_code != 0 and "cannot read" in r.output


def test_report_of_an_exact_run(results, tmp_path):
    small, _ = results
    out = tmp_path / "exact"
    r = CliRunner().invoke(main, ["attribute", "--exact", str(small.root / "store"), str(small.queries["copy11.png"]), "--scale", "5", "--out", str(out), "--html"])
    assert r.exit_code == 0, r.output
    page = Collect()
    page.feed((out / "report.html").read_text())
    best = [r for r in pq.read_table(out / "scores.parquet").to_pylist() if r["rank"] == 1][0]
    assert page.ids[0] == best["image_id"] == 11 and page.scores[0] == best["score"]
