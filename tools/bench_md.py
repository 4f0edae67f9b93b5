"""Shared by the benchmarks: replace one marked section of BENCHMARKS.md, leaving the others."""
from __future__ import annotations

import os
import platform
import re
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "BENCHMARKS.md"
TOPICS = ROOT / "docs" / "benchmarks"
HEADER = "# nda-ann benchmarks\n\nEach section is written by the script named in it; rerun that script to refresh it.\n"
# which topic file of docs/benchmarks/ holds a section, by the start of its name (BENCHMARKS.md itself: the headline)
SECTION_TOPICS = [
    (("bench_exact", "bench_rescore", "conv_routes"), "kernel"), (("bench_build",), "index"), (("bench_attribute_speed",), "speed"),
    (("bench_attribute_fidelity", "defaults_", "tail_", "two_scale", "stride", "rerank", "reading_attribute"), "fidelity"),
    (("outside_",), "outside"), (("million", "all_classes", "reading_million"), "million"), (("scale_",), "scale"),
    (("lds",), "lds"), (("bench_ray",), "ray"), (("bench_serve",), "serve"),
]


def section_file(name: str) -> Path:
    """The markdown file that holds section ``name`` (docs/benchmarks/<topic>.md, else BENCHMARKS.md)."""
    for prefixes, topic in SECTION_TOPICS:
        if name.startswith(prefixes):
            return TOPICS / f"{topic}.md"
    return BENCHMARKS


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


def update_section(name: str, body: str, path: Path | None = None) -> None:
    """Put ``body`` between ``<!-- name -->`` and ``<!-- /name -->`` (appended if absent) of ``path``
    (default: ``section_file(name)``); atomic write."""
    path = section_file(name) if path is None else path
    header = f"# {path.stem.capitalize()} benchmarks\n\nPart of the benchmark record (BENCHMARKS.md, at the top of the repository, has the headline table).\n"
    text = path.read_text() if path.exists() else (HEADER if path == BENCHMARKS else header)
    block = f"<!-- {name} -->\n{body.rstrip()}\n<!-- /{name} -->"
    pattern = re.compile(rf"<!-- {re.escape(name)} -->.*?<!-- /{re.escape(name)} -->", re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def simd() -> str:
    """The SIMD paths in use: torch's CPU kernels, the CPU's AVX-512 / BF16 / VNNI / AMX flags, FAISS's build."""
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    wanted = ["avx2", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16", "amx_int8", "avx512_fp16"]
    have = [f for f in wanted if f in flags]
    try:
        import faiss

        opts = faiss.get_compile_options()
        level = next((x for x in ("AVX512_SPR", "AVX512", "AVX2", "SVE", "NEON") if x in opts), "generic")
        fa = f"FAISS {faiss.__version__} {level}"
    except Exception:  # FAISS absent or without compile options
        fa = "FAISS unknown"
    return f"torch CPU kernels {torch.backends.cpu.get_cpu_capability()}, BLAS MKL; CPU flags {' '.join(have) or 'none of ' + ' '.join(wanted)}; {fa}"
