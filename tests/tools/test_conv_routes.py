"""tools/bench_conv_routes.py's route 3 operands against a naive float64 convolution: the integer
pixels twice (or k times) with the bfloat16 parts of the scaled filters give the product's logits."""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
from bench_conv_routes import route3_operands, widen  # noqa: E402


def test_widen_puts_each_columns_neighbours_in_the_channels():
    x = torch.arange(2 * 3 * 5 * 6, dtype=torch.float32).reshape(2, 3, 5, 6)
    out = widen(x, 3)
    assert out.shape == (2, 9, 5, 4)
    for c in range(3):
        for j in range(3):
            assert torch.equal(out[:, c * 3 + j], x[:, c, :, j : j + 4])


def test_route3_operands_reproduce_the_convolution_of_the_scaled_images():
    gen = torch.Generator().manual_seed(0)
    s = 0.93
    pixels = torch.randint(0, 256, (3, 3, 16, 16), generator=gen).float()
    images = (pixels / 127.5 - 1.0) * s  # what the product convolves
    weight = torch.randn(5, 3, 7, 7, generator=gen) * 40.0
    bias = torch.randn(5, generator=gen) * 100.0
    naive = F.conv2d(images.double(), weight.double(), bias.double())
    for parts, tol in ((2, 1e-4), (3, 1e-6)):
        wide, w3, b3 = route3_operands(images, s, weight, bias, parts)
        assert wide.shape == (3, 3 * 7 * parts, 16, 10) and w3.shape == (5, 3 * 7 * parts, 7, 1)
        assert torch.equal(wide[:, :21], widen(pixels, 7))  # the pixels recovered exactly
        for part in w3.split(21, 1):  # every part is exact in bfloat16
            assert torch.equal(part, part.bfloat16().float())
        got = F.conv2d(wide.double(), w3.double(), b3.double())
        err = float((got - naive).abs().max() / naive.abs().max())
        assert err < tol, (parts, err)
    # two parts are not the whole filter: the split's rest is what a third part carries
    wide, w2, _ = route3_operands(images, s, weight, bias, 2)
    whole = weight * (s / 127.5)
    assert not torch.equal(sum(w2.split(21, 1)).double(), whole.permute(0, 1, 3, 2).reshape(5, 21, 7, 1).double())
