"""An independent, loop-based float64 reference of docs/scores.md sections 1-3, for tiny sizes only.

It shares no code with nda_ann: patches are cut pixel by pixel, the layout rule is applied by
comparing sets of out-of-image offsets, and distances are plain sums of squared differences.
"""
from __future__ import annotations

import math

import numpy as np
import torch


def alpha_bar(t: int, schedule: str = "linear") -> float:
    if schedule == "linear":
        betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float32)
    elif schedule == "scaled_linear":
        betas = np.linspace(1e-4**0.5, 0.02**0.5, 1000, dtype=np.float32) ** 2
    else:
        f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        betas = np.array([min(1 - f((i + 1) / 1000) / f(i / 1000), 0.999) for i in range(1000)], dtype=np.float32)
    # docs/scores.md 1: float32 betas and torch's float32 cumulative product (as diffusers and the paper's code)
    return float(torch.cumprod(1 - torch.from_numpy(betas), dim=0)[t])


def eps(shape, t: int, seed: int) -> np.ndarray:
    g = torch.Generator("cpu").manual_seed(seed * 1000 + t)
    return torch.randn(shape, generator=g, dtype=torch.float32).double().numpy()


def cut(img: np.ndarray, i: int, j: int, p: int, f: int):
    """Patch at grid position (i, j): (vector, layout) with out-of-image pixels zero; f-projected."""
    c, h, w = img.shape
    r = (p - 1) // 2
    patch = np.zeros((c, p, p))
    outside = []
    for a in range(p):
        for b in range(p):
            y, x = i - r + a, j - r + b
            if 0 <= y < h and 0 <= x < w:
                patch[:, a, b] = img[:, y, x]
            else:
                outside.append((a, b))
    if f > 1:
        m = p // f
        proj = np.zeros((c, m, m))
        for a in range(m):
            for b in range(m):
                proj[:, a, b] = patch[:, a * f : (a + 1) * f, b * f : (b + 1) * f].sum(axis=(1, 2)) / f
        patch = proj
    return patch.ravel(), frozenset(outside)


def naive_scale_scores(corpus: np.ndarray, query: np.ndarray, t: int, p: int, f: int, topk=None, seed: int = 0, schedule: str = "linear"):
    """(N,) scores and (G*G, N) per-position masses of one query at one scale and timestep."""
    ab = alpha_bar(t, schedule)
    s, sig2 = math.sqrt(ab), 1 - ab
    xt = s * query + math.sqrt(sig2) * eps(query.shape, t, seed)
    n, _, h, _ = corpus.shape
    r = (p - 1) // 2
    g = h + 2 * r - p + 1
    cands = [[cut(s * corpus[k], i, j, p, f) for i in range(g) for j in range(g)] for k in range(n)]
    per_pos = np.zeros((g * g, n))
    for u in range(g * g):
        qv, qlay = cut(xt, u // g, u % g, p, f)
        logits = np.full((n, g * g), -np.inf)
        for k in range(n):
            for v, (cv, clay) in enumerate(cands[k]):
                if clay == qlay:
                    logits[k, v] = -np.sum((qv - cv) ** 2) / (2 * sig2)
        w = np.exp(logits - logits.max())
        w /= w.sum()
        for k in range(n):
            wk = np.sort(w[k])[::-1]
            per_pos[u, k] = wk[:topk].sum() if topk else wk.sum()
    return per_pos.sum(0), per_pos
