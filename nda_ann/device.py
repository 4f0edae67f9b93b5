"""One code path for CPU and GPU: resolve a device request and say which was used."""
from __future__ import annotations

import logging
import re
import sys

import torch

log = logging.getLogger("nda_ann.device")

DEVICE_HELP = "auto, cpu, cuda or cuda:<i>"


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """'auto' -> CUDA when available, else CPU; 'cpu', 'cuda' or 'cuda:<i>' as asked.

    Anything else, and CUDA (or a GPU number) that torch does not see, is a ValueError naming the
    request: never a silent fallback, never torch's own RuntimeError.
    """
    if isinstance(device, torch.device):
        return device
    name = str(device).strip().lower()
    if name == "auto":
        chosen = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        if not re.fullmatch(r"cpu|cuda(:\d+)?", name):
            raise ValueError(f"unknown device {device!r}: use {DEVICE_HELP}")
        chosen = torch.device(name)
        if chosen.type == "cuda":
            if not torch.cuda.is_available():
                raise ValueError(f"device {device!r} requested but torch sees no CUDA GPU; use --device cpu or auto")
            if chosen.index is not None and chosen.index >= torch.cuda.device_count():
                raise ValueError(f"device {device!r}: torch sees {torch.cuda.device_count()} CUDA GPU(s), "
                                 f"numbered from 0; use cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
    log.info("torch device: %s", describe_device(chosen))
    return chosen


def describe_device(device: torch.device) -> str:
    """A human-readable name, e.g. 'cuda:0 (NVIDIA H200)' or 'cpu (2 threads)'."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    return f"cpu ({torch.get_num_threads()} threads)"


def resolve_dtype(precision: str) -> torch.dtype:
    """'float64' (exact reference) or 'float32' (fast)."""
    table = {"float64": torch.float64, "float32": torch.float32}
    if precision not in table:
        raise ValueError(f"precision must be 'float64' or 'float32', got {precision!r}")
    return table[precision]


def faiss_simd() -> str:
    """The SIMD code path FAISS runs, e.g. 'AVX2' or 'AVX512' ('generic' for the portable build).

    FAISS >= 1.12 with dynamic dispatch reports its level (``SIMDConfig``); older wheels load one
    of several compiled modules (``swigfaiss_avx512``, ``swigfaiss_avx2``, ...) chosen by the
    loader; failing both, the compile options name what the library was built with.
    """
    import faiss

    config = getattr(faiss, "SIMDConfig", None)
    if config is not None and hasattr(config, "get_level_name"):
        try:
            return str(config.get_level_name())
        except Exception:  # an older binding of the same name: fall through
            pass
    for module in sys.modules:
        found = re.fullmatch(r"faiss\.swigfaiss_(\w+)", module)
        if found:
            return found.group(1).upper().replace("_", "-")
    options = faiss.get_compile_options().split() if hasattr(faiss, "get_compile_options") else []
    levels = [o for o in options if o.startswith(("AVX", "SVE", "NEON"))]
    return levels[-1] if levels else "generic"


def device_line(device: torch.device | None = None, precision: str | None = None, faiss_gpus: int = 0) -> str:
    """The one line every computing command prints: torch device, precision, FAISS and its SIMD path.

    E.g. 'device: cpu (2 threads, float32), faiss 1.15.1 AVX512' or
    'device: cuda:0 (NVIDIA H200, float32), faiss 1.15.1 AVX2 + 1 GPU'.
    """
    import faiss

    dev = describe_device(device if device is not None else torch.device("cpu"))
    if precision:
        dev = dev[:-1] + f", {precision})" if dev.endswith(")") else f"{dev} ({precision})"
    gpus = f" + {faiss_gpus} GPU{'s' if faiss_gpus > 1 else ''}" if faiss_gpus else ""
    return f"device: {dev}, faiss {faiss.__version__} {faiss_simd()}{gpus}"
