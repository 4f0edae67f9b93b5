"""The shifted-mass kernel (scoring/masses.py) against the independent naive reference and against
the log-domain kernel it replaced (scoring/dense.py), including the shift-raising and topk rules."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from naive import naive_scale_scores
from nda_ann.scoring.dense import log_masses
from nda_ann.scoring.exact import exact_scores
from nda_ann.scoring import masses, operands
from nda_ann.scoring.masses import TOPK_TAU, MassScan, _topk_sums, max_logits
from nda_ann.scoring.operands import kernel_path
from nda_ann.scoring.patches import extract_patches, layout_groups
from nda_ann.scoring.scales import Scale
from test_exact import smooth_images


def naive(corpus, queries, t, scales, weights, topk):
    out = np.zeros((len(queries), len(corpus)))
    for qi, q in enumerate(queries):
        for (p, f), w in zip(scales, weights):
            out[qi] += w * naive_scale_scores(corpus, q, t, p, f, topk)[0]
    return out


@pytest.mark.parametrize("precision,path", [("float32", "conv/direct"), ("float32", "conv/unfold"), ("float32", "screened"),
                                            ("float32", "dense"), ("float64", "")])
@pytest.mark.parametrize("scales,topk", [([(3, 1)], None), ([(3, 1)], 2), ([(4, 2)], None), ([(4, 2)], 3),
                                         ([(4, 1), (2, 2)], None), ([(5, 1), (4, 2)], 4)])
def test_every_path_agrees_with_the_float64_reference_within_1e_4_of_the_largest_score(rng, monkeypatch, precision, path, scales, topk):
    kernel, _, layout = path.partition("/")  # the conv path in both interior layouts (conv_layout.py)
    monkeypatch.setenv("NDA_ANN_KERNEL", kernel)  # every float32 path on every scale; float64 is always dense
    monkeypatch.setenv("NDA_ANN_CONV_LAYOUT", layout or "auto")
    corpus = smooth_images(rng, 5, size=7)
    queries = np.concatenate([smooth_images(rng, 1, size=7), corpus[1:2] * 0.95])
    weights = [1.0] if len(scales) == 1 else [0.5, 0.5]
    got = exact_scores(torch.tensor(corpus), torch.tensor(queries), timesteps=[50, 300], scales=scales, topk=topk, precision=precision)
    tol = 1e-4 if precision == "float32" else 1e-6  # the noise is drawn in float32 (docs/scores.md 1) in both
    for ti, t in enumerate([50, 300]):
        want = naive(corpus, queries, t, scales, weights, topk)
        assert np.abs(got[ti] - want).max() <= tol * np.abs(want).max()


def _setup(rng, n=12, size=10, scale=Scale(5), sigma2=0.1, dtype=torch.float64):
    images = torch.from_numpy(smooth_images(rng, n, c=3, size=size)).to(dtype) * 0.95
    query = images[3:4] * 0.97 + 0.05
    groups = layout_groups(size, scale)
    noise = torch.from_numpy(rng.normal(size=tuple(query.shape))).to(dtype)
    qp = extract_patches(query + math.sqrt(sigma2) * noise, scale)
    return qp, images, groups, 1.0 / (2 * sigma2)


@pytest.mark.parametrize("path,dtype", [("dense", torch.float64), ("dense", torch.float32), ("screened", torch.float32),
                                        ("conv", torch.float32)])
@pytest.mark.parametrize("scale", [Scale(5), Scale(4, 2)])
def test_masses_equal_the_log_domain_kernel_whatever_the_shift(rng, path, dtype, scale):
    """exp(log_masses - shift) whether the shift is the true maximum or far below it (rows raised), on
    every kernel path: dense, through the bfloat16 screen (rows it leaves at 0 hold terms below e^-46) and
    the interior class as a convolution."""
    qp, images, groups, inv = _setup(rng, scale=scale, dtype=dtype)
    cp = extract_patches(images, scale)
    full_ref, agg_ref = log_masses(qp.double(), cp.double(), groups, inv, 4)
    best = max_logits(qp, images, scale, groups, inv)
    for start in (best, best - 200.0):
        scan = MassScan(qp, groups, inv, start.clone(), 4, scale, path)
        fulls, aggs = [], []
        for lo in range(0, images.shape[0], 5):  # three chunks, so that a later chunk can raise the shift
            full, agg, rescale = scan.add(images[lo : lo + 5])
            if rescale is not None:
                fulls = [f * rescale[..., None] for f in fulls]
                aggs = [a * rescale[..., None] for a in aggs]
            fulls.append(full)
            aggs.append(agg)
        shift = scan.shift[..., None].double()
        full, agg = torch.cat(fulls, -1).double(), torch.cat(aggs, -1).double()
        z = full.sum(-1, keepdim=True)  # each position's normaliser, in the shifted units
        tol = 1e-12 if dtype == torch.float64 else 1e-4  # float32 logits carry ~3e-5 absolute rounding
        assert torch.all((full - torch.exp(full_ref - shift)).abs() <= tol * z)
        # topk sums: exact to a tiny share of the normaliser: a row left at its full sum holds at most topk terms
        # above TOPK_TAU, so it is off by at most V * TOPK_TAU (V = 36 positions here)
        assert torch.all((agg - torch.exp(agg_ref - shift)).abs() <= max(tol, 36 * TOPK_TAU) * z)
        assert torch.all(scan.shift >= best - 60.0)  # raised where it started far below the maximum


def test_topk_sums_select_exactly_where_more_than_topk_terms_matter(rng):
    w = torch.from_numpy(rng.uniform(size=(6, 5, 40)))
    w[0, 0] = 1.0  # 40 equal terms: more than topk matter
    w[1, 1] = 0.0
    w[1, 1, :3] = 0.5  # only 3 matter: the full sum is the topk sum
    w[2] *= TOPK_TAU / 100  # below the rule's threshold: the full sum stands
    full = w.sum(-1)
    got = _topk_sums(w.clone(), full, 8)
    want = w.topk(8, dim=-1).values.sum(-1)
    assert torch.allclose(got, want, rtol=0, atol=40 * TOPK_TAU)
    assert got[0, 0] == 8.0 and got[1, 1] == 1.5


def test_the_kernel_path_follows_the_device_dtype_and_override(monkeypatch):
    monkeypatch.delenv("NDA_ANN_KERNEL", raising=False)
    cpu = torch.device("cpu")
    assert kernel_path(cpu, torch.float64) == "dense"
    assert kernel_path(cpu, torch.float32) == "conv"
    monkeypatch.setenv("NDA_ANN_KERNEL", "dense")
    assert kernel_path(cpu, torch.float32) == "dense"
    monkeypatch.setenv("NDA_ANN_KERNEL", "screened")
    assert kernel_path(cpu, torch.float32) == ("screened" if operands._CPU_BF16 else "dense")
    monkeypatch.setenv("NDA_ANN_KERNEL", "conv")
    assert kernel_path(cpu, torch.float64) == "dense"
    with pytest.raises(ValueError, match="kernel path"):
        MassScan(torch.zeros(1, 4, 3), layout_groups(2, Scale(1)), 1.0, torch.zeros(1, 4), None, Scale(1), "fused")


@pytest.mark.parametrize("layout", ["direct", "unfold"])
def test_the_conv_path_raises_rows_as_the_dense_path_does(rng, monkeypatch, layout):
    """In either interior layout, a chunk whose maximum lies far above the shift makes MassScan raise those rows (by a convolution of
    their filters on the conv path, which never cuts the candidates' interior patches unless asked): the
    raised shifts and the masses equal the dense path's."""
    monkeypatch.setenv("NDA_ANN_CONV_LAYOUT", layout)
    qp, images, groups, inv = _setup(rng, dtype=torch.float32)
    start = max_logits(qp, images, Scale(5), groups, inv) - 200.0
    got = MassScan(qp, groups, inv, start.clone(), 4, Scale(5), "conv")
    want = MassScan(qp, groups, inv, start.clone(), 4, Scale(5), "dense")
    cand = operands.CandidateOperand.build(images, Scale(5), groups, inv, 1, conv=True)
    assert cand.interior is None and cand.conv is not None
    assert cand.interior_rows() is not None and cand.interior is not None
    (f1, a1, r1), (f2, a2, r2) = got.add(images), want.add(images)
    assert r1 is not None and r2 is not None  # rows were raised on both
    assert torch.allclose(got.shift, want.shift, atol=1e-3)
    z = f2.sum(-1, keepdim=True).double()
    assert torch.all((f1 - f2).abs() <= 1e-4 * z) and torch.all((a1 - a2).abs() <= 1e-4 * z)


@pytest.mark.parametrize("layout", ["direct", "unfold"])
@pytest.mark.parametrize("topk", [None, 4])
def test_the_conv_path_gives_the_same_masses_in_groups_of_any_size(rng, monkeypatch, topk, layout):
    """In either interior layout, the conv path convolves a few images at a time (CONV_CACHE_BYTES); one image per group and all in
    one group give the dense path's masses."""
    monkeypatch.setenv("NDA_ANN_CONV_LAYOUT", layout)
    qp, images, groups, inv = _setup(rng, dtype=torch.float32)
    start = max_logits(qp, images, Scale(5), groups, inv)
    want = MassScan(qp, groups, inv, start.clone(), topk, Scale(5), "dense").add(images)
    z = want[0].sum(-1, keepdim=True)
    for cache in (1, 1 << 30):
        monkeypatch.setattr(masses, "CONV_CACHE_BYTES", cache)
        got = MassScan(qp, groups, inv, start.clone(), topk, Scale(5), "conv").add(images)
        assert torch.all((got[0] - want[0]).abs() <= 1e-4 * z) and torch.all((got[1] - want[1]).abs() <= 1e-4 * z)
