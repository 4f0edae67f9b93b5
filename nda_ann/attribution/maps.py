"""Heatmaps: where on the query each training image contributes, drawn from the re-scoring's
per-position masses and the non-candidates' retrieved patches."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..scoring.exact import positions_to_pixels
from .result import Attribution


@dataclass
class Contributions:
    """What one query's heatmaps at one timestep are drawn from.

    ``per_pos[sc]`` (L_s, M): the weighted softmax mass at each query position on each candidate
    image (columns in the order of ``cand``, sorted ids); ``tail[sc]``: [(weights (L_s, K'), image
    ids (L_s, K'))] of the retrieved patches of non-candidates (ids -1 where none), per draw.
    """

    cand: np.ndarray
    per_pos: dict
    tail: dict

    def pixel_maps(self, ids: np.ndarray, size: int) -> np.ndarray:
        """(len(ids), size, size) float64 for sorted image ``ids``: where on the query each contributes;
        a map sums to the image's score at this timestep (all zeros where it has none)."""
        out = torch.zeros((len(ids), size, size), dtype=torch.float64)
        col = np.searchsorted(self.cand, ids).clip(max=max(len(self.cand) - 1, 0))
        is_cand = (self.cand[col] == ids) if len(self.cand) else np.zeros(len(ids), dtype=bool)
        for sc in {*self.per_pos, *self.tail}:
            g = sc.grid(size)
            pos = np.zeros((g * g, len(ids)))
            if sc in self.per_pos and is_cand.any():
                pos[:, is_cand] = self.per_pos[sc][:, torch.from_numpy(col[is_cand])].double().cpu().numpy()
            for w, img in self.tail.get(sc, []):
                which = np.searchsorted(ids, img).clip(max=len(ids) - 1)
                rows, ks = np.nonzero((ids[which] == img) & (img >= 0))
                np.add.at(pos, (rows, which[rows, ks]), w[rows, ks])
            out += positions_to_pixels(torch.from_numpy(pos.T.copy()).view(len(ids), g, g), sc, size)
        return out.numpy()


def keep_maps(result: Attribution, q: int, parts: list[Contributions], n_maps: int, size: int) -> None:
    """Heatmaps (H, W) of query ``q``'s top ``n_maps`` images by mean score and at each timestep,
    at every timestep (zero where an image scored 0 there), so that ``heatmap`` can average them.
    ``parts``: one Contributions per timestep, in the order of ``result.timesteps``."""
    chosen = {i for i, _, _ in result.top(q, n_maps)}
    for t in result.timesteps:
        chosen |= {i for i, _, _ in result.top(q, n_maps, t)}
    ids = np.array(sorted(chosen), dtype=np.int64)
    for ti, contrib in enumerate(parts):
        maps = contrib.pixel_maps(ids, size)
        result.kept_maps[(ti, q)] = {int(i): m for i, m in zip(ids, maps)}
