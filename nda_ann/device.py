"""One code path for CPU and GPU: resolve a device request and say which was used."""
from __future__ import annotations

import logging

import torch

log = logging.getLogger("nda_ann.device")


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """'auto' -> CUDA when available, else CPU; 'cuda' without CUDA is an error, not a silent fallback."""
    if isinstance(device, torch.device):
        return device
    name = str(device).lower()
    if name == "auto":
        chosen = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        chosen = torch.device(name)
        if chosen.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but torch sees no CUDA GPU; use --device cpu or auto")
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
