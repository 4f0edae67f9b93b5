"""Page-cache warming: read an index's and its stores' files once, as a long-running server wants
them in memory before its first query (a memory-mapped index is otherwise read on first touch)."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Iterable


def warm_files(roots: Iterable[Path], chunk: int = 64 << 20) -> tuple[int, float]:
    """Read every file under ``roots`` (folders or files) once; returns (bytes read, seconds)."""
    t0, total = time.perf_counter(), 0
    buf = bytearray(chunk)
    for root in roots:
        root = Path(root)
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for f in files:
            try:
                with open(f, "rb", buffering=0) as fh:
                    while n := fh.readinto(buf):
                        total += n
            except OSError:
                continue  # a file that vanished or cannot be read is no reason to refuse serving
    return total, time.perf_counter() - t0
