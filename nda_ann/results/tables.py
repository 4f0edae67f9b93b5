"""Score tables: one row per (query, timestep, image) with a rank, written as Parquet; a text summary.

Shared by the exact scorer's demo and the index scorer. Columns of a scores table:
query (string), timestep (int32; -1 is the mean over timesteps), image_id (int64), source (string),
score (float64), rank (int32; 1 = highest score within its query and timestep).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..atomic import atomic_file

MEAN_TIMESTEP = -1
SCHEMA = pa.schema(
    [
        ("query", pa.string()),
        ("timestep", pa.int32()),
        ("image_id", pa.int64()),
        ("source", pa.string()),
        ("score", pa.float64()),
        ("rank", pa.int32()),
    ]
)


def rank_order(scores: np.ndarray) -> np.ndarray:
    """Indices of a (N,) score vector, highest first; ties broken by the lower image id."""
    return np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")


def scores_table(
    scores: np.ndarray,
    timesteps: Sequence[int],
    sources: Sequence[str],
    query_names: Sequence[str],
    *,
    min_score: float = 0.0,
    max_rank: int | None = None,
    include_mean: bool | None = None,
) -> pa.Table:
    """Rows for every (query, timestep, image) whose score is > ``min_score`` (exclusive).

    ``scores`` is (T, Q, N). ``max_rank`` keeps only the top ranks of each group. ``include_mean``
    adds the mean over timesteps as timestep -1 (default: when T > 1). Ranks are taken over all N
    images, so filtering never renumbers them. Rows are ordered by query, timestep, rank.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 3:
        raise ValueError(f"scores must be (T, Q, N), got shape {scores.shape}")
    t_count, q_count, n = scores.shape
    if len(timesteps) != t_count or len(query_names) != q_count or len(sources) != n:
        raise ValueError(
            f"scores {scores.shape} do not match {len(timesteps)} timesteps, {len(query_names)} queries, {len(sources)} sources"
        )
    groups = [(int(t), scores[i]) for i, t in enumerate(timesteps)]
    if include_mean if include_mean is not None else t_count > 1:
        groups.append((MEAN_TIMESTEP, scores.mean(axis=0)))
    src = np.asarray(sources, dtype=object)
    cols: dict[str, list[np.ndarray]] = {name: [] for name in SCHEMA.names}
    for q, name in enumerate(query_names):
        for t, per_query in groups:
            s = per_query[q]
            order = rank_order(s)
            keep = int(np.count_nonzero(s[order] > min_score))  # a prefix of the order
            if max_rank is not None:
                keep = min(keep, max_rank)
            ids = order[:keep]
            cols["query"].append(np.full(keep, name, dtype=object))
            cols["timestep"].append(np.full(keep, t, dtype=np.int32))
            cols["image_id"].append(ids.astype(np.int64))
            cols["source"].append(src[ids])
            cols["score"].append(s[ids])
            cols["rank"].append(np.arange(1, keep + 1, dtype=np.int32))
    arrays = [pa.array(np.concatenate(cols[f.name]) if cols[f.name] else [], type=f.type) for f in SCHEMA]
    return pa.Table.from_arrays(arrays, schema=SCHEMA)


def write_parquet_atomic(table: pa.Table, path: str | Path) -> Path:
    """Write ``table`` to ``path`` atomically (``atomic_file``); returns the path."""
    with atomic_file(path) as tmp:
        pq.write_table(table, tmp)
    return Path(path)


def format_top_table(
    table: pa.Table,
    top: int = 5,
    *,
    query_labels: dict[str, str] | None = None,
    source_width: int = 60,
) -> str:
    """A readable text table: for each query and timestep (in table order), its ``top`` ranks."""
    rows = table.select(["query", "timestep", "image_id", "source", "score", "rank"]).to_pylist()
    blocks: dict[tuple[str, int], list[dict]] = {}
    for row in rows:
        if row["rank"] <= top:
            blocks.setdefault((row["query"], row["timestep"]), []).append(row)
    lines: list[str] = []
    for (query, t), block in blocks.items():
        when = "mean over timesteps" if t == MEAN_TIMESTEP else f"t={t}"
        label = (query_labels or {}).get(query)
        lines.append(f"query {query}" + (f" ({label})" if label else "") + f", {when}")
        lines.append(f"  {'rank':>4}  {'image':>9}  {'score':>10}  source")
        for row in sorted(block, key=lambda r: r["rank"]):
            source = row["source"]
            if len(source) > source_width:
                source = source[: source_width - 3] + "..."
            lines.append(f"  {row['rank']:>4}  {row['image_id']:>9}  {row['score']:>10.4f}  {source}")
        lines.append("")
    return "\n".join(lines).rstrip("\n") + ("\n" if lines else "")
