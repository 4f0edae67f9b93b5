"""Shared fixtures and markers: slow tests run only with NDA_ANN_SLOW=1 (never in CI); GPU tests need CUDA."""
from __future__ import annotations

import os
import tempfile

import numpy as np
import pytest
import torch

# the conv layouts chosen at run time are kept on disk (scoring/conv_layout.py): a fresh folder per session,
# so that the tests neither read nor write the user's cache (set before any worker process starts)
os.environ.setdefault("NDA_ANN_CACHE_DIR", tempfile.mkdtemp(prefix="nda-ann-test-cache-"))


def pytest_collection_modifyitems(config, items):
    run_slow = os.environ.get("NDA_ANN_SLOW") == "1" and os.environ.get("CI", "").lower() != "true"
    has_cuda = torch.cuda.is_available()
    for item in items:
        if "slow" in item.keywords and not run_slow:
            item.add_marker(pytest.mark.skip(reason="slow: set NDA_ANN_SLOW=1 (outside CI) to run"))
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture(scope="session")
def ray_cluster() -> str:
    """One small local Ray cluster for the whole session (2 CPUs); its address. Skips without Ray."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, object_store_memory=128 << 20, include_dashboard=False, log_to_driver=False,
             logging_level="warning")
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()
