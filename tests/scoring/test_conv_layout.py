"""The conv path's two interior layouts (scoring/conv_layout.py) against a naive float64 correlation
written out as loops, and the run-time choice between them."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from nda_ann.scoring import conv_layout
from nda_ann.scoring.conv_layout import direct_product, interior_product, layout_for, layouts_chosen, unfold_product


def naive_dilated_correlation(pooled: np.ndarray, weight: np.ndarray, bias: np.ndarray, factor: int) -> np.ndarray:
    """pooled (n, C, H, W), weight (r, C, m, m), bias (r,) -> (n, r, G, G): out[i, k, y, x] = bias[k] +
    sum over c, a, b of weight[k, c, a, b] * pooled[i, c, y + f a, x + f b], one position at a time."""
    n, ch, h, w = pooled.shape
    r, _, m, _ = weight.shape
    g_h, g_w = h - (m - 1) * factor, w - (m - 1) * factor
    out = np.empty((n, r, g_h, g_w))
    for i in range(n):
        for y in range(g_h):
            for x in range(g_w):
                window = pooled[i, :, y : y + (m - 1) * factor + 1 : factor, x : x + (m - 1) * factor + 1 : factor]
                out[i, :, y, x] = bias + np.tensordot(weight, window, axes=([1, 2, 3], [0, 1, 2]))
    return out


@pytest.mark.parametrize("factor,m", [(1, 3), (2, 3), (1, 5), (3, 2)])
@pytest.mark.parametrize("product", [direct_product, unfold_product])
def test_each_layout_equals_the_naive_correlation(rng, product, factor, m):
    pooled = rng.uniform(0, 255, size=(3, 3, 11, 12))
    weight = rng.normal(size=(7, 3, m, m))
    bias = rng.normal(size=7) * 100
    want = naive_dilated_correlation(pooled, weight, bias, factor)
    cl = torch.tensor(pooled, dtype=torch.float32).contiguous(memory_format=torch.channels_last)
    got = product(cl, torch.tensor(weight, dtype=torch.float32), torch.tensor(bias, dtype=torch.float32), factor)
    assert got.shape == want.shape
    assert got.is_contiguous(memory_format=torch.channels_last)  # the passes after the product expect it
    assert np.abs(got.double().numpy() - want).max() <= 1e-5 * np.abs(want).max()


def test_auto_picks_a_layout_once_per_shape_and_reports_it(rng, monkeypatch, tmp_path):
    monkeypatch.delenv("NDA_ANN_CONV_LAYOUT", raising=False)
    monkeypatch.setenv("NDA_ANN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(conv_layout, "_CHOSEN", {})
    pooled = torch.rand((6, 3, 16, 16)).contiguous(memory_format=torch.channels_last)
    weight, bias = torch.randn((40, 3, 4, 4)), torch.randn(40)
    chosen = layout_for(pooled, weight, 1)
    assert chosen in conv_layout.LAYOUTS and layouts_chosen() == [chosen]
    calls = []
    monkeypatch.setattr(conv_layout, "calibrate", lambda *a: calls.append(a) or {"direct": 1.0, "unfold": 2.0})
    assert layout_for(pooled[:5], weight[:33], 1) == chosen and not calls  # same key: 33 rows share 40's octave
    assert layout_for(pooled, weight, 2) == "direct" and len(calls) == 1  # a new factor is measured anew
    got = interior_product(pooled, weight, bias, 1)
    assert torch.allclose(got, direct_product(pooled, weight, bias, 1), atol=1e-4)


def test_a_forced_layout_is_used_and_a_bad_one_named(monkeypatch):
    pooled = torch.rand((2, 3, 8, 8)).contiguous(memory_format=torch.channels_last)
    weight = torch.randn((5, 3, 3, 3))
    monkeypatch.setenv("NDA_ANN_CONV_LAYOUT", "unfold")
    assert layout_for(pooled, weight, 1) == "unfold" and layouts_chosen() == ["unfold"]
    monkeypatch.setenv("NDA_ANN_CONV_LAYOUT", "im2col")
    with pytest.raises(ValueError, match="NDA_ANN_CONV_LAYOUT='im2col'.*direct, unfold or auto"):
        layout_for(pooled, weight, 1)


@pytest.fixture
def kept_cache(monkeypatch, tmp_path):
    """Layouts chosen afresh (auto, nothing remembered) and kept in tmp_path; one product's operands:
    (pooled (3, 3, 12, 12) channels-last, weight (9, 3, 5, 5), the shape key layout_for uses for them)."""
    monkeypatch.delenv("NDA_ANN_CONV_LAYOUT", raising=False)
    monkeypatch.setenv("NDA_ANN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(conv_layout, "_CHOSEN", {})
    pooled = torch.rand((3, 3, 12, 12)).contiguous(memory_format=torch.channels_last)
    return pooled, torch.randn((9, 3, 5, 5)), (3, 3, 12, 12, (9).bit_length(), 5, 1, torch.float32)


def test_the_first_choice_kept_on_disk_is_every_process_s_choice(monkeypatch, kept_cache):
    """Another process's choice for the shape, kept on disk, is taken without timing; and of two processes
    that time the same shape at once, the second takes the first's choice (their scores then agree to the bit)."""
    pooled, weight, key = kept_cache
    path = conv_layout._choice_file(key)
    path.parent.mkdir(parents=True)
    path.write_text("unfold\n")
    monkeypatch.setattr(conv_layout, "calibrate", lambda *a: pytest.fail("timed although a choice was kept"))
    assert layout_for(pooled, weight, 1) == "unfold"
    other = conv_layout._choice_file(key[:-2] + (2, torch.float32))
    assert conv_layout._keep_choice(other, "direct") == "direct"
    assert conv_layout._keep_choice(other, "unfold") == "direct"  # the later process takes the first's
    assert other.read_text().split() == ["direct"] and sorted(p.name for p in other.parent.iterdir()) == sorted(
        [path.name, other.name])  # no temporary files left


