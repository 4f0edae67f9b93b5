"""Phase timing and a-priori estimates, logged before and after each long step (autofaiss style)."""
from __future__ import annotations

import logging
import threading
import time
from contextlib import contextmanager
from typing import Iterator

from tqdm.auto import tqdm

log = logging.getLogger("nda_ann.index")
_depth = 0

# Rough single-process throughputs on a 2-core CPU, from tools/bench_build.py; only for the estimates.
RATES = {
    "extract": 1e6,             # patch vectors extracted per second (147 dims)
    "flat": 2e7,                # vectors added per second, Flat
    "ivf-flat": 0.1e6,          # coarse assignment dominates
    "ivf-sq8": 0.1e6,
    "ivf-sq8-pixel": 0.1e6,
    "ivf-pq": 0.1e6,            # PCA + assignment + PQ encoding
    "ivf-pq-fastscan": 0.1e6,
    "explicit": 0.1e6,
    "kmeans_flops": 4e10,       # float ops per second of k-means training
}


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def human_seconds(s: float) -> str:
    if s < 90:
        return f"{s:.1f} s"
    if s < 5400:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


@contextmanager
def phase(name: str, est_seconds: float | None = None, est_bytes: float | None = None) -> Iterator[None]:
    """Log ``name`` with its estimates, run the block, log the time it took; nested phases indent."""
    global _depth
    pad = "  " * _depth
    parts = []
    if est_seconds is not None:
        parts.append(f"est. {human_seconds(est_seconds)}")
    if est_bytes is not None:
        parts.append(f"est. peak {human_bytes(est_bytes)}")
    log.info("%s%s%s", pad, name, f" ({', '.join(parts)})" if parts else "")
    t0 = time.perf_counter()
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        log.info("%s%s done in %s", pad, name, human_seconds(time.perf_counter() - t0))


TICK_SECONDS = 0.5


@contextmanager
def ticking(desc: str, est_seconds: float, progress: bool = True) -> Iterator[tqdm]:
    """A progress bar over the estimated seconds of a step that reports nothing itself (FAISS
    k-means training), advanced from a thread every TICK_SECONDS while the block runs (FAISS
    releases the GIL); it stops at 99% until the block ends. Yields the bar (for a postfix)."""
    total = max(float(est_seconds), 1.0)
    bar = tqdm(total=round(total, 1), desc=desc, unit="s", disable=not progress, leave=False,
               bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed} of est. {total_fmt} s{postfix}")
    done = threading.Event()
    t0 = time.perf_counter()

    def tick() -> None:
        while not done.wait(TICK_SECONDS):
            bar.n = round(min(time.perf_counter() - t0, 0.99 * total), 1)
            bar.refresh()

    ticker = threading.Thread(target=tick, daemon=True, name="nda-ann-ticker")
    ticker.start()
    try:
        yield bar
    finally:
        done.set()
        ticker.join()
        bar.n = bar.total
        bar.close()
