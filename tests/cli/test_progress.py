"""Long phases show progress: the build's training (FAISS k-means reports nothing itself) and
the index phase of `compare`."""
from __future__ import annotations

import time

import numpy as np
from click.testing import CliRunner
from PIL import Image

from nda_ann.cli import main
from nda_ann.corpus.store import write_store
from nda_ann.index import build_index
from nda_ann.index import phases


def test_a_ticking_bar_advances_while_its_block_runs(monkeypatch):
    monkeypatch.setattr(phases, "TICK_SECONDS", 0.01)
    with phases.ticking("step", est_seconds=100, progress=True) as bar:
        deadline = time.monotonic() + 10
        while bar.n == 0 and time.monotonic() < deadline:
            time.sleep(0.01)  # the block does nothing a bar could count
        assert 0 < bar.n < 99  # advanced by the clock, below 99% of the estimate
    assert bar.n == bar.total


def test_the_build_shows_progress_while_it_trains(tmp_path, capsys):
    images = np.random.default_rng(8).integers(0, 256, (30, 12, 12, 3), dtype=np.uint8)
    store = write_store(tmp_path / "s", images)
    build_index(store, tmp_path / "ix", ["5"], factory="IVF4,Flat", progress=True)
    err = capsys.readouterr().err
    assert "train 5:" in err and "of est." in err, err  # the bar of the k-means phase, over its estimate
    build_index(store, tmp_path / "quiet", ["5"], factory="IVF4,Flat", progress=False)
    assert "train 5:" not in capsys.readouterr().err


def test_compare_shows_the_progress_of_its_index_phase(tmp_path):
    images = np.random.default_rng(9).integers(0, 256, (12, 12, 12, 3), dtype=np.uint8)
    build_index(write_store(tmp_path / "s", images), tmp_path / "ix", ["5"], progress=False)
    Image.fromarray(images[2]).save(tmp_path / "q.png")
    r = CliRunner().invoke(main, ["compare", str(tmp_path / "ix"), str(tmp_path / "q.png"), "--k", "16"])
    assert r.exit_code == 0, r.output
    assert "attribute:" in r.output and "exact:" in r.output  # both phases, index path first
    assert r.output.index("attribute:") < r.output.index("exact:")
