"""The non-candidates' unretrieved mass estimated from whole sampled images (the default estimator).

outside.py's pair sampler scores one random position of each sampled image per layout class. At a
query position u the mass of a near-copy sits at the few positions v where its content matches u's,
which a random v almost never hits: the estimate of the outside share is then typically far below the
truth (measured at 100k crops: 0.51 against 0.81), and the rounds would stop too early. Here each
sampled image is scored at every position with the re-scoring kernel (cheap for the many dissimilar
images, whose rows the bfloat16 screen drops), so the only variance left is which images are drawn.

Z_out(u) = R(u) + sum over draws j of w_j (full_j(u) - known_j(u)), where full_j(u) is image j's exact
mass at u, known_j(u) the part of it already in R(u) (its retrieved patches), and w_j = 1 / (S p_j) the
Hansen-Hurwitz weight of the ``Guide`` draw: unbiased whatever the index retrieved.
"""
from __future__ import annotations

import numpy as np
import torch

from ..scoring.scales import Scale
from .outside import Guide, OutsideSample, non_candidates
from .rescore import PositionScan


def sample_images(corpus, query_patches: torch.Tensor, groups: list, scale: Scale, s: float, inv: float, known: tuple,
                  size: int, guide: Guide, rng: np.random.Generator, step: int, hint: torch.Tensor | None = None) -> OutsideSample:
    """The estimate from ``size`` drawn non-candidate images, each scored at every position.

    query_patches: (1, L, D) noised patch vectors (device and dtype of the computation); known: (logits
    (L, K'), image (L, K'), position (L, K')) of the retrieved non-candidates' patches (known.py);
    hint (L,): a lower bound of each position's largest logit. Every non-candidate is taken (weight 1)
    when there are at most ``size``: the estimate is then exact.
    """
    npos = query_patches.shape[1]
    if guide.free <= 0 or size <= 0:
        return OutsideSample(np.zeros(0, dtype=np.int64), torch.zeros((npos, 0), dtype=torch.float64))
    if guide.free <= size:
        ids, log_w = non_candidates(guide.cand, np.arange(guide.free)), np.zeros(guide.free)
    else:
        ids, log_w = guide.draw(size, rng)
    uniq, inverse = np.unique(ids, return_inverse=True)
    scan = PositionScan(query_patches, scale, groups, inv, None, hint)
    for lo in range(0, len(uniq), step):
        scan.add(corpus.images_on(uniq[lo : lo + step], query_patches.device, query_patches.dtype) * s)
    full = torch.cat(scan.aggs, -1).double().cpu()  # (L, U): each sampled image's mass, relative to the shift
    shift = scan.scan.shift[0].double().cpu()
    logits, img, _ = known
    col = np.searchsorted(uniq, img).clip(max=len(uniq) - 1)
    hit = (uniq[col] == img) & (img >= 0)
    rows, ks = np.nonzero(hit)
    if len(rows):  # the sampled images' retrieved patches are in R(u) already
        w = torch.from_numpy(logits[rows, ks]).sub_(shift[torch.from_numpy(rows)]).exp_()
        full.index_put_((torch.from_numpy(rows), torch.from_numpy(col[rows, ks])), -w, accumulate=True)
    log_contrib = full.clamp_min_(0.0).log_()[:, torch.from_numpy(inverse)] + shift[:, None] + torch.from_numpy(log_w)[None]
    return OutsideSample(ids, log_contrib)
