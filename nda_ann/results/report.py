"""Writes an attribution's results folder: scores.parquet, summary.json, one PNG per query."""
from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..atomic import staging_dir, write_json_atomic
from ..attribution.attributor import Attribution
from ..errors import InputError
from .figures import Proponent, render_attribution
from ..corpus.inputs import CorpusView
from .tables import format_top_table, write_parquet_atomic
from .report_data import write_report_data

SHOWN = 8


def _uint8(images: torch.Tensor) -> np.ndarray:
    """(n, C, H, W) floats in [-1, 1] -> (n, H, W, C) uint8."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", Path(name).stem)[:80] or "query"


def prepare_out_dir(out: Path) -> Path:
    """Check ``out`` is new, empty, or an earlier results folder (has summary.json); refuse otherwise."""
    out = Path(out)
    if out.exists():
        if not out.is_dir():
            raise InputError(out, "--out exists and is not a folder")
        if any(out.iterdir()) and not (out / "summary.json").exists():
            raise InputError(out, "--out is a non-empty folder that holds no earlier nda-ann results; choose a new folder")
    return out


def write_report(out: Path, attribution: Attribution, queries: torch.Tensor, corpus: CorpusView, summary: dict[str, Any], top: int = 5) -> str:
    """Write the results folder and return the stdout table (top ``top`` per query and timestep).

    queries: (Q, C, H, W) floats in [-1, 1]. The folder is written in a hidden sibling and then
    published in one rename (``atomic.staging_dir``): a reader, or a failure part-way, sees the
    earlier results folder complete or the new one, never a mix (nor figures of earlier queries).
    """
    final = prepare_out_dir(out).resolve()
    with staging_dir(final, overwrite=True) as staged:
        return _write_report(staged, attribution, queries, corpus, summary, top)


def _write_report(out: Path, attribution: Attribution, queries: torch.Tensor, corpus: CorpusView, summary: dict[str, Any], top: int) -> str:
    table = attribution.to_table()
    write_parquet_atomic(table, out / "scores.parquet")
    figures = []
    q_u8 = _uint8(queries)
    for q, name in enumerate(attribution.query_names):
        best = attribution.top(q, SHOWN)
        if not best:
            continue
        images = _uint8(corpus.take([i for i, _, _ in best]))
        props = []
        for (i, score, src), img in zip(best, images):
            try:
                heat = attribution.heatmap(q, i)
            except KeyError:
                heat = None
            props.append(Proponent(img, f"#{i} {src}", score, heat))
        ts = ",".join(str(t) for t in attribution.timesteps)
        path = out / f"{q:04d}-{_safe(name)}.png"
        render_attribution(q_u8[q], props, path, title=f"{name}  (t={ts}, scales {' + '.join(attribution.scale_names)}, N={attribution.n_images})")
        figures.append(path.name)
    write_report_data(out, attribution, q_u8, corpus, SHOWN)  # what report.html shows
    outside = attribution.outside_mass
    full = {
        **summary,
        "settings": attribution.settings,
        "device": attribution.device,
        "timesteps": attribution.timesteps,
        "scales": attribution.scale_names,
        "n_images": attribution.n_images,
        "queries": attribution.query_names,
        "figures": figures,
        "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if outside is not None:
        full["outside_mass"] = {
            name: {f"t={t}": {sc: float(outside[ti, q, si]) for si, sc in enumerate(attribution.scale_names)} for ti, t in enumerate(attribution.timesteps)}
            for q, name in enumerate(attribution.query_names)
        }
    if getattr(attribution, "rounds", None):
        full["candidates"] = attribution.candidates_report()  # per query and timestep: M, outside share, target met
    write_json_atomic(out / "summary.json", full)
    return format_top_table(table, top, query_labels=attribution.rounds_labels() if getattr(attribution, "rounds", None) else None)
