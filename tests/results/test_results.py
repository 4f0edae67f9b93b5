"""Score tables: ranks, filtering and the mean row checked against a plain-Python computation."""
from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from nda_ann.results.tables import MEAN_TIMESTEP, SCHEMA, format_top_table, scores_table, write_parquet_atomic


def _reference(scores, timesteps, sources, names, min_score, max_rank, with_mean):
    """Rows built by sorting (score, -id) tuples in plain Python."""
    groups = [(t, scores[i]) for i, t in enumerate(timesteps)]
    if with_mean:
        groups.append((-1, scores.mean(axis=0)))
    rows = []
    for q, name in enumerate(names):
        for t, s in groups:
            ranked = sorted(range(s.shape[1]), key=lambda n: (-s[q, n], n))
            for r, n in enumerate(ranked, start=1):
                if s[q, n] > min_score and (max_rank is None or r <= max_rank):
                    rows.append((name, t, n, sources[n], float(s[q, n]), r))
    return rows


@pytest.mark.parametrize("min_score,max_rank", [(0.0, None), (0.3, None), (0.0, 4)])
def test_table_matches_independent_ranking(rng, min_score, max_rank):
    scores = rng.random((2, 3, 12))
    scores[scores < 0.2] = 0.0
    scores[0, 1, [3, 7]] = 0.55  # a tie: lower id ranks first
    names, sources = ["a", "b", "c"], [f"img{i}" for i in range(12)]
    table = scores_table(scores, [100, 300], sources, names, min_score=min_score, max_rank=max_rank)
    assert table.schema.equals(SCHEMA)
    got = list(zip(*(table.column(c).to_pylist() for c in ["query", "timestep", "image_id", "source", "score", "rank"])))
    assert got == _reference(scores, [100, 300], sources, names, min_score, max_rank, with_mean=True)
    assert all(s > min_score for s in table.column("score").to_pylist())


def test_zero_scores_are_dropped_and_mean_only_when_asked(rng):
    scores = np.array([[[0.0, 2.0, 1.0, 0.0]]])
    table = scores_table(scores, [100], ["w", "x", "y", "z"], ["q"])
    assert table.column("image_id").to_pylist() == [1, 2]
    assert table.column("rank").to_pylist() == [1, 2]
    assert MEAN_TIMESTEP not in table.column("timestep").to_pylist()
    with_mean = scores_table(scores, [100], ["w", "x", "y", "z"], ["q"], include_mean=True)
    assert with_mean.column("timestep").to_pylist() == [100, 100, -1, -1]


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="do not match"):
        scores_table(np.zeros((1, 2, 3)), [100], ["a", "b", "c"], ["q"])
    with pytest.raises(ValueError, match=r"\(T, Q, N\)"):
        scores_table(np.zeros((2, 3)), [100], ["a"], ["q"])


def test_parquet_round_trip_is_atomic(tmp_path, rng):
    table = scores_table(rng.random((1, 2, 5)), [100], list("abcde"), ["q0", "q1"])
    path = write_parquet_atomic(table, tmp_path / "out" / "scores.parquet")
    assert pq.read_table(path).equals(table)
    assert [p.name for p in path.parent.iterdir()] == ["scores.parquet"]


def test_text_table_lists_top_ranks_per_query():
    scores = np.array([[[0.1, 0.9, 0.5], [0.7, 0.2, 0.0]]])
    table = scores_table(scores, [100], ["cat.png", "dog.png", "x" * 80], ["q0", "q1"])
    text = format_top_table(table, top=2, query_labels={"q0": "held-out crop"})
    lines = text.splitlines()
    assert lines[0] == "query q0 (held-out crop), t=100"
    assert "dog.png" in lines[2] and lines[2].split()[:2] == ["1", "1"]
    assert lines[3].split()[:2] == ["2", "2"] and lines[3].endswith("...")
    assert "query q1, t=100" in text and "cat.png" in text
    assert "0.0000" not in text  # the zero score of q1 is not a row
