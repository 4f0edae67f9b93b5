"""Shared by the benchmarks: replace one marked section of BENCHMARKS.md, leaving the others."""
from __future__ import annotations

import os
import platform
import re
from pathlib import Path

import torch

BENCHMARKS = Path(__file__).resolve().parent.parent / "BENCHMARKS.md"
HEADER = "# nda-ann benchmarks\n\nEach section is written by the script named in it; rerun that script to refresh it.\n"


def machine() -> str:
    """One line naming this machine: CPU model, cores, torch threads."""
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), Python {platform.python_version()}"


def update_section(name: str, body: str, path: Path = BENCHMARKS) -> None:
    """Put ``body`` between ``<!-- name -->`` and ``<!-- /name -->`` (appended if absent); atomic write."""
    text = path.read_text() if path.exists() else HEADER
    block = f"<!-- {name} -->\n{body.rstrip()}\n<!-- /{name} -->"
    pattern = re.compile(rf"<!-- {re.escape(name)} -->.*?<!-- /{re.escape(name)} -->", re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
