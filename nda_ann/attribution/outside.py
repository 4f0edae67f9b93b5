"""The non-candidates' share of the softmax normaliser (docs/scores.md section 5), estimated from sampled patches.

At each query position u the normaliser is Z(u) = candidates' mass (exact, from the re-scoring)
+ the non-candidates' mass. The latter splits into
- R(u): the non-candidates' patches retrieved for u, whose exact logits are known, and
- the rest, estimated from sampled (image, position) pairs of u's layout class: S non-candidate
  images (``Guide``: uniform, or weighted towards those whose patches were retrieved), one random
  position of each per class, the pairs already counted in R(u) excluded, each pair weighted by
  how many it stands for.
The estimate is unbiased whatever the index returned (the exclusion is by identity, not by
distance), and its variance is small where it matters: the nearest patches, which hold most of
the mass at small t, are in R(u) exactly; one pair per image varies far less than whole images
(whose neighbouring patches overlap and move together); the guide samples more where near-copies
are likely. Each sampled image is read once for all classes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..scoring.patches import LayoutGroup, patch_view
from ..scoring.scales import Scale


def non_candidates(cand: np.ndarray, rank: np.ndarray) -> np.ndarray:
    """The ``rank``-th non-candidates (rank + the number of candidates before each); cand sorted."""
    return rank + np.searchsorted(cand - np.arange(len(cand)), rank, side="right")


class Guide:
    """How the non-candidate images are drawn: uniformly, or (``mass`` given) from the mixture
    share * pi + (1 - share) * uniform, where pi is their share of the retrieved softmax mass.

    Each image drawn stands for 1 / (S * p(image)) images (Horvitz-Thompson for the uniform draw
    without replacement, Hansen-Hurwitz for the mixture, drawn with replacement), so the estimate
    is unbiased whatever pi is; the mixture puts the samples where near-copies of the query's
    patches are likely: the images some of whose indexed patches were retrieved.
    """

    def __init__(self, n: int, cand: np.ndarray, mass: np.ndarray | None = None, share: float = 0.5):
        self.cand, self.free = np.asarray(cand, dtype=np.int64), n - len(cand)
        self.share = 0.0
        if mass is not None and share > 0:
            pi = np.asarray(mass, dtype=np.float64).copy()
            pi[self.cand] = 0.0
            self.ids = np.nonzero(pi > 0)[0]
            total = float(pi[self.ids].sum())
            if total > 0:
                self.share, self.pi = share, pi / total
                self.cdf = np.cumsum(self.pi[self.ids])

    def draw(self, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """(image ids (S,), log of how many non-candidate images each stands for (S,))."""
        if self.share == 0.0:
            ids = non_candidates(self.cand, rng.choice(self.free, size, replace=False))
            return ids, np.full(size, math.log(self.free / size))
        from_pi = rng.random(size) < self.share
        k = int(from_pi.sum())
        ids = np.empty(size, dtype=np.int64)
        ids[from_pi] = self.ids[np.searchsorted(self.cdf, rng.random(k) * self.cdf[-1], side="right").clip(max=len(self.ids) - 1)]
        ids[~from_pi] = non_candidates(self.cand, rng.integers(0, self.free, size - k))
        p = self.share * self.pi[ids] + (1 - self.share) / self.free
        return ids, -np.log(size * p)


_FILTER_BITS = 16  # the hash table that screens known keys before the exact look-up (64 KiB)


def _counted(keys: np.ndarray, known_keys: np.ndarray) -> np.ndarray:
    """(U, S) bool: sampled pair j (keys (S,)) is among query row u's known keys (U, K') (-1 = none).

    The known keys (U x K', 692k for the interior class at K = 1,024) are first screened by their
    low bits against a 2^16-slot table of the sampled keys; only the few that pass are looked up
    exactly (10x faster than looking every known key up: 46 -> 5 ms for 512 keys, 676 x 1,024 known).
    """
    uniq, inverse = np.unique(keys, return_inverse=True)
    mask = np.zeros((known_keys.shape[0], len(uniq)), dtype=bool)
    low = (1 << _FILTER_BITS) - 1
    table = np.zeros(low + 1, dtype=bool)
    table[uniq & low] = True
    rows, cols = np.nonzero(table[known_keys & low] & (known_keys >= 0))
    cand = known_keys[rows, cols]
    idx = np.searchsorted(uniq, cand).clip(max=len(uniq) - 1)
    hit = uniq[idx] == cand
    mask[rows[hit], idx[hit]] = True
    return mask[:, inverse]


def smoothed_share(log_z_in: torch.Tensor, log_known_out: torch.Tensor, log_sampled: torch.Tensor, sigma: float,
                   concentration: torch.Tensor | None = None) -> torch.Tensor:
    """(L,) the share of the normaliser outside the candidates at each query position, with the sampled
    part's ratio to the known part drawn towards its neighbours' where it rests on few draws.

    log_z_in, log_known_out, log_sampled (L,): logs of the candidates' mass, the non-candidates' retrieved
    (known) mass and their sampled estimate of the rest; concentration (L,) in [0, 1]
    (``OutsideSample.concentration``; None: 1). With K = Z_in + R the known part of the normaliser and
    rho = sampled / K, the share is (R / K + rho~) / (1 + rho~), where rho~ = (1 - c) rho + c smooth(rho)
    (sigma 0: rho itself, the plain Z_out / Z).

    Why: at one position the sampled mass comes from the few drawn images that match there, so its
    estimate is unbiased but heavy-tailed, and the share, a concave function of it, reads low (Jensen):
    -0.05 to -0.07 on average at 5k crops on the million recipe with 128 images, worse at 100k.
    Overlapping query patches have close outside masses relative to their known ones; the ratio (not
    the mass, whose scale varies by orders of magnitude between positions) borrows from neighbours,
    in proportion to how little its own estimate rests on (where many draws contribute evenly, as when
    the sample covers much of a small corpus, it stays as it is). Measured in docs/benchmarks/outside.md.
    """
    log_k = torch.logaddexp(log_z_in, log_known_out)
    known_share = torch.exp(log_known_out - log_k).nan_to_num_(0.0)
    log_rho = (log_sampled - log_k).nan_to_num_(nan=-math.inf)  # -inf - -inf: nothing known, nothing sampled
    rho = torch.exp(log_rho).nan_to_num_(0.0)
    smooth = torch.exp(smooth_over_positions(log_rho, sigma)).nan_to_num_(0.0)
    c = torch.ones_like(rho) if concentration is None else concentration.to(rho)
    rho = (1.0 - c) * rho + c * smooth
    return (known_share + rho) / (1.0 + rho)


def smooth_over_positions(log_mass: torch.Tensor, sigma: float) -> torch.Tensor:
    """(L,) log masses on the square grid of query positions (row-major), Gaussian-smoothed in the
    linear domain (standard deviation ``sigma`` positions, radius ceil(3 sigma), edges replicated);
    returned unchanged where sigma is 0 or L is not a square."""
    g = math.isqrt(log_mass.shape[0])
    finite = torch.isfinite(log_mass)
    if sigma <= 0 or g * g != log_mass.shape[0] or not bool(finite.any()):
        return log_mass
    top = log_mass[finite].max()
    x = torch.exp(log_mass - top).view(1, 1, g, g)
    radius = max(1, math.ceil(3 * sigma))
    taps = torch.exp(-torch.arange(-radius, radius + 1, dtype=x.dtype) ** 2 / (2 * sigma * sigma))
    taps = taps / taps.sum()
    x = torch.nn.functional.pad(x, (radius, radius, radius, radius), mode="replicate")
    x = torch.nn.functional.conv2d(x, taps.view(1, 1, 1, -1))
    x = torch.nn.functional.conv2d(x, taps.view(1, 1, -1, 1))
    return x.view(-1).log() + top


@dataclass
class OutsideSample:
    """Sampled non-candidate images ``ids`` (S,) and each one's weighted log mass at every query
    position ``log_contrib`` (L, S) float64 (-inf where none): the estimate of the non-candidates'
    unretrieved mass is their logsumexp over images. Excluding images that later became candidates
    keeps it unbiased for the rest (membership follows the retrieval, not the draw).

    ``smoothing`` > 0: the outside share reads this estimate smoothed over neighbouring query positions
    (``smoothed_share``); the normaliser of the scores and the tail keep it as it is.
    """

    ids: np.ndarray
    log_contrib: torch.Tensor
    smoothing: float = 0.0
    exact: bool = False  # every non-candidate was taken, each standing for itself

    @classmethod
    def pooled(cls, samples: list["OutsideSample"]) -> "OutsideSample":
        """One estimate from several independent samples of the same query position grid, each an
        unbiased estimate of the mass outside the current candidates (drawn against earlier, smaller
        candidate sets, with the images since re-scored left out): their average weighted by draws,
        sum_k (S_k / S) E_k, so every draw j of sample k stands for 1 / (S p_k(j)) images."""
        drawn = [x for x in samples if len(x.ids)]
        if len(drawn) <= 1:
            return drawn[0] if drawn else samples[0]
        total = sum(len(x.ids) for x in drawn)
        contrib = torch.cat([x.log_contrib + math.log(len(x.ids) / total) for x in drawn], -1)
        return cls(np.concatenate([x.ids for x in drawn]), contrib, drawn[0].smoothing)

    def _kept(self, exclude: np.ndarray | None) -> torch.Tensor:
        """(L, S') the weighted log masses of the draws not in ``exclude`` (sorted ids)."""
        if exclude is not None and len(exclude) and len(self.ids):
            at = np.searchsorted(exclude, self.ids).clip(max=len(exclude) - 1)
            return self.log_contrib[:, torch.from_numpy(exclude[at] != self.ids)]
        return self.log_contrib

    def log_mass(self, exclude: np.ndarray | None = None) -> torch.Tensor:
        """(L,) log of the estimated mass, leaving out the sampled images in ``exclude`` (sorted ids)."""
        contrib = self._kept(exclude)
        if contrib.shape[1] == 0:
            return torch.full((contrib.shape[0],), -math.inf, dtype=torch.float64)
        return torch.logsumexp(contrib, -1)

    def concentration(self, exclude: np.ndarray | None = None) -> torch.Tensor:
        """(L,) in [0, 1]: how much of each position's estimate rests on few draws, (S h - 1) / (S - 1)
        with h = sum_j c_j^2 / (sum_j c_j)^2 over the S draws kept (c_j: draw j's weighted mass); it is the
        estimate's relative variance (Hansen-Hurwitz). 1 where one draw holds it all or none holds any."""
        contrib = self._kept(exclude)
        n = contrib.shape[1]
        if n < 2:
            return torch.ones(contrib.shape[0], dtype=torch.float64)
        total = torch.logsumexp(contrib, -1)
        h = torch.exp(torch.logsumexp(2 * contrib, -1) - 2 * total)
        return ((n * h - 1) / (n - 1)).nan_to_num_(1.0).clamp_(0.0, 1.0)


def estimate_outside(corpus, query_patches: torch.Tensor, groups: list[LayoutGroup], scale: Scale, s: float,
                     inv_two_sigma2: float, known_image: np.ndarray, known_position: np.ndarray, size: int,
                     guide: Guide, rng: np.random.Generator, budget: int = 256 << 20) -> torch.Tensor:
    """(L,) float64: log of the estimated mass of the non-candidates' patches not counted in R(u)
    (-inf where none); ``sample_pairs(...).log_mass()``."""
    return sample_pairs(corpus, query_patches, groups, scale, s, inv_two_sigma2, known_image, known_position,
                        size, guide, rng, budget).log_mass()


def sample_pairs(
    corpus,
    query_patches: torch.Tensor,
    groups: list[LayoutGroup],
    scale: Scale,
    s: float,
    inv_two_sigma2: float,
    known_image: np.ndarray,
    known_position: np.ndarray,
    size: int,
    guide: Guide,
    rng: np.random.Generator,
    budget: int = 256 << 20,
) -> OutsideSample:
    """The sampled estimate of the non-candidates' patches not counted in R(u), per sampled image.

    ``size`` non-candidate images are drawn (``guide``) and read once; each layout class then takes
    one uniformly drawn position of its own from each, and each pair stands for |class| / (S p)
    pairs. When there are at most ``size`` non-candidates, all are taken, and a class whose pairs
    number at most ``size`` has every pair scored: its estimate is then exact.
    query_patches: (L, D) noised query patch vectors (device and dtype of the computation);
    known_image / known_position: (L, K') the pairs counted exactly in R(u) (-1 where none).
    ``corpus`` is a ``CorpusView``. Images are read in chunks whose pixels and logits fit ``budget``.
    """
    npos = query_patches.shape[0]
    dev, dtype = query_patches.device, query_patches.dtype
    if guide.free <= 0 or size <= 0:
        return OutsideSample(np.zeros(0, dtype=np.int64), torch.zeros((npos, 0), dtype=torch.float64))
    every_image = guide.free <= size
    if every_image:  # each non-candidate stands for itself
        ids, log_w = non_candidates(guide.cand, np.arange(guide.free)), np.zeros(guide.free)
    else:
        ids, log_w = guide.draw(size, rng)
    contrib = torch.full((npos, len(ids)), -math.inf, dtype=torch.float64)
    exhaustive = [every_image and len(ids) * len(g) <= size for g in groups]
    known_keys = np.where(known_image >= 0, known_image.astype(np.int64) * npos + known_position, -1)
    q_norms = query_patches.square().sum(-1)
    pixels = 4 * int(np.prod(corpus.shape))
    per_image = pixels + 16 * max(len(g) * (len(g) if ex else 1) for g, ex in zip(groups, exhaustive))
    step = max(1, budget // per_image)
    for lo in range(0, len(ids), step):
        chunk, chunk_w = ids[lo : lo + step], log_w[lo : lo + step]
        view = patch_view(corpus.take(chunk).to(dev, dtype) * s, scale)  # (b, G, G, C, m, m), no copy
        grid = view.shape[1]
        for group, ex in zip(groups, exhaustive):
            pos = group.positions
            if ex:  # every (image, position) pair of the class
                img_idx = np.repeat(np.arange(len(chunk)), len(pos))
                at = np.tile(pos.numpy(), len(chunk))
                pair_w = chunk_w[img_idx]
            else:  # one position per image drawn, standing for the class's |pos| positions
                img_idx = np.arange(len(chunk))
                at = pos.numpy()[rng.integers(0, len(pos), len(chunk))]
                pair_w = chunk_w + math.log(len(pos))
            at_t = torch.from_numpy(at)
            y = view[torch.from_numpy(img_idx), at_t // grid, at_t % grid].reshape(len(at), -1)  # (P, D)
            q = query_patches[pos]
            logits = torch.addmm(y.square().sum(-1)[None], q, y.T, beta=-1.0, alpha=2.0)
            logits = logits.sub_(q_norms[pos][:, None]).mul_(inv_two_sigma2).double().cpu()  # (U, P)
            logits[torch.from_numpy(_counted(chunk[img_idx] * npos + at, known_keys[pos.numpy()]))] = -math.inf
            per_pair = (logits + torch.from_numpy(pair_w)[None]).view(len(pos), len(chunk), -1)  # (U, b, pairs per image)
            block = contrib[pos, lo : lo + len(chunk)]
            contrib[pos, lo : lo + len(chunk)] = torch.logaddexp(block, torch.logsumexp(per_pair, -1))
    return OutsideSample(ids, contrib)


def sample_outside(corpus, cand: np.ndarray, known: dict, patches: dict, groups: dict, scales: list, s: float, sigma2: float,
                   size: int, seed: tuple[int, int], mass: np.ndarray, guide_share: float, budget: int,
                   estimator: str = "images", hints: dict | None = None, step: int = 64, smoothing: float = 0.0,
                   round_: int = 0) -> dict:
    """Per (draw, scale): the ``OutsideSample`` estimating the non-candidates' patches not counted in
    ``known`` (known.py), from ``size`` sampled images; {} when there is nothing to estimate.
    ``estimator`` "images" scores each sampled image at every position (outside_images.py; ``hints``
    per (draw, scale) (L,) lower bounds of each position's largest logit, ``step`` images a chunk),
    "pairs" one position of each per layout class (``sample_pairs``). ``smoothing``: see ``OutsideSample``
    (not applied where every non-candidate is taken: the estimate is then exact).
    The draws depend only on (seed, t, draw, scale) and, for a top-up drawn in a later round
    (``round_`` > 0), that round, not on the query's place in its batch.
    ``patches``: the query's (1, L, D) noised patch vectors per (draw, scale)."""
    from .outside_images import sample_images

    if size <= 0 or len(cand) >= corpus.count:
        return {}
    if estimator not in ("images", "pairs"):
        raise ValueError(f"outside estimator must be 'images' or 'pairs', got {estimator!r}")
    guide = Guide(corpus.count, cand, mass, guide_share)
    out = {}
    for (d, sc), qp in patches.items():
        rng = np.random.default_rng([*seed, d, scales.index(sc)] + ([round_] if round_ else []))
        inv = 1.0 / (2.0 * sigma2)
        if estimator == "images":
            hint = None if hints is None else hints.get((d, sc))
            out[(d, sc)] = sample_images(corpus, qp, groups[sc], sc, s, inv, known[(d, sc)], size, guide, rng, step, hint)
        else:
            _, img, pos = known[(d, sc)]
            out[(d, sc)] = sample_pairs(corpus, qp[0], groups[sc], sc, s, inv, img, pos, size, guide, rng, budget)
        if guide.free > size:
            out[(d, sc)].smoothing = smoothing
        else:
            out[(d, sc)].exact = True
    return out


def top_up(sampled: dict, fresh: dict) -> dict:
    """Per (draw, scale): the earlier sample pooled with a fresh one drawn against the current
    candidates (``OutsideSample.pooled``); an exact sample (every non-candidate taken) replaces, and
    is kept over, a sampled one."""
    out = dict(sampled)
    for key, new in fresh.items():
        old = out.get(key)
        if old is None or new.exact:
            out[key] = new
        elif not old.exact:
            out[key] = OutsideSample.pooled([old, new])
    return out