def test_a_process_whose_thread_count_changes_takes_that_count_s_kept_choice(monkeypatch, kept_cache):
    """The choice is kept per thread count on disk, and so in memory: after one at 2 threads, a product at
    1 thread reads the 1-thread choice other processes kept (the concurrency test's processes run at 1)."""
    pooled, weight, key = kept_cache
    before = torch.get_num_threads()
    try:
        for threads, layout in ((2, "direct"), (1, "unfold")):
            torch.set_num_threads(threads)
            path = conv_layout._choice_file(key)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(layout + "\n")
        monkeypatch.setattr(conv_layout, "calibrate", lambda *a: pytest.fail("timed although a choice was kept"))
        torch.set_num_threads(2)
        assert layout_for(pooled, weight, 1) == "direct"
        torch.set_num_threads(1)
        assert layout_for(pooled, weight, 1) == "unfold"
    finally:
        torch.set_num_threads(before)


def test_an_unwritable_cache_still_chooses_and_says_so(monkeypatch, tmp_path, caplog):
    monkeypatch.delenv("NDA_ANN_CONV_LAYOUT", raising=False)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("NDA_ANN_CACHE_DIR", str(blocker))  # a file where the folder should be
    monkeypatch.setattr(conv_layout, "_CHOSEN", {})
    monkeypatch.setattr(conv_layout, "_WARNED", [])
    pooled = torch.rand((2, 3, 9, 9)).contiguous(memory_format=torch.channels_last)
    assert layout_for(pooled, torch.randn((4, 3, 3, 3)), 1) in conv_layout.LAYOUTS
    assert "NDA_ANN_CACHE_DIR" in caplog.text and str(blocker) in caplog.text


def test_forced_layout_holds_within_its_block_and_restores_the_setting(monkeypatch):
    pooled = torch.rand((2, 3, 8, 8)).contiguous(memory_format=torch.channels_last)
    weight = torch.randn((5, 3, 3, 3))
    monkeypatch.setenv("NDA_ANN_CONV_LAYOUT", "direct")
    with conv_layout.forced_layout("unfold"):
        assert layout_for(pooled, weight, 1) == "unfold"
    assert layout_for(pooled, weight, 1) == "direct"
    monkeypatch.delenv("NDA_ANN_CONV_LAYOUT")
    with pytest.raises(RuntimeError), conv_layout.forced_layout("unfold"):
        raise RuntimeError  # restored on the way out of an error too
    assert "NDA_ANN_CONV_LAYOUT" not in os.environ
