"""The exact NDA scorer (docs/scores.md sections 1 to 3): every query patch against every patch of every image.

Peak memory: the logits of one chunk of candidate images (``memory_budget``, default 1 GiB), plus
the per-image log-masses Q * L * N values when they fit in the same budget; past that the scorer
takes two passes over the corpus (first the softmax normalisers, then the masses), so memory stays
bounded whatever N is.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .dense import chunk_size
from .masses import MassScan, max_logits
from .conv_layout import layouts_chosen
from .operands import describe_kernel, kernel_path
from ..device import describe_device, resolve_device, resolve_dtype
from ..corpus.inputs import CorpusView, as_float_images, check_compatible
from .patches import extract_patches, layout_groups
from .scales import Scale, ScaleLike, parse_scales
from .schedule import NoiseSchedule, noise_images
from ..corpus.store import Store
from ..units import parse_bytes

log = logging.getLogger("nda_ann.scoring.exact")

# images whose largest logits seed the shift of the masses (a lower bound of each position's maximum)
SHIFT_SAMPLE = 16


def scale_weights(scales: list[Scale], alpha: float | None) -> list[float]:
    """Fusion weights: 1 for one scale; (alpha, 1 - alpha) for two (alpha defaults to 0.5); equal otherwise."""
    if len(scales) == 2:
        a = 0.5 if alpha is None else float(alpha)
        if not 0.0 <= a <= 1.0:
            raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
        return [a, 1.0 - a]
    if alpha is not None:
        raise ValueError(f"alpha weighs the first of two scales; got {len(scales)} scale(s)")
    return [1.0 / len(scales)] * len(scales)


def positions_to_pixels(maps: torch.Tensor, scale: Scale, size: int) -> torch.Tensor:
    """Spread per-position values (..., G, G) onto pixels (..., size, size), preserving the sum.

    Odd p: position (i, j) is centred on pixel (i, j). Even p: it is centred between pixels
    i, i+1 and j, j+1, and gives a quarter to each.
    """
    if scale.grid(size) == size:
        return maps
    out = maps.new_zeros(maps.shape[:-2] + (size, size))
    quarter = maps / 4
    for di in (0, 1):
        for dj in (0, 1):
            out[..., di : di + size - 1, dj : dj + size - 1] += quarter
    return out


@dataclass
class ExactResult:
    """Scores (T, Q, N) and, for the kept images, per-pixel contribution maps."""

    scores: np.ndarray
    timesteps: list[int]
    scales: list[Scale]
    weights: list[float]
    device: str
    kept_maps: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    mass: np.ndarray | None = None  # (T, Q, N) with keep_mass: each image's softmax mass (the score without topk)

    def mean_scores(self) -> np.ndarray:
        """(Q, N): the default summary over timesteps."""
        return self.scores.mean(axis=0)

    def maps(self, t_index: int, query: int, image_ids: Sequence[int]) -> np.ndarray:
        """(len(image_ids), H, W) contribution of each image to each query pixel (sums to its score)."""
        if (t_index, query) not in self.kept_maps:
            raise KeyError(f"no maps kept for timestep index {t_index}, query {query}; pass maps_for=K")
        ids, maps = self.kept_maps[(t_index, query)]
        where = {int(i): k for k, i in enumerate(ids)}
        missing = [int(i) for i in image_ids if int(i) not in where]
        if missing:
            raise KeyError(f"maps were kept for images {ids.tolist()}, not {missing}")
        return maps[[where[int(i)] for i in image_ids]]


def as_queries(queries, view: CorpusView, what: str = "queries") -> torch.Tensor:
    """Queries in any form ``Attributor.attribute`` takes -> (Q, C, H, W) floats matching ``view``.

    Float tensors and arrays are checked as they are (their dtype kept; another size is refused);
    paths, folders, PIL images, uint8 arrays and lists of these go through ``load_queries``.
    """
    if isinstance(queries, torch.Tensor) or (isinstance(queries, np.ndarray) and queries.dtype != np.uint8):
        t = torch.as_tensor(queries)
        q_images = as_float_images(t[None] if t.ndim == 3 else t, what)
    else:
        from ..corpus.queries import load_queries

        q_images = load_queries(queries, view.shape)[0]
    check_compatible(q_images, view.shape)
    return q_images


def exact_attribution(
    corpus: Store | str | Path | torch.Tensor | np.ndarray,
    queries,
    *,
    timesteps: int | Sequence[int],
    scales: Sequence[ScaleLike],
    alpha: float | None = None,
    topk: int | None = None,
    seed: int = 0,
    noise_draws: int = 1,
    schedule: str | NoiseSchedule = "linear",
    device: str | torch.device = "auto",
    precision: str = "float64",
    maps_for: int | None = None,
    memory_budget: int | str = "1G",
    progress: bool = False,
    keep_mass: bool = False,
) -> ExactResult:
    """Exact NDA scores of ``queries`` against ``corpus`` (N, C, H, W), a Store or a store's path.

    ``queries``: (Q, C, H, W) floats in [-1, 1], or what ``Attributor.attribute`` takes (image paths,
    folders, PIL images, uint8 arrays, a list of these; see ``as_queries``).

    Returns an ExactResult whose ``scores`` are (T, Q, N) float64; ``maps_for=K`` also keeps the
    per-pixel contribution maps of the top K images of each query, at each timestep and by mean;
    ``keep_mass`` also keeps each image's softmax mass without topk (``mass``, (T, Q, N)).
    """
    view = CorpusView(corpus)
    q_images = as_queries(queries, view)
    sched = schedule if isinstance(schedule, NoiseSchedule) else NoiseSchedule(schedule)
    ts = [sched.check_timestep(t) for t in ([timesteps] if isinstance(timesteps, int) else list(timesteps))]
    if not ts:
        raise ValueError("at least one timestep is needed")
    scale_list = parse_scales(scales)
    weights = scale_weights(scale_list, alpha)
    if topk is not None and (int(topk) != topk or topk < 1):
        raise ValueError(f"topk must be a positive integer, got {topk}")
    if noise_draws < 1:
        raise ValueError(f"noise_draws must be at least 1, got {noise_draws}")
    size = view.shape[1]
    groups = {sc: layout_groups(size, sc) for sc in scale_list}
    dev, dtype = resolve_device(device), resolve_dtype(precision)
    budget = parse_bytes(memory_budget)
    nq, n = q_images.shape[0], view.count
    npos = {sc: sc.grid(size) ** 2 for sc in scale_list}
    log.info("exact scorer: %d queries x %d images, scales %s, on %s, kernel %s", nq, n, [str(s) for s in scale_list], describe_device(dev),
             describe_kernel(dev, dtype))

    scores = np.zeros((len(ts), nq, n), dtype=np.float64)
    masses = np.zeros_like(scores) if keep_mass else None
    log_norms: dict[tuple[int, int, Scale], torch.Tensor] = {}
    bar = tqdm(total=len(ts) * noise_draws * len(scale_list) * n, unit="img", disable=not progress, desc="exact")
    for ti, t in enumerate(ts):
        s, sigma2 = sched.signal_and_noise(t)
        inv = 1.0 / (2.0 * sigma2)
        for d in range(noise_draws):
            noisy = noise_images(q_images.to(torch.float32), t, sched, seed, d).to(dev, dtype)
            for sc, w in zip(scale_list, weights):
                qp = extract_patches(noisy, sc)
                step = chunk_size(nq, groups[sc], dtype, budget)
                one_pass = nq * npos[sc] * n * torch.finfo(dtype).bits // 8 * (2 if keep_mass and topk else 1) <= budget

                per_image, log_z, mass = scan_corpus(view, qp, sc, groups[sc], s, inv, topk, step, one_pass, bar, keep_mass)
                log_norms[(ti, d, sc)] = log_z
                scores[ti] += (w / noise_draws) * per_image.double().cpu().numpy()
                if keep_mass:
                    masses[ti] += (w / noise_draws) * mass.double().cpu().numpy()
    bar.close()
    if kernel_path(dev, dtype) == "conv":
        log.info("exact scorer: conv interior layout %s (conv_layout.py)", ", ".join(layouts_chosen()) or "none needed")

    result = ExactResult(scores, ts, scale_list, weights, describe_device(dev), mass=masses)
    if maps_for:
        _keep_maps(result, view, q_images, sched, groups, log_norms, seed, noise_draws, topk, dev, dtype, int(maps_for))
    return result


def scan_corpus(view: CorpusView, qp: torch.Tensor, sc: Scale, groups: list, s: float, inv: float, topk: int | None,
                step: int, one_pass: bool, bar=None, with_mass: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Every query patch qp (Q, L, D) against every same-layout patch of the corpus, in chunks of
    ``step`` images: (per_image (Q, N) sum over positions of each image's softmax mass, log_z (Q, L)
    log normalisers, and with ``with_mass`` the per-image masses without topk (Q, N), else None). ``one_pass`` keeps the (Q, L, N) masses between the passes (they fit the
    budget); otherwise a second pass recomputes them under the final normaliser."""
    n = view.count
    chunks = [(lo, min(lo + step, n)) for lo in range(0, n, step)]

    def images(lo: int, hi: int) -> torch.Tensor:
        return view.images_on(np.arange(lo, hi), qp.device, qp.dtype) * s

    path = kernel_path(qp.device, qp.dtype)
    scan = MassScan(qp, groups, inv, max_logits(qp, images(0, min(SHIFT_SAMPLE, n)), sc, groups, inv), topk, sc, path)
    z = torch.zeros(qp.shape[:2], dtype=torch.float64, device=qp.device)
    kept: list[torch.Tensor] = []
    kept_full: list[torch.Tensor] = []
    for lo, hi in chunks:
        full, agg, rescale = scan.add(images(lo, hi))
        if rescale is not None:
            z *= rescale.double()
            kept = [a * rescale[..., None] for a in kept]
            kept_full = [a * rescale[..., None] for a in kept_full]
        z += full.sum(-1, dtype=torch.float64)
        if one_pass:
            kept.append(agg)
            if with_mass and agg is not full:
                kept_full.append(full)
            if bar is not None:
                bar.update(hi - lo)
    log_z = z.log() + scan.shift.double()  # (Q, L)
    norm = torch.exp(scan.shift.double() - log_z).to(qp.dtype)[..., None]  # (Q, L, 1)
    mass = None
    if one_pass:
        per_image = torch.cat([(a * norm).sum(1) for a in kept], dim=-1)
        if with_mass:
            mass = per_image if not kept_full else torch.cat([(a * norm).sum(1) for a in kept_full], dim=-1)
    else:
        final = MassScan(qp, groups, inv, log_z.to(qp.dtype), topk, sc, path)  # shift = log Z: masses come out normalised
        per_image = torch.empty((qp.shape[0], n), dtype=qp.dtype, device=qp.device)
        mass = torch.empty_like(per_image) if with_mass else None
        for lo, hi in chunks:
            full, agg, _ = final.add(images(lo, hi))
            per_image[:, lo:hi] = agg.sum(1)
            if mass is not None:
                mass[:, lo:hi] = full.sum(1)
            if bar is not None:
                bar.update(hi - lo)
    return per_image, log_z.to(qp.dtype), mass


