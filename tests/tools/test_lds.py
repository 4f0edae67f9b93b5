"""The LDS harness (tools/lds): the metric on cases with known answers, deterministic subsets, and
the whole pipeline at a toy size (seconds), including resuming from its cache."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tools.lds.config import CONFIGS, apply_overrides, get_config  # noqa: E402
from tools.lds.data import sample_subsets  # noqa: E402
from tools.lds.lds import lds_per_query, lds_with_intervals, predictions, spearman_columns  # noqa: E402
from tools.lds.losses import loss_timesteps  # noqa: E402


def test_lds_is_one_for_a_monotone_function_of_the_prediction_and_minus_one_reversed(rng):
    masks = sample_subsets(30, 12, 0.5, seed=1)
    scores = rng.exponential(size=(5, 30))
    pred = predictions(masks, scores)  # (12, 5)
    assert np.allclose(lds_per_query(np.exp(pred), masks, scores), 1.0)
    assert np.allclose(lds_per_query(-(pred**3), masks, scores), -1.0)
    # higher credit to a subset's members must mean LOWER loss for a positive LDS
    assert np.allclose(lds_per_query(-pred, masks, -scores), 1.0)


def test_lds_hand_computed_example():
    # 4 images, 4 subsets of 2; one query crediting image 0 most, then image 1.
    masks = np.array([[1, 1, 0, 0], [1, 0, 1, 0], [0, 1, 1, 0], [0, 0, 1, 1]], dtype=bool)
    scores = np.array([[3.0, 1.0, 0.0, 0.0]])
    losses = np.array([[1.0], [3.0], [2.0], [4.0]])
    # predictions -4, -3, -1, 0 rank 1, 2, 3, 4; losses rank 1, 3, 2, 4; sum d^2 = 2
    assert predictions(masks, scores)[:, 0].tolist() == [-4.0, -3.0, -1.0, 0.0]
    assert lds_per_query(losses, masks, scores)[0] == pytest.approx(1 - 6 * 2 / (4 * (16 - 1)))


def test_spearman_matches_scipy_with_ties_and_constant_columns_give_zero(rng):
    a = rng.integers(0, 4, size=(15, 6)).astype(float)
    b = a + rng.normal(size=(15, 6))
    got = spearman_columns(a, b)
    want = [stats.spearmanr(a[:, i], b[:, i]).statistic for i in range(6)]
    np.testing.assert_allclose(got, want, atol=1e-12)
    const = np.ones((15, 1))
    assert spearman_columns(const, b[:, :1])[0] == 0.0


def test_bootstrap_intervals_contain_the_estimate(rng):
    masks = sample_subsets(40, 16, 0.5, seed=0)
    scores = rng.normal(size=(10, 40))
    losses = predictions(masks, scores) + rng.normal(scale=2.0, size=(16, 10))
    res = lds_with_intervals(losses, masks, scores, bootstrap=200, seed=0)
    assert res.ci_queries[0] <= res.lds <= res.ci_queries[1]
    assert res.ci_subsets[0] <= res.ci_subsets[1]
    assert 0 < res.lds <= 1


def test_subsets_are_deterministic_half_sized_and_prefix_stable():
    a = sample_subsets(50, 8, 0.5, seed=3)
    assert np.array_equal(a, sample_subsets(50, 8, 0.5, seed=3))
    assert not np.array_equal(a, sample_subsets(50, 8, 0.5, seed=4))
    assert (a.sum(1) == 25).all()
    assert np.array_equal(sample_subsets(50, 12, 0.5, seed=3)[:8], a)  # more subsets keep the first ones
    assert len({row.tobytes() for row in a}) == 8


def test_configs_validate_and_overrides_are_typed():
    for name in CONFIGS:
        get_config(name)
    cfg = apply_overrides(CONFIGS["toy"], ["steps=3", "nda_sweep_t=10,20", "nda_topk=none", "shared_seed=false"])
    assert cfg.steps == 3 and cfg.nda_sweep_t == (10, 20) and cfg.nda_topk is None and cfg.shared_seed is False
    assert cfg.fingerprint() != CONFIGS["toy"].fingerprint()
    with pytest.raises(ValueError):
        apply_overrides(CONFIGS["toy"], ["no_such_key=1"])
    gpu = get_config("gpu-cifar")
    assert (gpu.size, gpu.n_train, gpu.n_subsets) == (32, 5000, 64)
    assert loss_timesteps(4).tolist() == [125, 375, 625, 875]


@pytest.mark.skipif(importlib.util.find_spec("skimage") is None, reason="the photo crops ship with scikit-image")
def test_toy_pipeline_runs_end_to_end_and_resumes(tmp_path, monkeypatch):
    import torch

    from tools.lds import run as run_mod

    # one torch thread (tiny tensors; on a busy 2-core runner two threads are several times slower),
    # restored afterwards for the other tests
    threads, set_threads = torch.get_num_threads(), torch.set_num_threads
    set_threads(1)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    try:
        _toy_pipeline(tmp_path, monkeypatch, run_mod)
    finally:
        set_threads(threads)


def _toy_pipeline(tmp_path, monkeypatch, run_mod):
    from tools.lds import train as train_mod

    config = get_config("toy")
    report = run_mod.LdsRun(config, tmp_path, device="cpu", threads=1, echo=lambda s: None).run()
    folder = Path(report["folder"])
    assert folder == tmp_path / "toy"
    methods = report["methods"]
    families = {row["family"] for row in methods.values()}
    assert {"random", "pixel", "trak", "nda", "nda_mean", "index"} <= families
    for key, row in methods.items():
        for group in ("all", "generated", "heldout"):
            v = row[group]["lds"]
            assert np.isfinite(v) and -1 <= v <= 1, (key, group, v)
            assert len(row[group]["per_query"]) == (6 if group == "all" else 3)
    assert len(list((folder / "models").glob("subset_*.pt"))) == config.n_subsets
    assert (folder / "lds_sweep.png").stat().st_size > 0
    saved = json.loads((folder / "lds.json").read_text())
    assert saved["config"]["name"] == "toy" and saved["fingerprint"] == config.fingerprint()

    # a second run trains nothing and reproduces the numbers from the cache
    def no_training(*args, **kwargs):
        raise AssertionError("a cached model was retrained")

    monkeypatch.setattr(train_mod, "train_model", no_training)
    monkeypatch.setattr(run_mod, "train_model", no_training)
    again = run_mod.LdsRun(config, tmp_path, device="cpu", threads=1, echo=lambda s: None).run()
    assert again["methods"]["nda_100_3"]["all"]["lds"] == methods["nda_100_3"]["all"]["lds"]

    # a folder holding results of other settings is refused, not silently mixed
    meta = folder / "config.json"
    stored = json.loads(meta.read_text())
    meta.write_text(json.dumps({**stored, "fingerprint": "000000000000"}))
    with pytest.raises(ValueError, match="different settings"):
        run_mod.LdsRun(config, tmp_path, device="cpu", threads=1, echo=lambda s: None)


def test_benchmarks_section_replaces_only_its_markers(tmp_path):
    from tools.lds.report import BEGIN, END, write_benchmarks_section

    report = {
        "config": {**CONFIGS["toy"].to_dict()}, "fingerprint": "abc", "folder": "results/lds/toy", "device": "cpu",
        "queries": {"count": 2, "generated": 1, "heldout": 1}, "timings_s": {"x": 60.0},
        "methods": {"random": {"label": "Random", "family": "random", "table": True, "score_seconds": 0.0,
                               "all": {"lds": 0.1, "ci_queries": [0.0, 0.2], "ci_subsets": [0.0, 0.2]}}},
    }
    path = tmp_path / "BENCHMARKS.md"
    path.write_text(f"# Benchmarks\n\nother section\n\n{BEGIN}\nSTALE-LDS-TEXT\n{END}\n\ntrailing section\n")
    write_benchmarks_section(path, report, command="python -m tools.lds.run --config toy")
    text = path.read_text()
    assert "other section" in text and "trailing section" in text and "STALE-LDS-TEXT" not in text
    assert text.count(BEGIN) == 1 and "| Random | 10.0 [0.0, 20.0]" in text
