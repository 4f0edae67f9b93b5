"""The result of an attribution: sparse scores per (timestep, query), heatmaps, the outside mass."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class Attribution:
    """Sparse attribution scores: per (timestep index, query) the scored image ids and scores.

    ``scores`` densifies to (T, Q, N); images never scored are 0.
    """

    n_images: int
    timesteps: list[int]
    query_names: list[str]
    sources: list[str]
    settings: dict[str, Any]
    device: str
    sparse: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    kept_maps: dict[tuple[int, int], dict[int, np.ndarray]] = field(default_factory=dict)
    outside_mass: np.ndarray | None = None  # (T, Q, S): mean estimated share of mass outside the candidates
    scale_names: list[str] = field(default_factory=list)
    candidates_used: np.ndarray | None = None  # (T, Q): M, the number of images re-scored exactly
    rounds: dict[tuple[int, int], Any] = field(default_factory=dict)  # (t index, query) -> rounds.RoundsRecord
    candidate_ids: dict[tuple[int, int], np.ndarray] = field(default_factory=dict)  # (t index, query) -> sorted ids re-scored

    def candidates_report(self) -> dict[str, Any]:
        """Per query name and timestep (``query_rounds``): summary.json's ``candidates``."""
        out: dict[str, Any] = {}
        for q, name in enumerate(self.query_names):
            if rows := self.query_rounds(q):
                out.setdefault(name, {}).update(rows)
        return out

    def query_rounds(self, q: int) -> dict[str, Any]:
        """Per timestep ("t=100") of query ``q``: M re-scored, the estimated outside share, whether the target
        was met, what stopped the rounds, the seconds taken (and of them before the first round) and, under
        a time budget, whether the query kept its share of it; {} without rounds records (the exact path)."""
        budget = self.settings.get("time_budget")
        out: dict[str, Any] = {}
        for ti, t in enumerate(self.timesteps):
            rec = self.rounds.get((ti, q))
            if rec is None:
                continue
            row = {"candidates": int(rec.candidates), "outside": round(float(rec.outside), 6), "target_met": bool(rec.met),
                   "rounds": int(rec.rounds), "stopped_by": rec.stopped_by, "seconds": round(float(rec.seconds), 4),
                   "seconds_before_rounds": round(float(rec.before_rounds), 4)}
            if budget is not None:
                row["within_budget"] = bool(rec.seconds <= budget / len(self.timesteps))
            out[f"t={t}"] = row
        return out

    def rounds_labels(self) -> dict[str, str]:
        """Per query name, one line of what its re-scoring reached (``query_rounds``: M, the estimated outside
        share and the seconds, per timestep; ", past its budget" where it ran past it), for the printed
        table; {} without rounds records (the exact path)."""
        out: dict[str, str] = {}
        for q, name in enumerate(self.query_names):
            texts = [(f"{t}: " if len(self.timesteps) > 1 else "") + f"M {row['candidates']}, est. outside {row['outside']:.2f}, "
                     f"{row['seconds']:.2f} s" + (", past its budget" if row.get("within_budget") is False else "")
                     for t, row in self.query_rounds(q).items()]
            if texts:
                out[name] = "; ".join(texts)
        return out

    @property
    def scores(self) -> np.ndarray:
        """(T, Q, N) float64."""
        out = np.zeros((len(self.timesteps), len(self.query_names), self.n_images))
        for (ti, q), (ids, vals) in self.sparse.items():
            out[ti, q, ids] = vals
        return out

    def _timestep_indices(self, timestep: int | None) -> list[int]:
        """Indices into ``timesteps`` of one timestep (None: all of them)."""
        if timestep is None:
            return list(range(len(self.timesteps)))
        if timestep not in self.timesteps:
            raise KeyError(f"timestep {timestep} was not attributed; this result holds timesteps {self.timesteps}")
        return [self.timesteps.index(timestep)]

    def _check_query(self, query: int) -> int:
        n = len(self.query_names)
        if isinstance(query, bool) or not isinstance(query, (int, np.integer)) or not 0 <= int(query) < n:
            raise IndexError(f"query {query!r} is out of range: this result holds {n} quer{'y' if n == 1 else 'ies'} (0 to {n - 1})")
        return int(query)

    def query_scores(self, query: int, timestep: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(ids, scores) of one query at one timestep (None: mean over timesteps), nonzero only."""
        query = self._check_query(query)
        tis = self._timestep_indices(timestep)
        acc: dict[int, float] = {}
        for ti in tis:
            ids, vals = self.sparse[(ti, query)]
            for i, v in zip(ids.tolist(), vals.tolist()):
                acc[i] = acc.get(i, 0.0) + v / len(tis)
        ids = np.fromiter(acc.keys(), dtype=np.int64, count=len(acc))
        vals = np.fromiter(acc.values(), dtype=np.float64, count=len(acc))
        keep = vals > 0
        return ids[keep], vals[keep]

    def top(self, query: int, n: int = 10, timestep: int | None = None) -> list[tuple[int, float, str]]:
        """The n highest-scoring images of a query: [(image_id, score, source)], best first."""
        ids, vals = self.query_scores(query, timestep)
        order = np.lexsort((ids, -vals))[:n]
        return [(int(ids[i]), float(vals[i]), self.sources[int(ids[i])]) for i in order]

    def heatmap(self, query: int, image_id: int, timestep: int | None = None) -> np.ndarray:
        """(H, W): where in the query image ``image_id`` contributes (sums to its score)."""
        query = self._check_query(query)
        tis = self._timestep_indices(timestep)
        maps = []
        for ti in tis:
            kept = self.kept_maps.get((ti, query), {})
            if int(image_id) not in kept:
                raise KeyError(f"no heatmap kept for image {image_id} of query {query}; maps are kept for the top {self.settings.get('maps')} images by mean score and at each timestep (raise maps=)")
            maps.append(kept[int(image_id)])
        return np.mean(maps, axis=0)

    def to_table(self):
        """A pyarrow table (results.SCHEMA): query, timestep (-1 = mean), image_id, source, score, rank.

        Only nonzero scores; ranks are 1 = highest per query and timestep.
        """
        import pyarrow as pa

        from ..results.tables import MEAN_TIMESTEP, SCHEMA

        cols: dict[str, list] = {name: [] for name in SCHEMA.names}
        slots = [(t, t) for t in self.timesteps] + ([(None, MEAN_TIMESTEP)] if len(self.timesteps) > 1 else [])
        for q, name in enumerate(self.query_names):
            for t, label in slots:
                for rank, (i, v, src) in enumerate(self.top(q, self.n_images, t), start=1):
                    for key, val in zip(SCHEMA.names, (name, label, i, src, v, rank)):
                        cols[key].append(val)
        return pa.Table.from_arrays([pa.array(cols[f.name], type=f.type) for f in SCHEMA], schema=SCHEMA)

    @classmethod
    def from_exact(cls, exact, sources: list[str], query_names: list[str], settings: dict[str, Any]) -> "Attribution":
        """Wrap an ``ExactResult`` (dense scores, kept maps) in the same interface."""
        t_count, q_count, n = exact.scores.shape
        out = cls(n, list(exact.timesteps), list(query_names), sources, settings, exact.device, scale_names=[str(s) for s in exact.scales])
        for ti in range(t_count):
            for q in range(q_count):
                ids = np.nonzero(exact.scores[ti, q])[0]
                out.sparse[(ti, q)] = (ids, exact.scores[ti, q, ids])
                if (ti, q) in exact.kept_maps:
                    kept_ids, maps = exact.kept_maps[(ti, q)]
                    out.kept_maps[(ti, q)] = {int(i): m for i, m in zip(kept_ids, maps)}
        return out

    def to_parquet(self, path) -> None:
        """Write ``to_table()`` atomically to ``path``."""
        from ..results.tables import write_parquet_atomic

        write_parquet_atomic(self.to_table(), path)