def _keep_maps(result: ExactResult, view: CorpusView, q_images: torch.Tensor, sched: NoiseSchedule, groups: dict, log_norms: dict, seed: int, noise_draws: int, topk: int | None, dev: torch.device, dtype: torch.dtype, k: int) -> None:
    """Per-pixel maps a(u, n) of the top k images of each query at each timestep and by their mean
    over timesteps, at every timestep (second, small pass)."""
    size = view.shape[1]
    by_mean = np.argsort(-result.scores.mean(0), axis=1, kind="stable")[:, :k]  # (Q, k)
    for ti, t in enumerate(result.timesteps):
        s, sigma2 = sched.signal_and_noise(t)
        by_t = np.argsort(-result.scores[ti], axis=1, kind="stable")[:, :k]
        top = [np.unique(np.concatenate([a, b])) for a, b in zip(by_t, by_mean)]  # per query, sorted
        ids = np.unique(np.concatenate(top))
        images = view.take(ids).to(dev, dtype) * s
        maps = torch.zeros((q_images.shape[0], len(ids), size, size), dtype=torch.float64)
        for d in range(noise_draws):
            noisy = noise_images(q_images.to(torch.float32), t, sched, seed, d).to(dev, dtype)
            for sc, w in zip(result.scales, result.weights):
                # shift = log Z: the masses come out as softmax weights
                scan = MassScan(extract_patches(noisy, sc), groups[sc], 1.0 / (2 * sigma2), log_norms[(ti, d, sc)], topk, sc,
                                kernel_path(dev, dtype))
                a = scan.add(images)[1]  # (Q, L, len(ids))
                g = sc.grid(size)
                grid = a.permute(0, 2, 1).reshape(a.shape[0], len(ids), g, g)
                maps += (w / noise_draws) * positions_to_pixels(grid, sc, size).double().cpu()
        col = {int(i): c for c, i in enumerate(ids)}
        for q in range(len(top)):
            sel = [col[int(i)] for i in top[q]]
            result.kept_maps[(ti, q)] = (top[q], maps[q, sel].numpy())


