"""Fixtures shared by the fault and concurrency tests: one thread per process, and a fork server
with nda-ann already imported so that a child process costs a fork, not an interpreter start."""
from __future__ import annotations

import multiprocessing
import multiprocessing.forkserver as forkserver_mod
import os
import time

import faiss
import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny inputs on a shared 2-core machine: one thread each is many times faster than spinning pools."""
    before = torch.get_num_threads(), faiss.omp_get_max_threads()
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    yield
    torch.set_num_threads(before[0])
    faiss.omp_set_num_threads(before[1])


@pytest.fixture(scope="module")
def forkserver():
    """A fork server with nda-ann imported, one thread per child (see ``one_thread``)."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["nda_ann.corpus.ingest", "nda_ann.index", "nda_ann.api"])
    saved = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        forkserver_mod.ensure_running()  # the server keeps the environment it started with
    finally:
        if saved is None:
            del os.environ["OMP_NUM_THREADS"]
        else:
            os.environ["OMP_NUM_THREADS"] = saved
    warm = ctx.Process(target=time.sleep, args=(0,))  # waits for the server's imports, so that timings
    warm.start()                                      # measured later are the commands' own
    warm.join()
    return ctx
