"""GPU paths: the same code on CUDA agrees with the CPU within float tolerance (skipped without CUDA)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from nda_ann.attribution.attributor import Attributor
from nda_ann.scoring.exact import exact_scores
from nda_ann.index.torch_search import TorchFlatSearch

pytestmark = pytest.mark.gpu


def _images(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand((n, 3, 16, 16), generator=g) * 2 - 1


def test_exact_scores_on_cuda_match_cpu():
    corpus, q = _images(20), _images(2, 1)
    cpu = exact_scores(corpus, q, timesteps=[100, 300], scales=[(6, 1), (4, 2)], topk=5, device="cpu")
    gpu = exact_scores(corpus, q, timesteps=[100, 300], scales=[(6, 1), (4, 2)], topk=5, device="cuda")
    np.testing.assert_allclose(gpu, cpu, rtol=1e-6, atol=1e-9 * cpu.max())


def test_torch_search_and_rescoring_on_cuda_match_cpu():
    corpus, q = _images(30), _images(2, 2)
    res = {}
    for dev in ("cpu", "cuda"):
        att = Attributor(TorchFlatSearch(corpus, [5], device=dev), corpus, [5], device=dev)
        res[dev] = att.attribute(q, 100, k=64, candidates=10, precision="float64").scores
    np.testing.assert_allclose(res["cuda"], res["cpu"], rtol=1e-5, atol=1e-8 * res["cpu"].max())


def test_float32_exact_on_cuda_agrees_with_the_float64_cpu_reference_within_1e_4():
    """The float32 kernel on the GPU (the bfloat16 screen on GPUs of compute capability 8 and above) against
    the float64 reference, from a store streamed as uint8."""
    from nda_ann.corpus.store import write_store

    import tempfile
    from pathlib import Path

    g = torch.Generator().manual_seed(3)
    u8 = (torch.rand((40, 16, 16, 3), generator=g) * 255).to(torch.uint8).numpy()
    with tempfile.TemporaryDirectory() as tmp:
        store = write_store(Path(tmp) / "s", u8)
        q = _images(2, 4)
        ref = exact_scores(store, q, timesteps=[100], scales=[7], topk=10, device="cpu", precision="float64")
        gpu = exact_scores(store, q, timesteps=[100], scales=[7], topk=10, device="cuda", precision="float32")
    assert np.abs(gpu - ref).max() <= 1e-4 * ref.max()
