"""report.html: a self-contained page for a results folder that opens from disk with no server.

Per query: the query, its top proponents (rank, image, heatmap over the query, score by mean over
timesteps and at each timestep, id, source), its estimated mass outside the candidates; and the
run's settings. Reads scores.parquet, summary.json and report.npz (``report_data``); every
picture is inlined as a base64 PNG data URI, so the file needs nothing else.
"""
from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from ..atomic import atomic_file
from ..errors import InputError
from .overlay import heatmap_png, png_bytes
from .report_data import QueryData, read_report_data
from .tables import MEAN_TIMESTEP

REPORT_HTML = "report.html"
QUERY_WIDTH = 128   # the query and the proponents are drawn at least this wide (pixelated)
PROPONENT_WIDTH = 64

STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 24px; color: #1e1e1e; background: #fff; }
h1 { font-size: 22px; } h2 { font-size: 18px; margin-top: 32px; border-top: 1px solid #ccc; padding-top: 16px; }
table { border-collapse: collapse; } td, th { padding: 4px 10px; border-bottom: 1px solid #eee; text-align: left; vertical-align: middle; }
th { background: #f4f4f4; } td.score, td.num { font-variant-numeric: tabular-nums; text-align: right; }
img.px { image-rendering: pixelated; border: 1px solid #ccc; }
.query { display: flex; gap: 24px; align-items: flex-start; margin-bottom: 12px; }
.mass { font-size: 15px; } .mass b { font-size: 18px; } .note { color: #666; font-size: 12px; }
table.settings td:first-child { color: #555; }
"""


def data_uri(png: bytes) -> str:
    """PNG bytes -> a ``data:image/png;base64,...`` URI."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _read_folder(folder: Path) -> tuple[dict[str, Any], list[dict], list[QueryData]]:
    """(summary, score rows, report data) of a results folder; InputError naming what is missing."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(folder, "no such results folder")
    for name in ("summary.json", "scores.parquet"):
        if not (folder / name).is_file():
            raise InputError(folder, f"no {name} here: not an nda-ann results folder (`nda-ann attribute ... --out` writes one)")
    try:
        summary = json.loads((folder / "summary.json").read_text())
        rows = pq.read_table(folder / "scores.parquet").to_pylist()
    except Exception as err:
        raise InputError(folder, f"cannot read summary.json or scores.parquet ({type(err).__name__}: {err})") from None
    data = read_report_data(folder)
    if len(data) != len(summary.get("queries", [])):
        raise InputError(folder, f"report.npz holds {len(data)} queries, summary.json {len(summary.get('queries', []))}: "
                                 "the files are from different runs; rerun `nda-ann attribute`")
    return summary, rows, data


def _scores_by_query(rows: list[dict]) -> dict[str, dict[int, dict[int, float]]]:
    """query name -> timestep (-1 = mean) -> image id -> score."""
    out: dict[str, dict[int, dict[int, float]]] = {}
    for r in rows:
        out.setdefault(r["query"], {}).setdefault(r["timestep"], {})[r["image_id"]] = r["score"]
    return out


def _outside_html(outside: dict[str, dict[str, float]] | None) -> str:
    """The estimated mass outside the candidates: the mean, and per timestep and scale."""
    if not outside:
        return '<p class="mass">Estimated mass outside the candidates: not reported (exact scorer: every image is scored).</p>'
    mean = float(np.mean([v for per_t in outside.values() for v in per_t.values()]))
    parts = ", ".join(f"{html.escape(t)} scale {html.escape(sc)}: {100 * v:.1f}%" for t, per in outside.items() for sc, v in per.items())
    return (f'<p class="mass">Estimated mass outside the candidates: <b class="outside" data-outside="{mean!r}">'
            f"{100 * mean:.1f}%</b><br><span class=\"note\">{parts}</span></p>")


def _proponent_rows(d: QueryData, scores: dict[int, dict[int, float]], timesteps: list[int], mean_key: int, sources: dict[int, str]) -> str:
    """The table rows of one query's proponents."""
    rows = []
    for rank, (i, img, heat) in enumerate(zip(d.ids.tolist(), d.images, d.maps), start=1):
        score = scores.get(mean_key, {}).get(i, 0.0)
        heat_cell = ('<span class="note">no map kept</span>' if np.isnan(heat).all() else
                     f'<img alt="heatmap of #{i} over the query" src="{data_uri(heatmap_png(d.query, heat))}">')
        per_t = "".join(f'<td class="num">{scores.get(t, {}).get(i, 0.0):#.4g}</td>' for t in timesteps) if len(timesteps) > 1 else ""
        rows.append(
            f'<tr class="proponent" data-image-id="{i}"><td class="num">{rank}</td>'
            f'<td><img class="px" alt="training image #{i}" width="{max(PROPONENT_WIDTH, img.shape[1])}" src="{data_uri(png_bytes(img))}"></td>'
            f"<td>{heat_cell}</td>"
            f'<td class="score" data-score="{score!r}">{score:#.4g}</td>{per_t}'
            f'<td class="num">{i}</td><td>{html.escape(sources.get(i, ""))}</td></tr>'
        )
    return "\n".join(rows)


def _query_html(q: int, name: str, d: QueryData, summary: dict[str, Any], scores: dict[int, dict[int, float]], sources: dict[int, str]) -> str:
    timesteps = [int(t) for t in summary.get("timesteps", [])]
    mean_key = MEAN_TIMESTEP if len(timesteps) > 1 else (timesteps[0] if timesteps else MEAN_TIMESTEP)
    t_heads = "".join(f"<th>t = {t}</th>" for t in timesteps) if len(timesteps) > 1 else ""
    score_head = "score (mean)" if len(timesteps) > 1 else "score"
    which = "mean over timesteps " + ", ".join(map(str, timesteps)) if len(timesteps) > 1 else f"t = {timesteps[0] if timesteps else '?'}"
    query_img = data_uri(png_bytes(d.query))
    return f"""
<section class="query-block" id="query-{q}">
<h2>Query {q + 1}: {html.escape(name)}</h2>
<div class="query"><img class="px" alt="query {html.escape(name)}" width="{max(QUERY_WIDTH, d.query.shape[1])}" src="{query_img}">
<div>{_outside_html((summary.get("outside_mass") or {}).get(name))}
<p class="note">Top {len(d.ids)} proponents by score ({html.escape(which)}). The heatmap shows where on the query each
training image contributes: colour is the share of that image's score per pixel.</p></div></div>
<table class="proponents"><tr><th>rank</th><th>training image</th><th>heatmap over the query</th><th>{score_head}</th>{t_heads}<th>id</th><th>source</th></tr>
{_proponent_rows(d, scores, timesteps, mean_key, sources)}
</table>
</section>"""


def _settings_html(summary: dict[str, Any]) -> str:
    """The run's settings and context as a two-column table."""
    items = {k: summary.get(k) for k in ("source", "n_images", "timesteps", "scales", "device", "seconds", "written")}
    items.update({f"settings.{k}": v for k, v in (summary.get("settings") or {}).items()})
    def shown(v: Any) -> str:
        return "default" if v is None else v if isinstance(v, str) else json.dumps(v)

    cells = "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(shown(v))}</td></tr>" for k, v in items.items())
    return f'<h2>Settings</h2><table class="settings">{cells}</table>'


def render_html_report(folder: Path) -> str:
    """The report page of results ``folder`` as one HTML string (pictures inlined)."""
    summary, rows, data = _read_folder(Path(folder))
    scores = _scores_by_query(rows)
    sources = {r["image_id"]: r["source"] for r in rows}
    names = list(summary.get("queries", []))
    blocks = "".join(_query_html(q, name, d, summary, scores.get(name, {}), sources) for q, (name, d) in enumerate(zip(names, data)))
    title = f"nda-ann report: {Path(folder).resolve().name}"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title><style>{STYLE}</style></head>
<body><h1>{html.escape(title)}</h1>
<p>{len(names)} quer{"y" if len(names) == 1 else "ies"} against {summary.get("n_images", "?")} training images
({html.escape(str((summary.get("settings") or {}).get("method", "")))}; timesteps {html.escape(", ".join(map(str, summary.get("timesteps", []))))}).</p>
{blocks}
{_settings_html(summary)}
</body></html>
"""


def write_html_report(folder: str | Path, out: str | Path | None = None) -> Path:
    """Write the report of results ``folder`` to ``out`` (default FOLDER/report.html) atomically; returns the path."""
    text = render_html_report(Path(folder))
    path = Path(out) if out is not None else Path(folder) / REPORT_HTML
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path
