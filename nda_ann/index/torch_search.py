"""Exact layout-aware k-NN over a corpus' patch vectors by GEMM + top-k in torch (CPU or GPU).

A FAISS-free search backend: no index to build, memory bounded by streaming the corpus in chunks
and merging running top-k lists (the pattern of faiss.contrib's knn_ground_truth). On a GPU it is
the fast path for the candidate grid; on the CPU it serves small corpora and tests.
"""
from __future__ import annotations

import numpy as np
import torch

from ..device import resolve_device
from ..errors import InputError
from ..corpus.inputs import CorpusView
from ..scoring.patches import candidate_grid, extract_patches, layout_groups
from ..scoring.scales import Scale
from .search import check_result_size


class TorchFlatSearch:
    """Search API of ``PatchIndex``: ``search(scale, vectors, k) -> (dist, image, position)``."""

    def __init__(self, corpus, scales, *, stride: int = 1, device="auto", chunk_images: int = 256):
        self.corpus = corpus if isinstance(corpus, CorpusView) else CorpusView(corpus)
        self.scales = [Scale.parse(s) for s in scales]
        self.size = self.corpus.shape[1]
        self.stride = stride
        self.device = resolve_device(device)
        self.chunk_images = chunk_images
        self.count = self.corpus.count

    @property
    def coarse_grid(self) -> bool:
        """Whether only a stride grid of positions is searched."""
        return self.stride > 1

    def distances_exact(self, scale) -> bool:
        """Exhaustive float search: the returned distances are the true ones (up to float rounding)."""
        return True

    def search(self, scale: Scale, vectors, k: int, nprobe: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """vectors (Q, L, D) or (L, D) float32 -> dist float32, image int64, position int64, each (..., L, k).

        Squared L2 between the given vectors and unscaled training patches of the same layout;
        padded with inf / -1 where a class holds fewer than k candidates. k is clipped to the most
        candidates any class holds (the last axis is min(k, that)); results that would pass
        ``MAX_RESULT_BYTES`` are refused with an InputError.
        """
        vec = torch.as_tensor(np.asarray(vectors, dtype=np.float32)).to(self.device)
        squeeze = vec.ndim == 2
        if squeeze:
            vec = vec[None]
        nq, npos, _ = vec.shape
        scale = Scale.parse(scale)
        keep = candidate_grid(self.size, scale, self.stride)
        groups = layout_groups(self.size, scale)
        if int(k) != k or int(k) < 1:
            raise InputError(None, f"k must be a positive integer, got {k}")
        k = min(int(k), max(int(keep[g.positions].sum()) for g in groups) * self.count)
        check_result_size(nq, npos, k)
        best_d = torch.full((nq, npos, k), float("inf"), device=self.device)
        best_i = torch.full((nq, npos, k), -1, dtype=torch.int64, device=self.device)
        plan = []
        for g in groups:
            cpos = g.positions[keep[g.positions]].to(self.device)
            plan.append((g.positions.to(self.device), cpos))
        for lo in range(0, self.count, self.chunk_images):
            hi = min(lo + self.chunk_images, self.count)
            patches = extract_patches(self.corpus.rows(lo, hi).to(self.device), scale)  # (n, L, D)
            for qpos, cpos in plan:
                q = vec[:, qpos].reshape(-1, vec.shape[-1])  # (Q*U, D)
                c = patches[:, cpos].reshape(-1, patches.shape[-1])  # (n*V, D)
                d = (q.square().sum(1, keepdim=True) + c.square().sum(1)[None] - 2 * q @ c.T).clamp_min_(0)
                kk = min(k, d.shape[1])
                dv, di = d.topk(kk, dim=1, largest=False)
                # encode (image, position) as image * L + position
                img = lo + di // len(cpos)
                code = img * npos + cpos[di % len(cpos)]
                old_d = best_d[:, qpos].reshape(-1, k)
                old_i = best_i[:, qpos].reshape(-1, k)
                all_d = torch.cat([old_d, dv], 1)
                all_i = torch.cat([old_i, code], 1)
                md, mi = all_d.topk(k, dim=1, largest=False)
                best_d[:, qpos] = md.view(nq, -1, k)
                best_i[:, qpos] = all_i.gather(1, mi).view(nq, -1, k)
        image = torch.where(best_i >= 0, best_i // npos, -1)
        position = torch.where(best_i >= 0, best_i % npos, -1)
        out = (best_d.cpu().numpy(), image.cpu().numpy(), position.cpu().numpy())
        return tuple(a[0] for a in out) if squeeze else out
