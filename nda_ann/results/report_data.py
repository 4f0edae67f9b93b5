"""report.npz in a results folder: what the HTML report needs beyond scores.parquet and summary.json.

Arrays (Q queries, n <= SHOWN proponents each, images H x W x C uint8):
- ``queries``: (Q, H, W, C) uint8, the queries as scored (after the corpus transform);
- ``ids_{q}``: (n,) int64, query q's top image ids by mean score over timesteps, best first;
- ``images_{q}``: (n, H, W, C) uint8, those training images (the report needs no store);
- ``maps_{q}``: (n, H, W) float32, where on the query each contributes (sums to its score; NaN
  where no map was kept).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..atomic import atomic_file
from ..errors import InputError

REPORT_DATA = "report.npz"


@dataclass
class QueryData:
    """One query's pictures: the query (H, W, C), its proponents' ids (n,), images (n, H, W, C)
    and maps (n, H, W) (NaN-filled where none was kept)."""

    query: np.ndarray
    ids: np.ndarray
    images: np.ndarray
    maps: np.ndarray


def collect(attribution, queries_u8: np.ndarray, corpus, shown: int) -> dict[str, np.ndarray]:
    """The arrays of report.npz for an ``Attribution``; ``queries_u8`` (Q, H, W, C), ``corpus`` a
    CorpusView (its ``take`` gives (n, C, H, W) floats in [-1, 1])."""
    arrays: dict[str, np.ndarray] = {"queries": np.asarray(queries_u8, dtype=np.uint8)}
    h, w = arrays["queries"].shape[1:3]
    for q in range(len(attribution.query_names)):
        ids = np.array([i for i, _, _ in attribution.top(q, shown)], dtype=np.int64)
        maps = np.full((len(ids), h, w), np.nan, dtype=np.float32)
        for k, i in enumerate(ids.tolist()):
            try:
                maps[k] = attribution.heatmap(q, i)
            except KeyError:
                pass
        imgs = corpus.take(ids) if len(ids) else None
        arrays[f"ids_{q}"] = ids
        arrays[f"images_{q}"] = (np.zeros((0, h, w, arrays["queries"].shape[3]), np.uint8) if imgs is None else
                                 ((imgs.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy())
        arrays[f"maps_{q}"] = maps
    return arrays


def write_report_data(out: Path, attribution, queries_u8: np.ndarray, corpus, shown: int) -> Path:
    """Write ``out``/report.npz atomically (``collect``); returns its path."""
    path = Path(out) / REPORT_DATA
    with atomic_file(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, **collect(attribution, queries_u8, corpus, shown))
    return path


def read_report_data(folder: Path) -> list[QueryData]:
    """The queries of ``folder``/report.npz in order; InputError naming what is missing."""
    path = Path(folder) / REPORT_DATA
    if not path.is_file():
        raise InputError(folder, f"no {REPORT_DATA} here: the folder was not written by `nda-ann attribute` of this "
                                 "version (which saves the queries, proponents and heatmaps the report shows); "
                                 "rerun `nda-ann attribute ... --out` into it")
    try:
        with np.load(path) as data:
            arrays = {k: data[k] for k in data.files}
    except Exception as err:  # a truncated or foreign file
        raise InputError(path, f"cannot read it ({type(err).__name__}: {err}); rerun `nda-ann attribute`") from None
    if "queries" not in arrays:
        raise InputError(path, "holds no 'queries' array; rerun `nda-ann attribute`")
    out = []
    for q, query in enumerate(arrays["queries"]):
        keys = (f"ids_{q}", f"images_{q}", f"maps_{q}")
        if any(k not in arrays for k in keys):
            raise InputError(path, f"query {q} lacks {', '.join(k for k in keys if k not in arrays)}; rerun `nda-ann attribute`")
        out.append(QueryData(query, *(arrays[k] for k in keys)))
    return out
