"""Stage 2: exact dense re-scoring of the candidate images (docs/scores.md section 5, step 2), in rounds.

Every query patch against every same-layout position of the candidates, from the store's pixels
(scoring/masses.py); the non-candidates enter the softmax normaliser through the known mass of their
retrieved patches (known.py) plus the sampled estimate of the rest (outside.py). ``Rescoring.add``
re-scores more candidates to what it holds, so the number of candidates can follow the estimated
outside mass (attributor.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..scoring.dense import chunk_size
from ..scoring.masses import MassScan, max_logits
from ..scoring.operands import kernel_path
from ..scoring.patches import LayoutGroup
from ..scoring.scales import Scale
from .outside import smoothed_share

# candidate images whose largest logits give the shift where no nearest retrieved patch does (a lower
# bound of each position's maximum is enough: a chunk holding a logit CEIL above it is recomputed)
SHIFT_SAMPLE = 16


@dataclass
class Rescored:
    """One query's re-scored candidates: ``ids`` (M',) with ``scores`` (M',) > 0; ``per_pos[scale]``
    (L, M) weighted masses per query position and candidate (columns in the order of ``cand``, the
    sorted ids); ``outside`` (S,) mean share of the normaliser outside the candidates per scale;
    ``log_z[(draw, scale)]`` (L,) log normaliser per query position."""

    ids: np.ndarray
    scores: np.ndarray
    per_pos: dict[Scale, torch.Tensor]
    outside: np.ndarray
    log_z: dict
    cand: np.ndarray | None = None
    log_z_out: dict | None = None  # (draw, scale) -> (L,) log of the non-candidates' estimated part of log_z


class PositionScan:
    """The shifted masses of one query at one (draw, scale) over the candidates added so far."""

    def __init__(self, qp: torch.Tensor, sc: Scale, groups: list[LayoutGroup], inv: float, topk: int | None,
                 hint: torch.Tensor | None):
        self.qp, self.sc, self.groups, self.inv, self.topk, self.hint = qp, sc, groups, inv, topk, hint
        self.scan: MassScan | None = None
        self.z_in = torch.zeros(qp.shape[1], dtype=torch.float64, device=qp.device)
        self.aggs: list[torch.Tensor] = []

    def add(self, imgs: torch.Tensor) -> None:
        """imgs (b, C, H, W) of s * y, in the computation's dtype and device."""
        if self.scan is None:
            shift = None if self.hint is None else self.hint.to(self.qp.device, self.qp.dtype)
            if shift is None or not torch.isfinite(shift).all():  # a lower bound from a few images
                first = max_logits(self.qp, imgs[:SHIFT_SAMPLE], self.sc, self.groups, self.inv)[0]
                shift = first if shift is None else torch.maximum(first, shift)
            path = kernel_path(self.qp.device, self.qp.dtype)
            self.scan = MassScan(self.qp, self.groups, self.inv, shift[None], self.topk, self.sc, path)
        full, agg, rescale = self.scan.add(imgs)
        if rescale is not None:
            self.z_in *= rescale[0].double()
            self.aggs = [a * rescale[0][:, None] for a in self.aggs]
        self.z_in += full[0].sum(-1, dtype=torch.float64)
        self.aggs.append(agg[0])

    @property
    def log_z_in(self) -> torch.Tensor:
        """(L,) float64 log of the candidates' part of the normaliser."""
        return self.z_in.log() + self.scan.shift[0].double()


class Rescoring:
    """One query's exact re-scoring, grown by ``add``; ``outside`` and ``result`` combine what it holds
    with the non-candidates' known (``retrieved_out``) and sampled (``sampled``) shares of the normaliser.

    ``patches``: the query's (1, L, D) noised patch vectors per (draw, scale), on the device and in the
    dtype of the computation; ``shift_hint`` (per (draw, scale), (L,)): a lower bound of each position's
    largest logit (the nearest retrieved patch's, from exact distances), else a few images' maxima.
    """

    def __init__(self, corpus, patches: dict, groups: dict[Scale, list[LayoutGroup]], scales: list[Scale],
                 weights: list[float], draws: int, s: float, sigma2: float, topk: int | None, budget: int,
                 shift_hint: dict | None = None):
        self.corpus, self.scales, self.weights, self.draws, self.s = corpus, scales, weights, draws, s
        inv = 1.0 / (2.0 * sigma2)
        self.scans = {(d, sc): PositionScan(patches[(d, sc)], sc, groups[sc], inv, topk, None if shift_hint is None else shift_hint.get((d, sc)))
                      for sc in scales for d in range(draws)}
        some = next(iter(patches.values()))
        self.device, self.dtype = some.device, some.dtype
        self.step = self.chunk(groups, scales, self.dtype, budget)
        self.order: list[np.ndarray] = []

    @staticmethod
    def chunk(groups: dict[Scale, list[LayoutGroup]], scales: list[Scale], dtype: torch.dtype, budget: int) -> int:
        """Images re-scored at once for one query within ``budget``."""
        return min(chunk_size(1, groups[sc], dtype, budget) for sc in scales)

    @property
    def count(self) -> int:
        return sum(len(o) for o in self.order)

    def cand(self) -> np.ndarray:
        """(M,) sorted ids of the images re-scored so far."""
        return np.sort(np.concatenate(self.order)) if self.order else np.zeros(0, dtype=np.int64)

    def add(self, ids: np.ndarray) -> None:
        """Re-score the images ``ids`` (none re-scored before), each read once for every (draw, scale)."""
        ids = np.asarray(ids, dtype=np.int64)
        for lo in range(0, len(ids), self.step):
            imgs = self.corpus.images_on(ids[lo : lo + self.step], self.device, self.dtype) * self.s
            for scan in self.scans.values():
                scan.add(imgs)
        self.order.append(ids)

    def _log_z_out(self, key, cand: np.ndarray, retrieved_out: dict, sampled: dict) -> torch.Tensor:
        """(L,) log of the non-candidates' estimated mass: the known part plus the sampled one."""
        if len(cand) >= self.corpus.count:
            return torch.full_like(self.scans[key].log_z_in, -math.inf)
        out = retrieved_out[key].double()
        if key in sampled:
            out = torch.logaddexp(out, sampled[key].log_mass(cand).double())
        return out

    def _share(self, key, cand: np.ndarray, retrieved_out: dict, sampled: dict) -> float:
        """The estimated outside share at one (draw, scale): mean over positions of Z_out / Z, the
        sampled part read smoothed over neighbouring positions (outside.smoothed_share)."""
        if len(cand) >= self.corpus.count:
            return 0.0
        log_z_in = self.scans[key].log_z_in.double().cpu()
        sample = sampled.get(key)
        if sample is None:  # only the retrieved part: the plain share
            log_sampled, sigma, concentration = torch.full_like(log_z_in, -math.inf), 0.0, None
        else:
            log_sampled, sigma, concentration = sample.log_mass(cand).double().cpu(), sample.smoothing, sample.concentration(cand)
        return float(smoothed_share(log_z_in, retrieved_out[key].double().cpu(), log_sampled, sigma, concentration).mean())

    def outside(self, retrieved_out: dict, sampled: dict) -> np.ndarray:
        """(S,) the estimated share of the normaliser outside the re-scored images, per scale (mean
        over query positions and draws)."""
        cand = self.cand()
        out = np.zeros(len(self.scales))
        for d, sc in self.scans:
            out[self.scales.index(sc)] += self._share((d, sc), cand, retrieved_out, sampled) / self.draws
        return out

    def result(self, retrieved_out: dict, sampled: dict) -> Rescored:
        """The scores of the re-scored images under the normaliser that includes the non-candidates."""
        cand = self.cand()
        order = np.concatenate(self.order) if self.order else np.zeros(0, dtype=np.int64)
        columns = torch.from_numpy(np.argsort(order, kind="stable"))  # addition order -> sorted ids
        scores = torch.zeros(len(cand), dtype=torch.float64)
        per_pos: dict[Scale, list[torch.Tensor]] = {}
        outside = np.zeros(len(self.scales))
        log_zs: dict = {}
        log_z_outs: dict = {}
        for (d, sc), scan in self.scans.items():
            w = self.weights[self.scales.index(sc)]
            log_z_out = self._log_z_out((d, sc), cand, retrieved_out, sampled).to(scan.log_z_in.device)
            log_z = torch.logaddexp(scan.log_z_in, log_z_out)
            log_zs[(d, sc)] = log_z.to(self.dtype)
            log_z_outs[(d, sc)] = log_z_out.double().cpu()
            outside[self.scales.index(sc)] += self._share((d, sc), cand, retrieved_out, sampled) / self.draws
            shift = scan.scan.shift[0].double()
            a = (torch.cat(scan.aggs, -1).double() * torch.exp(shift - log_z)[:, None]).cpu()[:, columns]  # (L, M)
            scores += w / self.draws * a.sum(0)
            per_pos.setdefault(sc, []).append(w / self.draws * a)
        keep = scores.numpy() > 0
        return Rescored(cand[keep], scores.numpy()[keep], {sc: sum(parts) for sc, parts in per_pos.items()}, outside, log_zs, cand,
                        log_z_outs)


def rescore(corpus, cand: np.ndarray, patches: dict, groups: dict[Scale, list[LayoutGroup]], scales: list[Scale],
            weights: list[float], draws: int, s: float, sigma2: float, retrieved_out: dict, sampled: dict,
            topk: int | None, budget: int, shift_hint: dict | None = None) -> Rescored:
    """Exact re-scoring of one query against every position of the candidate images ``cand`` (M,)
    sorted, in one round (``Rescoring``)."""
    res = Rescoring(corpus, patches, groups, scales, weights, draws, s, sigma2, topk, budget, shift_hint)
    res.add(cand)
    return res.result(retrieved_out, sampled)
