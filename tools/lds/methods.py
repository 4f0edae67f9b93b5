"""Attribution methods compared by LDS. Each returns scores (Q, N): higher = more credit to image n.

- exact NDA (nda_ann.scoring.exact) at one scale or two fused scales, one timestep;
- index NDA: ``Attributor`` over a ``TorchFlatSearch`` (no FAISS build), default k, M candidates;
- raw pixels: negative squared L2 distance, cosine similarity;
- TRAK-style: randomly projected per-example gradients on the full model, scored
  phi_q^T (Phi^T Phi + lambda I)^-1 phi_n (Park et al. 2023, eq. 16, one model, Q = I as in
  D-TRAK); with the diffusion loss ("trak") or D-TRAK's squared-norm output ("dtrak",
  Zheng et al. 2024), both over fixed timesteps and noise;
- random: i.i.d. Gaussian scores.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from nda_ann.scoring.schedule import NoiseSchedule

from .config import LdsConfig
from .losses import fixed_noise, loss_timesteps

__all__ = ["MethodSpec", "method_specs", "method_key", "nda_exact", "nda_exact_sweep", "nda_index", "pixel_scores", "random_scores", "trak_scores"]


@dataclass(frozen=True)
class MethodSpec:
    """One row of the comparison: ``family`` picks the function, ``params`` its arguments."""

    key: str
    label: str
    family: str  # nda | index | pixel | trak | random
    params: dict[str, Any] = field(default_factory=dict)
    table: bool = True  # False: sweep entries, shown in the sweep grid and plot only


def method_key(*parts: Any) -> str:
    """A filename-safe key: 'nda', 100, '5+8:2' -> 'nda_100_5+8-2'."""
    return re.sub(r"[^A-Za-z0-9+_.-]", "-", "_".join(str(p) for p in parts))


def _scales(spec: str) -> list[str]:
    return [s.strip() for s in spec.split("+")]


def method_specs(config: LdsConfig) -> list[MethodSpec]:
    """Every method of one run, table rows first, then the (t, p) sweep."""
    t0, sc0 = config.nda_default_t, config.nda_default_scale
    specs = [
        MethodSpec("random", "Random", "random", {"seed": config.random_seed}),
        MethodSpec("pixel_l2", "Raw pixels, -L2", "pixel", {"metric": "l2"}),
        MethodSpec("pixel_cos", "Raw pixels, cosine", "pixel", {"metric": "cosine"}),
    ]
    if config.trak:
        specs += [
            MethodSpec("trak", f"TRAK (loss gradients, k={config.trak_dim})", "trak", {"output": "loss"}),
            MethodSpec("dtrak", f"D-TRAK (||eps||^2 gradients, k={config.trak_dim})", "trak", {"output": "square"}),
        ]
    specs.append(MethodSpec(method_key("nda", t0, sc0), f"Exact NDA, p={sc0}, t={t0}", "nda", {"t": t0, "scales": sc0}))
    for two in config.nda_two_scale:
        specs.append(MethodSpec(method_key("nda", t0, two), f"Exact NDA two-scale {two}, t={t0}", "nda", {"t": t0, "scales": two}))
    mean_key = method_key("nda_tmean", sc0)
    specs.append(MethodSpec(mean_key, f"Exact NDA, p={sc0}, mean over t in {{{','.join(map(str, config.nda_sweep_t))}}}", "nda_mean",
                            {"scales": sc0, "ts": list(config.nda_sweep_t)}))
    for m in config.index_candidates:
        specs.append(MethodSpec(method_key("index", t0, sc0, f"M{m}"), f"Index NDA, p={sc0}, t={t0}, k={config.index_k}, M={m}", "index",
                                {"t": t0, "scales": sc0, "candidates": m}))
    seen = {s.key for s in specs}
    for p in config.nda_sweep_p:
        for t in config.nda_sweep_t:
            key = method_key("nda", t, p)
            if key not in seen:
                specs.append(MethodSpec(key, f"Exact NDA, p={p}, t={t}", "nda", {"t": t, "scales": str(p)}, table=False))
    return specs


# ---------------------------------------------------------------------------------------------
def nda_exact_sweep(train: torch.Tensor, queries: torch.Tensor, config: LdsConfig, timesteps: list[int], scales: str, device: torch.device) -> np.ndarray:
    """(T, Q, N) exact NDA scores at several timesteps for one scale spec ('5' or '5+8:2')."""
    from nda_ann.scoring.exact import exact_scores

    sc = _scales(scales)
    return exact_scores(
        train, queries, timesteps=list(timesteps), scales=sc, alpha=0.5 if len(sc) == 2 else None,
        topk=config.nda_topk, seed=config.nda_seed, noise_draws=config.nda_noise_draws, schedule=config.schedule,
        device=device, precision="float32",
    )


def nda_exact(train, queries, config: LdsConfig, t: int, scales: str, device) -> np.ndarray:
    return nda_exact_sweep(train, queries, config, [t], scales, device)[0]


def nda_index(train: torch.Tensor, queries: torch.Tensor, config: LdsConfig, t: int, scales: str, candidates: int, device: torch.device) -> np.ndarray:
    """(Q, N) index NDA: TorchFlatSearch + Attributor at its default settings except k, M, topk."""
    from nda_ann.attribution.attributor import Attributor
    from nda_ann.index.torch_search import TorchFlatSearch

    sc = _scales(scales)
    searcher = TorchFlatSearch(train, sc, device=device)
    attributor = Attributor(searcher, train, sc, device=device)
    result = attributor.attribute(
        queries, timesteps=[t], k=config.index_k, candidates=candidates, topk=config.nda_topk,
        alpha=0.5 if len(sc) == 2 else None, seed=config.nda_seed, noise_draws=config.nda_noise_draws,
        schedule=config.schedule, maps=0,
    )
    return result.scores[0]


def pixel_scores(train: torch.Tensor, queries: torch.Tensor, metric: str) -> np.ndarray:
    """(Q, N) -||x_q - y_n||^2 ("l2") or cos(x_q, y_n) ("cosine") on raw pixels in [-1, 1]."""
    x = queries.flatten(1).double()
    y = train.flatten(1).double()
    if metric == "l2":
        return (-torch.cdist(x, y).square()).numpy()
    if metric == "cosine":
        return (torch.nn.functional.normalize(x, dim=1) @ torch.nn.functional.normalize(y, dim=1).T).numpy()
    raise ValueError(f"unknown pixel metric {metric!r}")


def random_scores(n_queries: int, n_train: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n_queries, n_train))


# --- TRAK ---------------------------------------------------------------------------------
def _projected_gradients(model: torch.nn.Module, images: torch.Tensor, config: LdsConfig, output: str, seed_offset: int, device: torch.device) -> np.ndarray:
    """(n, k) random projections of per-example gradients of the model output function.

    For image i: f_i = mean over the fixed (t, eps) pairs of ||eps - eps_theta(x_t, t)||^2
    ("loss") or ||eps_theta(x_t, t)||^2 ("square"). The projection matrix (P, k), entries
    N(0, 1/k), is generated in parameter blocks from ``config.trak_seed`` and never stored whole
    (on a GPU by the GPU's generator, so CPU and GPU projections differ; each is deterministic).
    Gradients are held for as many examples as fit in 1 GiB (CPU) or 8 GiB (GPU) at a time.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    total = sum(p.numel() for p in params)
    alphas = NoiseSchedule(config.schedule).alphas_cumprod().to(device)
    ts = torch.as_tensor(loss_timesteps(config.trak_timesteps, len(alphas)), device=device)
    noise = fixed_noise(len(images), len(ts), 1, tuple(images.shape[1:]), config.trak_seed * 7 + seed_offset)[:, :, 0]
    a = alphas[ts][:, None, None, None]
    k = config.trak_dim
    out = np.zeros((len(images), k))
    block = max(1, (1 << 24) // k)  # parameters per projection block (64 MiB of float32)
    budget = (8 << 30) if device.type == "cuda" else (1 << 30)
    batch = max(1, min(len(images), budget // (4 * total)))
    for lo in range(0, len(images), batch):
        hi = min(lo + batch, len(images))
        grads = torch.empty((hi - lo, total), device=device)
        for i in range(lo, hi):
            eps = noise[i].to(device)
            xt = a.sqrt() * images[i].to(device)[None] + (1 - a).sqrt() * eps
            pred = model(xt, ts)
            f = (pred - eps).square().mean() if output == "loss" else pred.square().mean()
            g = torch.autograd.grad(f, params)
            grads[i - lo] = torch.cat([x.reshape(-1) for x in g])
        proj = torch.zeros((hi - lo, k), dtype=torch.float64, device=device)
        for b, start in enumerate(range(0, total, block)):
            stop = min(start + block, total)
            gen = torch.Generator(device).manual_seed(config.trak_seed * 1_000_003 + b)
            r = torch.randn((stop - start, k), generator=gen, device=device) / np.sqrt(k)
            proj += (grads[:, start:stop] @ r).double()
        out[lo:hi] = proj.cpu().numpy()
    return out


def trak_scores(model: torch.nn.Module, train: torch.Tensor, queries: torch.Tensor, config: LdsConfig, output: str, device: torch.device) -> np.ndarray:
    """(Q, N) phi_q^T (Phi^T Phi + lambda I)^-1 phi_n with lambda = reg * trace(Phi^T Phi) / k."""
    if output not in ("loss", "square"):
        raise ValueError(f"TRAK output must be 'loss' or 'square', got {output!r}")
    model.eval()
    phi = _projected_gradients(model, train, config, output, 0, device)
    phi_q = _projected_gradients(model, queries, config, output, 1, device)
    gram = phi.T @ phi
    lam = config.trak_reg * np.trace(gram) / gram.shape[0]
    kernel = np.linalg.solve(gram + lam * np.eye(gram.shape[0]), phi.T)  # (k, N)
    return phi_q @ kernel


def compute(spec: MethodSpec, ctx: Any, cached: Callable[[str], np.ndarray | None] | None = None) -> np.ndarray:
    """Scores (Q, N) of one method. ``ctx`` has train, queries, config, device and full_model();
    ``cached(key)`` returns another method's stored scores (for means over the sweep) or None."""
    cfg, p = ctx.config, spec.params
    if spec.family == "random":
        return random_scores(ctx.queries.shape[0], ctx.train.shape[0], p["seed"])
    if spec.family == "pixel":
        return pixel_scores(ctx.train, ctx.queries, p["metric"])
    if spec.family == "nda":
        return nda_exact(ctx.train, ctx.queries, cfg, p["t"], p["scales"], ctx.device)
    if spec.family == "nda_mean":
        parts = []
        for t in p["ts"]:
            got = cached(method_key("nda", t, p["scales"])) if cached else None
            parts.append(got if got is not None else nda_exact(ctx.train, ctx.queries, cfg, t, p["scales"], ctx.device))
        return np.mean(parts, axis=0)
    if spec.family == "index":
        return nda_index(ctx.train, ctx.queries, cfg, p["t"], p["scales"], p["candidates"], ctx.device)
    if spec.family == "trak":
        return trak_scores(ctx.full_model(), ctx.train, ctx.queries, cfg, p["output"], ctx.device)
    raise ValueError(f"unknown method family {spec.family!r}")