def exact_scores(corpus, queries, *, timesteps, scales, alpha=None, topk=None, seed=0, noise_draws=1, schedule="linear", device="auto", **kwargs) -> np.ndarray:
    """Exact NDA scores, a (T, Q, N) float64 array; see ``exact_attribution`` for the options."""
    return exact_attribution(
        corpus, queries, timesteps=timesteps, scales=scales, alpha=alpha, topk=topk, seed=seed,
        noise_draws=noise_draws, schedule=schedule, device=device, **kwargs,
    ).scores


def patch_weights(
    corpus: Store | str | Path | torch.Tensor | np.ndarray,
    query,
    position: int,
    *,
    timestep: int,
    scale: ScaleLike,
    seed: int = 0,
    draw: int = 0,
    schedule: str | NoiseSchedule = "linear",
) -> np.ndarray:
    """Softmax weights w(u; n, v) of one query position u over every candidate: (N, grid * grid).

    For inspection ("which training patches does this query patch draw on"); zero outside u's
    layout class. Computed in float64 on the CPU; corpus must fit in memory.
    """
    view = CorpusView(corpus)
    q = as_queries(query, view, "query")[:1]
    sched = schedule if isinstance(schedule, NoiseSchedule) else NoiseSchedule(schedule)
    sc = Scale.parse(scale)
    s, sigma2 = sched.signal_and_noise(timestep)
    size = view.shape[1]
    group = next(g for g in layout_groups(size, sc) if int(position) in set(g.positions.tolist()))
    qp = extract_patches(noise_images(q.float(), timestep, sched, seed, draw).double(), sc)[0, position]
    cp = extract_patches(view.rows(0, view.count).double() * s, sc)[:, group.positions]  # (N, V, D)
    logits = -(cp - qp).square().sum(-1) / (2 * sigma2)
    w = torch.softmax(logits.flatten(), 0).view_as(logits)
    out = torch.zeros((view.count, sc.grid(size) ** 2), dtype=torch.float64)
    out[:, group.positions] = w
    return out.numpy()
