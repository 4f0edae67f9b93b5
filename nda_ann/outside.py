"""The non-candidates' share of the softmax normaliser (SPEC section 4), estimated from sampled patches.

At each query position u the normaliser is Z(u) = candidates' mass (exact, from the re-scoring)
+ the non-candidates' mass. The latter splits into
- R(u): the non-candidates' patches retrieved for u, whose exact logits are known, and
- the rest, estimated from a uniform random sample (without replacement) of the non-candidates'
  (image, position) pairs of u's layout class, excluding the pairs already counted in R(u), each standing for
  population / sample size pairs.
The estimate is unbiased whatever the index returned (the exclusion is by identity, not by
distance), and its variance is small where it matters: the nearest patches, which hold most of
the mass at small t, are in R(u) exactly, and single patches drawn from many images vary far less
than whole images (whose neighbouring patches overlap and move together).
"""
from __future__ import annotations

import math
import numpy as np
import torch

from .patches import LayoutGroup
from .scales import Scale


def draw_pairs(n: int, cand: np.ndarray, positions: np.ndarray, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(image ids (S,), positions (S,)): ``size`` distinct pairs drawn uniformly without replacement
    from (range(n) minus the sorted ``cand``) x ``positions``; all of them when size >= population."""
    free = n - len(cand)
    population = free * len(positions)
    size = min(size, population)
    flat = np.sort(rng.choice(population, size, replace=False)) if size < population else np.arange(population)
    rank, at = np.divmod(flat, len(positions))
    # the rank-th non-candidate: rank + the number of candidates before it
    ids = rank + np.searchsorted(cand - np.arange(len(cand)), rank, side="right")
    return ids.astype(np.int64), positions[at]


def _counted(keys: np.ndarray, known_keys: np.ndarray) -> np.ndarray:
    """(U, S) bool: sampled pair j (keys (S,)) is among query row u's known keys (U, K') (-1 = none)."""
    uniq, inverse = np.unique(keys, return_inverse=True)
    idx = np.searchsorted(uniq, known_keys).clip(max=len(uniq) - 1)
    hit = (uniq[idx] == known_keys) & (known_keys >= 0)
    mask = np.zeros((known_keys.shape[0], len(uniq)), dtype=bool)
    rows = np.broadcast_to(np.arange(known_keys.shape[0])[:, None], known_keys.shape)
    mask[rows[hit], idx[hit]] = True
    return mask[:, inverse]


def estimate_outside(
    corpus,
    query_patches: torch.Tensor,
    groups: list[LayoutGroup],
    scale: Scale,
    s: float,
    inv_two_sigma2: float,
    cand: np.ndarray,
    known_image: np.ndarray,
    known_position: np.ndarray,
    per_class: int,
    rng: np.random.Generator,
) -> torch.Tensor:
    """(L,) float64: log of the estimated mass of the non-candidates' patches not counted in R(u),
    from ``per_class`` sampled (image, position) pairs per layout class (-inf where none).

    query_patches: (L, D) noised query patch vectors (device and dtype of the computation);
    cand: sorted candidate ids; known_image / known_position: (L, K') the pairs counted exactly in
    R(u) (-1 where none). ``corpus`` is a ``CorpusView``.
    """
    n = corpus.count
    npos = query_patches.shape[0]
    dev, dtype = query_patches.device, query_patches.dtype
    log_mass = torch.full((npos,), -math.inf, dtype=torch.float64)
    known_keys = np.where(known_image >= 0, known_image.astype(np.int64) * npos + known_position, -1)
    q_norms = query_patches.square().sum(-1)
    for group in groups:
        pos = group.positions
        population = (n - len(cand)) * len(pos)
        size = min(int(per_class), population)
        if size <= 0:
            continue
        ids, at = draw_pairs(n, cand, pos.numpy(), size, rng)
        y = corpus.patch_vectors(ids, at, scale).to(dev, dtype) * s  # (S, D)
        q = query_patches[pos]
        logits = torch.addmm(y.square().sum(-1)[None], q, y.T, beta=-1.0, alpha=2.0)
        logits = logits.sub_(q_norms[pos][:, None]).mul_(inv_two_sigma2).double().cpu()  # (U, S)
        logits[torch.from_numpy(_counted(ids * npos + at, known_keys[pos.numpy()]))] = -math.inf
        log_mass[pos] = torch.logsumexp(logits, -1) + math.log(population / size)
    return log_mass
