"""One CPU/GPU path: train and add on the GPUs when FAISS sees any, else on the CPU."""
from __future__ import annotations

import logging
from typing import Literal

import faiss

from ..errors import InputError

log = logging.getLogger("nda_ann.index")
GpuChoice = Literal["auto", "on", "off"]


def resolve_gpu(choice: str) -> bool:
    """'auto' -> use GPUs iff faiss.get_num_gpus() > 0; 'on' requires them; 'off' never."""
    if choice not in ("auto", "on", "off"):
        raise InputError(None, f"gpu must be auto, on or off, got {choice!r}")
    count = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if choice == "on" and count == 0:
        raise InputError(None, "--gpu on, but FAISS sees no GPU (install faiss-gpu and check CUDA), or use --gpu auto")
    return choice != "off" and count > 0


def device_name(use_gpu: bool) -> str:
    return f"gpu x{faiss.get_num_gpus()}" if use_gpu else "cpu"


def gpu_clustering(index: faiss.Index) -> None:
    """Make an IVF index train its k-means on the GPUs (any IVF variant, any pre-transform)."""
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.clustering_index = faiss.index_cpu_to_all_gpus(faiss.IndexFlatL2(ivf.d))


def to_gpu(index: faiss.Index) -> tuple[faiss.Index, bool]:
    """(a GPU copy of ``index``, True), or (the index itself, False) where FAISS has no GPU version.

    Only IVF indexes with a flat coarse quantizer move: a GPU copy would come back with its HNSW
    quantizer replaced by a flat one.
    """
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None or not isinstance(faiss.downcast_index(ivf.quantizer), faiss.IndexFlat):
        return index, False
    try:
        return faiss.index_cpu_to_all_gpus(index), True
    except (RuntimeError, AttributeError) as err:  # e.g. fast-scan PQ has no GPU implementation
        log.debug("index stays on the CPU: %s", str(err).strip().splitlines()[-1])
        return index, False
