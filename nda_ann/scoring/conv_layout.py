"""How the conv path takes its interior product: oneDNN's direct convolution or one unfolded GEMM.

Both give the same (n, r, G, G) output, held in channels-last memory ((n, G, G, r) row-major), so every
pass after it is unchanged:

- ``direct``: ``F.conv2d`` of the channels-last candidates (n, C, H', W') by the query filters
  (r, C, m, m), dilated by f. It never cuts the candidates' patches.
- ``unfold``: the group's patches cut into rows (n G G, C m m), a copy of C m^2 floats per position,
  then one float32 GEMM by the filters (C m m, r), the bias added after it.

Which is faster depends on the CPU and its BLAS: measured side by side (tools/bench_conv_routes.py),
on an AMD EPYC (Zen 5) oneDNN's direct kernel wins, on an Intel Xeon with AMX the unfolded MKL
sgemm runs the product at about 140 GFLOP/s against about 105 for the direct kernel (1.4-1.65x on the
whole interior pass, the copy included). So ``auto`` (the default) times both on synthetic operands of
the shape (a few tens of ms) and keeps the faster. The two differ in float32 summation order (about
3e-5 of the largest sum), so that every process on a machine scores alike, the first choice for a shape
is kept on disk (``cache_dir()``: NDA_ANN_CACHE_DIR, else $XDG_CACHE_HOME/nda-ann, else ~/.cache/nda-ann;
one file per CPU model, torch version, thread count and shape, created atomically: the first process to
finish its timing wins, the others take its choice). CUDA always takes ``direct`` (cuDNN chooses its own
algorithm). NDA_ANN_CONV_LAYOUT=direct|unfold|auto forces one. ``layouts_chosen()`` says which ran.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

LAYOUTS = ("direct", "unfold")
_CHOSEN: dict[tuple, str] = {}  # (threads, shape key) -> layout, filled by ``layout_for``
_CALIBRATION_REPEATS = 3
_CALIBRATION_IMAGES = 4  # at most this many images and query rows in a calibration (a few ms a call)
_CALIBRATION_ROWS = 4096
_WARNED: list[bool] = []  # the unwritable-cache warning, given once per process


def direct_product(pooled: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, factor: int) -> torch.Tensor:
    """pooled (n, C, H', W') channels-last, weight (r, C, m, m), bias (r,) -> (n, r, G, G) channels-last."""
    return F.conv2d(pooled, weight, bias, dilation=factor)


def unfold_product(pooled: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, factor: int) -> torch.Tensor:
    """The same product as ``direct_product`` through one GEMM of the cut patches (n G G, C m m) by the
    filters (C m m, r): -> (n, r, G, G), a view of (n, G, G, r) row-major memory (channels-last)."""
    n, ch, h, w = pooled.shape
    r, _, m, _ = weight.shape
    span = (m - 1) * factor + 1
    g_h, g_w = h - span + 1, w - span + 1
    win = pooled.unfold(2, span, 1).unfold(3, span, 1)  # (n, C, G, G, span, span), a view
    if factor > 1:
        win = win[..., ::factor, ::factor]
    rows = win.permute(0, 2, 3, 1, 4, 5).reshape(n * g_h * g_w, ch * m * m)  # the copy: C, m, m order as the filters
    out = torch.mm(rows, weight.reshape(r, -1).t())  # (n G G, r); addmm's bias copy costs a pass more than add_
    return out.view(n, g_h, g_w, r).permute(0, 3, 1, 2).add_(bias[:, None, None])


_PRODUCTS = {"direct": direct_product, "unfold": unfold_product}


def _forced() -> str | None:
    forced = os.environ.get("NDA_ANN_CONV_LAYOUT", "auto").lower()
    if forced not in LAYOUTS + ("auto", ""):
        raise ValueError(f"NDA_ANN_CONV_LAYOUT={forced!r}: expected one of {', '.join(LAYOUTS)} or auto")
    return forced if forced in LAYOUTS else None


def _time(fn, *args) -> float:
    """Fastest of a few calls of fn(*args), seconds."""
    fn(*args)  # warm-up: first-call allocations and kernel selection
    best = float("inf")
    for _ in range(_CALIBRATION_REPEATS):
        t0 = time.perf_counter()
        fn(*args)
        best = min(best, time.perf_counter() - t0)
    return best


def calibrate(shape: tuple[int, int, int, int], filters: tuple[int, int, int], factor: int, dtype: torch.dtype
              ) -> dict[str, float]:
    """Seconds per call of each layout on random operands: pooled ``shape`` (n, C, H', W'), weight
    ``filters`` (r, C, m) in ``dtype`` on the CPU."""
    gen = torch.Generator().manual_seed(0)
    pooled = torch.rand(shape, generator=gen, dtype=dtype).contiguous(memory_format=torch.channels_last)
    r, ch, m = filters
    weight = torch.randn((r, ch, m, m), generator=gen, dtype=dtype)
    bias = torch.randn((r,), generator=gen, dtype=dtype)
    return {name: _time(fn, pooled, weight, bias, factor) for name, fn in _PRODUCTS.items()}


def layout_for(pooled: torch.Tensor, weight: torch.Tensor, factor: int) -> str:
    """'direct' or 'unfold' for this product: the forced layout, 'direct' on CUDA, else the one kept on
    disk for this shape, or else the faster as timed now on operands of this shape (at most
    _CALIBRATION_IMAGES images and _CALIBRATION_ROWS rows; the rows keyed by octave) and kept."""
    forced = _forced()
    if forced is not None:
        return forced
    if pooled.device.type != "cpu":
        return "direct"
    n, ch, h, w = pooled.shape
    r, _, m = weight.shape[:3]
    n_cal, r_cal = min(n, _CALIBRATION_IMAGES), min(r, _CALIBRATION_ROWS)
    key = (n_cal, ch, h, w, r.bit_length(), m, factor, pooled.dtype)  # rows by octave: raised rows vary in number
    memo = (torch.get_num_threads(), key)  # as the file's: a process whose thread count changes reads that count's choice
    if memo not in _CHOSEN:
        path = _choice_file(key)
        chosen = _read_choice(path)
        if chosen is None:
            secs = calibrate((n_cal, ch, h, w), (r_cal, ch, m), factor, pooled.dtype)
            chosen = _keep_choice(path, min(secs, key=secs.get))
            log.debug("conv layout for %s: %s (timed %s)", key, chosen, secs)
        _CHOSEN[memo] = chosen
    return _CHOSEN[memo]


def cache_dir() -> Path:
    """Where chosen layouts are kept: NDA_ANN_CACHE_DIR, else $XDG_CACHE_HOME/nda-ann, else ~/.cache/nda-ann."""
    if os.environ.get("NDA_ANN_CACHE_DIR"):
        return Path(os.environ["NDA_ANN_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "nda-ann"


@functools.lru_cache(maxsize=1)
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _choice_file(key: tuple) -> Path:
    """The file that keeps the layout chosen for ``key`` on this CPU model, torch build and thread count."""
    what = repr((_cpu_model(), torch.__version__, torch.get_num_threads(), key))
    return cache_dir() / "conv_layout" / (hashlib.sha256(what.encode()).hexdigest()[:24] + ".txt")


def _read_choice(path: Path) -> str | None:
    try:
        text = path.read_text().split()
    except OSError:
        return None
    return text[0] if text and text[0] in LAYOUTS else None


def _keep_choice(path: Path, chosen: str) -> str:
    """Keep ``chosen`` at ``path`` unless another process kept its choice first; the layout to use. An
    unwritable cache only costs the agreement between processes (logged once)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(chosen + "\n")
        try:
            os.link(tmp, path)  # atomic and exclusive: fails if another process kept one first
        except FileExistsError:
            chosen = _read_choice(path) or chosen
        finally:
            tmp.unlink(missing_ok=True)
    except OSError as err:
        if not _WARNED:
            _WARNED.append(True)
            log.warning("conv layout choices not kept in %s (%s): processes may pick different layouts, whose "
                        "scores differ by float32 rounding; set NDA_ANN_CACHE_DIR to a writable folder", path.parent, err)
    return chosen



def interior_product(pooled: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, factor: int) -> torch.Tensor:
    """pooled (n, C, H', W'), weight (r, C, m, m), bias (r,) -> (n, r, G, G) channels-last, by the layout
    ``layout_for`` picks."""
    return _PRODUCTS[layout_for(pooled, weight, factor)](pooled, weight, bias, factor)


@contextmanager
def forced_layout(layout: str | None) -> Iterator[None]:
    """Within the block, NDA_ANN_CONV_LAYOUT is ``layout`` ('direct', 'unfold' or 'auto'; None leaves it
    as it is); the previous value is restored after (for benchmarks that time one layout against another)."""
    before = os.environ.get("NDA_ANN_CONV_LAYOUT")
    if layout is not None:
        os.environ["NDA_ANN_CONV_LAYOUT"] = layout
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("NDA_ANN_CONV_LAYOUT", None)
        else:
            os.environ["NDA_ANN_CONV_LAYOUT"] = before


def layouts_chosen() -> list[str]:
    """The layouts ``auto`` has chosen in this process so far, sorted and without repeats (for summaries);
    the forced one if NDA_ANN_CONV_LAYOUT is set."""
    forced = _forced()
    return [forced] if forced is not None else sorted(set(_CHOSEN.values()))
