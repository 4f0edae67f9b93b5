"""Attribution through an index (SPEC section 4): candidate retrieval, then exact dense re-scoring.

For each query and timestep:
1. noise the query, cut its patches per scale, search the index with q / s (one index of unscaled
   patches serves every t) for the K nearest same-layout training patches;
2. rank training images by the softmax mass (over the K) their retrieved patches receive, fused
   over scales and noise draws, and add the nearest images by thumbnail;
3. re-score the top M candidate images exactly at every position from the store's pixels; the
   mass of the non-candidates enters the softmax normaliser (reported as ``outside_mass``): the
   exact mass of their retrieved patches plus an unbiased estimate of the rest from a uniform
   sample of their other patches (outside.py); images outside the M score the weights of their
   retrieved patches (``tail``, the default), or 0 (``tail=False``: SPEC section 4's estimator).
``mode="fast"`` stops after step 1 and scores the truncated softmax over the K retrieved patches.
"""
from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..scoring.dense import chunk_size, log_masses
from ..device import describe_device, resolve_device, resolve_dtype
from ..scoring.exact import positions_to_pixels, scale_weights
from ..corpus.inputs import CorpusView, check_compatible
from .outside import Guide, estimate_outside
from ..scoring.patches import extract_patches, layout_groups
from ..scoring.scales import Scale
from ..scoring.schedule import NoiseSchedule, noise_images
from ..corpus.thumbnails import corpus_thumbnails, nearest_thumbnails, thumbnails
from ..units import parse_bytes

log = logging.getLogger("nda_ann.attribution.attributor")

Mode = Literal["rescore", "fast"]

# tail scores from an index with approximate distances (PCA, lossy SQ/PQ codes; not Flat, IVF-Flat
# or the default pixel codes): the TAIL_K nearest retrieved patches of each query patch are
# re-measured exactly from the store's pixels (they also enter the normaliser's known part).
# Measured at t = 100 with lossy SQ8 interior codes, M = 150: 32 -> 128 moved top-10 overlap /
# subset-sum Spearman 0.92 / 0.922 -> 0.93 / 0.939 at 20,000 crops and 0.98 / 0.987 -> 0.98 / 0.991
# at 5,000 for 3-5% more time; but on the million recipe (M = 400) it moved 100k only 0.521 -> 0.524
# and made a 1M query 1.69 -> 2.37 s (random reads across the 3 GB store), past the 2 s budget.
TAIL_K = 32

# Default M by noise level, from the measured curves (BENCHMARKS.md "defaults_t100_3000" / "_5000",
# "defaults_t300_*", "outside_5000"), tail scores on, 18 queries. At t = 100 (sigma^2 = 0.10)
# M = 150 gives top-10 overlap 0.99 / 1.00 and subset-sum Spearman 0.998 / 0.996 on 3,000 / 5,000
# crops (M = 120: 0.995 on 5,000, on the target's edge; M = 200: 0.997 for a third more dense work).
# At t = 300 (sigma^2 = 0.61) on 5,000 crops M = 500 gives 0.94 / 0.87 (the 57% of the mass outside
# the M caps subset-sum even with exact candidates and normaliser) and M = 1,000 0.97 / 0.92.
DEFAULT_CANDIDATES = 150            # sigma^2 < BROAD_SIGMA2
DEFAULT_CANDIDATES_BROAD = 1000     # sigma^2 >= BROAD_SIGMA2
BROAD_SIGMA2 = 0.3
# re-ranking of a candidate pool (``rerank`` x M images, by retrieved mass) by their exact mass at a
# subset of query positions: every border position, interior ones on a stride-RERANK_STRIDE grid
# (about 14% of a full re-scoring per pooled image at p = 7, 32 x 32). Off by default: measured on
# 5,000 crops with a stride-4 index at t = 100, M = 200 (BENCHMARKS.md, "rerank_5000"), x 4 moved
# subset-sum Spearman 0.945 -> 0.960 but top-10 overlap 0.87 -> 0.85, for 55% more dense work.
DEFAULT_RERANK = 1
# non-candidate images sampled per query, scale and noise draw (one position of each per layout
# class) to estimate the non-candidates' share of the normaliser (outside.py), half of them drawn
# towards the images whose patches were retrieved (GUIDE_SHARE). Measured (BENCHMARKS.md
# "outside_5000", "outside_100k", "defaults_t300_5000"): on 5,000 crops at t = 300,
# M = 500 top-10 overlap 0.87 -> 0.98 against the earlier 32-image sample (oracle normaliser: 1.00),
# the same from 512 to 8,192 images; 18 queries at M = 1,000: 0.96 / 0.922 at 512 and 2,048 alike.
# About 0.03 s per query at 512 (0.1 s at 2,048).
DEFAULT_OUTSIDE_SAMPLE = 512
GUIDE_SHARE = 0.5
# queries searched at once (their hits are QUERY_BLOCK x L x K x 20 bytes: 21 MB a query at 32 x 32,
# K = 1,024). One at a time is fastest on the CPU: with SQ8pixel codes at 5,000 images, 8 queries took
# 0.68 / 0.70 s each one at a time, 0.68 s in blocks of 2 and 0.74 / 0.77 s in blocks of 8 (FAISS's
# 5,408 result heaps at once); 64 at once held 1.3 GB. Searchers that batch better may raise it.
QUERY_BLOCK = 1
RERANK_STRIDE = 3


def _non_candidate(image: np.ndarray, cand: np.ndarray, n: int) -> np.ndarray:
    """Bool mask, shaped like ``image`` (ids, -1 = none): a retrieved image that is not a candidate.
    A table look-up (1 ms for 1,024 x 1,024 ids where np.isin took 11 ms)."""
    is_cand = np.zeros(n + 1, dtype=bool)  # slot n stays False: id -1 reads it
    is_cand[cand] = True
    return ~is_cand[image] & (image >= 0)


def _sum_by_image(image: np.ndarray, weight: np.ndarray, n: int) -> np.ndarray:
    """(n,) sum of ``weight`` per image id; ``image`` holds ids or -1 (none, whose weight must be 0).
    Shifting the ids by one (-1 -> a bin that is dropped) spares masking: 4 ms where the masked
    version took 9 ms for 1,024 x 1,024 weights."""
    return np.bincount(image.ravel() + 1, weights=weight.ravel(), minlength=n + 1)[1:]


def default_candidates(sigma2: float) -> int:
    """The default M at noise variance sigma^2 (more candidates where the posterior is broad)."""
    return DEFAULT_CANDIDATES if sigma2 < BROAD_SIGMA2 else DEFAULT_CANDIDATES_BROAD


@dataclass
class AttributionSettings:
    """Every knob of one attribution run (recorded in summary.json)."""

    timesteps: list[int]
    k: int = 1024
    candidates: int | None = None  # None: default_candidates(sigma^2) per timestep
    nprobe: int | None = None
    topk: int | None = None
    alpha: float | None = None
    seed: int = 0
    noise_draws: int = 1
    schedule: str = "linear"
    mode: str = "rescore"
    thumbnail_share: float | None = None
    outside_sample: int = DEFAULT_OUTSIDE_SAMPLE
    precision: str = "float32"
    maps: int = 8
    tail: bool = True
    rerank: int = 1

    def thumbnail_share_at(self, t: int, sched: NoiseSchedule) -> float:
        """Share of the M candidates taken from the thumbnail search at t (default: by noise level)."""
        if self.thumbnail_share is not None:
            return self.thumbnail_share
        return 0.5 if sched.signal_and_noise(t)[1] >= BROAD_SIGMA2 else 0.0


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

    @property
    def scores(self) -> np.ndarray:
        """(T, Q, N) float64."""
        out = np.zeros((len(self.timesteps), len(self.query_names), self.n_images))
        for (ti, q), (ids, vals) in self.sparse.items():
            out[ti, q, ids] = vals
        return out

    def query_scores(self, query: int, timestep: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(ids, scores) of one query at one timestep (None: mean over timesteps), nonzero only."""
        tis = range(len(self.timesteps)) if timestep is None else [self.timesteps.index(timestep)]
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
        tis = range(len(self.timesteps)) if timestep is None else [self.timesteps.index(timestep)]
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


class Attributor:
    """Attribute images against an indexed corpus. ``Attributor.open(INDEX)`` or with any searcher
    exposing ``search(scale, vectors (Q, L, D), k, nprobe) -> (dist, image, position)``."""

    def __init__(self, searcher, corpus, scales: Sequence, *, index_id: str | None = None, device="auto", thumbs: np.ndarray | None = None, memory_budget: int | str = "512M"):
        self.searcher = searcher
        self.corpus = corpus if isinstance(corpus, CorpusView) else CorpusView(corpus)
        self.scales = [Scale.parse(s) for s in scales]
        self.size = self.corpus.shape[1]
        self.groups = {sc: layout_groups(self.size, sc) for sc in self.scales}
        self.device = resolve_device(device)
        self.index_id = index_id
        self._thumbs = thumbs
        self._sources: list[str] | None = None
        self.budget = parse_bytes(memory_budget)

    @classmethod
    def open(cls, index_path, device="auto", mmap: bool = True) -> "Attributor":
        """Open an index built by ``nda-ann build`` together with the store(s) it was built from."""
        from ..errors import IndexError_
        from ..index import PatchIndex
        from ..corpus.store import Store

        index = PatchIndex.open(index_path, mmap=mmap)
        stores = [Store.open(p) for p in index.store_paths()]
        for store, entry in zip(stores, index.manifest["stores"]):
            if store.fingerprint != entry["fingerprint"]:
                raise IndexError_(store.path, f"the store's pixels are not the ones indexed in {index.path} (fingerprint "
                                              f"{store.fingerprint[:12]}, indexed {entry['fingerprint'][:12]}): it was "
                                              "re-ingested or replaced after the build; restore it or rebuild the index")
        thumbs = index.thumbnails() if hasattr(index, "thumbnails") else None
        return cls(index, stores, index.scales, index_id=index.manifest.get("index_id") or index.manifest.get("created"), device=device, thumbs=thumbs)

    def _distances_exact(self, scale: Scale) -> bool:
        """Whether the searcher's distances at ``scale`` are exact (searchers that do not say: no)."""
        check = getattr(self.searcher, "distances_exact", None)
        return bool(check(scale)) if check is not None else False

    @property
    def sources(self) -> list[str]:
        if self._sources is None:
            self._sources = self.corpus.sources()
        return self._sources

    @property
    def thumbs(self) -> np.ndarray:
        if self._thumbs is None:
            log.info("computing thumbnails of %d images (not stored with the index)", self.corpus.count)
            self._thumbs = corpus_thumbnails(self.corpus)
        return self._thumbs

    def attribute(
        self,
        images,
        timesteps: int | Sequence[int] = 100,
        *,
        k: int = 1024,
        candidates: int | None = None,
        nprobe: int | None = None,
        topk: int | None = None,
        alpha: float | None = None,
        seed: int = 0,
        noise_draws: int = 1,
        schedule: str = "linear",
        mode: Mode = "rescore",
        thumbnail_share: float | None = None,
        outside_sample: int | None = None,
        precision: str = "float32",
        maps: int = 8,
        tail: bool | None = None,
        rerank: int | None = None,
        names: Sequence[str] | None = None,
        progress: bool = False,
    ) -> Attribution:
        """Attribute query images (paths, PIL images, uint8 arrays or floats in [-1, 1]).

        Returns an Attribution with scores (T, Q, N), heatmaps of the top ``maps`` images (by mean
        score and at each timestep, kept at every timestep), and
        the estimated mass outside the M candidates per query and scale. ``tail`` (default on; None
        means the default) scores non-candidates by their retrieved patches; ``candidates`` None
        means ``default_candidates(sigma^2)`` per timestep; ``rerank`` > 1 re-ranks a pool of
        rerank x M candidates (``_proxy_scores``); ``outside_sample`` (None: 512) non-candidate
        images, one position each per layout class, estimate the non-candidates' share of the
        normaliser.
        """
        from ..corpus.queries import load_queries

        queries, qnames = load_queries(images, self.corpus.shape, names=names)
        check_compatible(queries, self.corpus.shape, "index")
        sched = NoiseSchedule(schedule)
        ts = [sched.check_timestep(t) for t in ([timesteps] if isinstance(timesteps, int) else list(timesteps))]
        if mode not in ("rescore", "fast"):
            raise ValueError(f"mode must be 'rescore' or 'fast', got {mode!r}")
        for name, value in (("k", k), ("candidates", 1 if candidates is None else candidates), ("noise_draws", noise_draws)):
            if int(value) != value or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value}")
        tail = (True if tail is None else bool(tail)) and mode == "rescore"
        if rerank is None:
            rerank = DEFAULT_RERANK
        outside_sample = DEFAULT_OUTSIDE_SAMPLE if outside_sample is None else outside_sample
        if int(outside_sample) != outside_sample or outside_sample < 0:
            raise ValueError(f"outside_sample must be a non-negative integer, got {outside_sample}")
        if int(rerank) != rerank or rerank < 1:
            raise ValueError(f"rerank must be a positive integer, got {rerank}")
        if topk is not None and (int(topk) != topk or topk < 1):
            raise ValueError(f"topk must be a positive integer, got {topk}")
        weights = scale_weights(self.scales, alpha)
        settings = AttributionSettings(ts, k, candidates, nprobe, topk, alpha, seed, noise_draws, schedule, mode, thumbnail_share, outside_sample, precision, maps, tail, int(rerank))
        dtype = resolve_dtype(precision)
        n, nq = self.corpus.count, queries.shape[0]
        m_per_t = [candidates if candidates is not None else default_candidates(sched.signal_and_noise(t)[1]) for t in ts]
        result = Attribution(n, ts, qnames, self.sources, {**asdict(settings), "candidates_per_timestep": m_per_t, "index_id": self.index_id}, describe_device(self.device), scale_names=[str(s) for s in self.scales])
        result.outside_mass = np.zeros((len(ts), nq, len(self.scales)))
        bar = tqdm(total=len(ts) * nq, unit="query", desc="attribute", disable=not progress)
        for lo in range(0, nq, QUERY_BLOCK):
            # search a block of queries at once (QUERY_BLOCK: one, on the CPU), every timestep, then
            # keep the heatmaps of its top images by mean and per timestep
            block = range(lo, min(lo + QUERY_BLOCK, nq))
            parts: dict[int, list] = {q: [] for q in block}
            for ti, t in enumerate(ts):
                s = sched.signal_and_noise(t)[0]
                noisy = [noise_images(queries[block.start : block.stop], t, sched, seed, d) for d in range(noise_draws)]  # each (B, C, H, W)
                patches = {(d, sc): extract_patches(noisy[d], sc) for d in range(noise_draws) for sc in self.scales}
                hits = {key: self.searcher.search(key[1], (p / s).numpy(), k, nprobe) for key, p in patches.items()}
                for q in block:
                    ids, vals, contrib = self._attribute_one(q, q - lo, hits, noisy, ti, t, sched, m_per_t[ti], weights, settings, dtype, result)
                    result.sparse[(ti, q)] = (ids, vals)
                    parts[q].append(contrib)
                    bar.update(1)
            if settings.maps > 0 and mode == "rescore":
                for q in block:
                    self._keep_maps(result, q, parts[q], settings.maps)
        bar.close()
        return result

    def _keep_maps(self, result: Attribution, q: int, parts: list["Contributions"], n_maps: int) -> None:
        """Heatmaps (H, W) of query ``q``'s top ``n_maps`` images by mean score and at each timestep,
        at every timestep (zero where an image scored 0 there), so that ``heatmap`` can average them."""
        chosen = {i for i, _, _ in result.top(q, n_maps)}
        for t in result.timesteps:
            chosen |= {i for i, _, _ in result.top(q, n_maps, t)}
        ids = np.array(sorted(chosen), dtype=np.int64)
        for ti, contrib in enumerate(parts):
            maps = contrib.pixel_maps(ids, self.size)
            result.kept_maps[(ti, q)] = {int(i): m for i, m in zip(ids, maps)}

    def _attribute_one(self, q: int, b: int, hits: dict, noisy: list[torch.Tensor], ti: int, t: int, sched: NoiseSchedule,
                       m: int, weights: list[float], settings: AttributionSettings, dtype: torch.dtype, result: Attribution):
        """(ids, scores, contributions) of query ``q`` (row ``b`` of its block's ``hits`` and
        ``noisy``) at timestep ``t`` (index ``ti``); stores its mass outside the candidates in
        ``result``. ``contributions`` (None in fast mode or without maps) holds what its heatmaps
        are drawn from."""
        draws, n = settings.noise_draws, self.corpus.count
        s, sigma2 = sched.signal_and_noise(t)
        if settings.mode == "fast":
            return (*self._fast_scores(b, hits, s, sigma2, weights, draws, settings.topk), None)
        mass = self._candidate_mass(b, hits, s, sigma2, weights, draws)
        m_t = min(m, n)
        cand = self._select_candidates(mass, noisy, b, s, min(m_t * settings.rerank, n), settings.thumbnail_share_at(t, sched))
        if len(cand) > m_t:
            proxy = self._proxy_scores(b, cand, noisy, s, sigma2, weights, draws, dtype)
            cand = np.sort(cand[np.argsort(-proxy, kind="stable")[:m_t]])
        # this query's noised patch vectors per (draw, scale), (1, L, D) in the dense dtype
        qps = {key: extract_patches(noisy[key[0]][b : b + 1].to(self.device, dtype), key[1]) for key in hits}
        known = self._known_logits(b, cand, hits, qps, s, sigma2)
        sampled = self._sample_outside(cand, known, qps, s, sigma2, settings.outside_sample, (settings.seed, t), mass)
        ids, vals, per_pos, outside, log_zs = self._rescore(cand, self._retrieved_outside(known), sampled, qps, s, sigma2, weights, draws, settings.topk, dtype)
        contrib = Contributions(cand, per_pos, {}) if settings.maps > 0 else None
        if settings.tail:
            ids, vals = self._add_tail(ids, vals, known, log_zs, weights, draws, contrib)
        result.outside_mass[ti, q] = outside
        return ids, vals, contrib

    # stage 1 -----------------------------------------------------------------------------
    def _softmax_over_retrieved(self, dist: np.ndarray, s: float, sigma2: float) -> torch.Tensor:
        """(L, K) unscaled squared distances -> (L, K) softmax weights over the K (inf -> 0)."""
        logits = -torch.from_numpy(dist).double() * (s * s) / (2 * sigma2)
        return torch.softmax(logits, dim=-1).nan_to_num_(0.0)

    def _candidate_mass(self, b: int, hits: dict, s: float, sigma2: float, weights: list[float], draws: int) -> np.ndarray:
        """(N,) softmax mass each training image receives from the retrieved patches of the query in
        row ``b`` of its block's ``hits``."""
        mass = np.zeros(self.corpus.count)
        for (d, sc), (dist, image, _) in hits.items():
            w = self._softmax_over_retrieved(dist[b], s, sigma2).numpy()  # 0 where image is -1
            mass += weights[self.scales.index(sc)] / draws * _sum_by_image(image[b], w, self.corpus.count)
        return mass

    def _select_candidates(self, mass: np.ndarray, noisy: list[torch.Tensor], b: int, s: float, m: int, thumb_share: float) -> np.ndarray:
        """M candidate image ids: round(M * share) nearest by thumbnail, the rest by patch mass."""
        chosen: list[int] = []
        seen: set[int] = set()
        n_thumb = int(round(m * thumb_share))
        if n_thumb:
            qthumb = thumbnails(torch.stack([x[b] for x in noisy]).mean(0, keepdim=True) / s)[0]
            for i in nearest_thumbnails(self.thumbs, qthumb, n_thumb).tolist():
                if i not in seen:
                    seen.add(i)
                    chosen.append(i)
        by_mass = np.argsort(-mass, kind="stable")
        for i in by_mass.tolist():
            if len(chosen) >= m:
                break
            if i not in seen:
                seen.add(i)
                chosen.append(i)
        return np.sort(np.asarray(chosen, dtype=np.int64))

    def _proxy_groups(self, sc: Scale) -> list[tuple[torch.Tensor, torch.Tensor, float]]:
        """Per layout class: (query positions used for re-ranking, candidate positions, weight):
        every position of a border class (weight 1), interior positions on a stride-RERANK_STRIDE
        grid, weighted by how many interior positions each stands for."""
        g = sc.grid(self.size)
        out = []
        for group in self.groups[sc]:
            pos = group.positions
            if group.interior:
                keep = ((pos // g) % RERANK_STRIDE == 0) & ((pos % g) % RERANK_STRIDE == 0)
                out.append((pos[keep], pos, len(pos) / max(int(keep.sum()), 1)))
            else:
                out.append((pos, pos, 1.0))
        return out

    def _proxy_scores(self, b, pool, noisy, s, sigma2, weights, draws, dtype) -> np.ndarray:
        """(len(pool),) re-ranking score: each pooled image's exact softmax mass, normalised over
        the pool, summed over the ``_proxy_groups`` query positions and fused over scales."""
        inv = 1.0 / (2.0 * sigma2)
        total = torch.zeros(len(pool), dtype=torch.float64)
        for sc, w in zip(self.scales, weights):
            pairs = self._proxy_groups(sc)
            step = chunk_size(1, self.groups[sc], dtype, self.budget)
            for d in range(draws):
                qp = extract_patches(noisy[d][b : b + 1].to(self.device, dtype), sc)[0]  # (L, D)
                parts = []
                for lo in range(0, len(pool), step):
                    cp = extract_patches(self.corpus.take(pool[lo : lo + step]).to(self.device, dtype) * s, sc)  # (b, L, D)
                    c_norms = cp.square().sum(-1)  # (b, L)
                    rows = []
                    for qpos, cpos, _ in pairs:
                        if not len(qpos):
                            continue
                        c = cp[:, cpos].reshape(-1, cp.shape[-1])
                        logits = torch.addmm(c_norms[:, cpos].reshape(1, -1), qp[qpos], c.T, beta=-1.0, alpha=2.0).mul_(inv)
                        rows.append(torch.logsumexp(logits.view(len(qpos), cp.shape[0], len(cpos)), -1))  # (U', b)
                    parts.append(torch.cat(rows, 0))
                # -||q_u||^2 / (2 sigma^2) is constant per query position: it cancels in the softmax over the pool
                row_w = torch.cat([torch.full((len(qpos),), wt, dtype=torch.float64) for qpos, _, wt in pairs if len(qpos)])
                total += w / draws * (torch.softmax(torch.cat(parts, 1).double(), dim=1).cpu() * row_w[:, None]).sum(0)
        return total.numpy()

    def _fast_scores(self, b: int, hits: dict, s: float, sigma2: float, weights: list[float], draws: int, topk: int | None):
        """Truncated softmax over the K retrieved patches: (ids, scores) of the images retrieved."""
        acc = np.zeros(self.corpus.count)
        for (d, sc), (dist, image, _) in hits.items():
            w = self._softmax_over_retrieved(dist[b], s, sigma2).numpy()  # (L, K)
            img = image[b]
            if topk is not None:
                # keep, per position and image, only the topk largest retrieved weights
                order = np.lexsort((-w, img), axis=-1)
                w_sorted = np.take_along_axis(w, order, -1)
                i_sorted = np.take_along_axis(img, order, -1)
                first = np.concatenate([np.ones((len(img), 1), bool), i_sorted[:, 1:] != i_sorted[:, :-1]], 1)
                run_start = np.maximum.accumulate(np.where(first, np.arange(img.shape[1])[None], 0), axis=1)
                rank = np.arange(img.shape[1])[None] - run_start
                w, img = np.where(rank < topk, w_sorted, 0.0), i_sorted
            ok = img >= 0
            acc += weights[self.scales.index(sc)] / draws * np.bincount(img[ok], weights=w[ok], minlength=self.corpus.count)
        ids = np.nonzero(acc)[0]
        return ids, acc[ids]

    def _known_logits(self, b: int, cand: np.ndarray, hits: dict, qps: dict, s: float, sigma2: float) -> dict:
        """Per (draw, scale): (logits (L, K') float64, image (L, K'), position (L, K')) of the
        retrieved patches of non-candidates, from exact distances; entries that are not such
        patches hold -inf / -1 / -1.

        From an index with exact distances (Flat, IVF-Flat, pixel codes), all K retrieved as they
        are. Otherwise (PCA, lossy codes, which misjudge them) the ``TAIL_K`` nearest of each query
        patch that belong to non-candidates, re-measured from the store's pixels.
        """
        out = {}
        scale_logit = -(s * s) / (2 * sigma2)
        for (d, sc), (dist, image, position) in hits.items():
            if self._distances_exact(sc):
                img = image[b]
                keep = _non_candidate(img, cand, self.corpus.count)
                out[(d, sc)] = (np.where(keep, dist[b].astype(np.float64) * scale_logit, -np.inf), np.where(keep, img, -1), np.where(keep, position[b], -1))
                continue
            kt = min(TAIL_K, dist.shape[-1])
            img, pos = image[b][:, :kt], position[b][:, :kt]
            keep = _non_candidate(img, cand, self.corpus.count)
            exact = np.full(img.shape, np.inf, dtype=np.float64)
            u_idx, k_idx = np.nonzero(keep)
            if len(u_idx):
                qv = qps[(d, sc)][0].double().cpu() / s  # (L, D), unscaled like the index
                y = self.corpus.patch_vectors(img[u_idx, k_idx], pos[u_idx, k_idx], sc).double()  # (E, D)
                exact[u_idx, k_idx] = (qv[torch.from_numpy(u_idx)] - y).square().sum(-1).numpy()
            out[(d, sc)] = (exact * scale_logit, np.where(keep, img, -1), np.where(keep, pos, -1))  # inf * negative = -inf where dropped
        return out

    @staticmethod
    def _retrieved_outside(known: dict) -> dict:
        """Per (draw, scale): (L,) log of the softmax mass of the retrieved patches of non-candidates.

        A known lower bound of the non-candidates' share of the normaliser at each query position
        (-inf where nothing outside the candidates was retrieved): the exactly known part of the
        non-candidates' mass; the sample (``_sample_outside``) estimates the rest. ``known``:
        ``_known_logits``.
        """
        return {key: torch.logsumexp(torch.from_numpy(logits), -1) for key, (logits, _, _) in known.items()}

    # stage 2 -----------------------------------------------------------------------------
    def _sample_outside(self, cand, known, qps, s, sigma2, size, seed, mass) -> dict:
        """Per (draw, scale): (L,) log of the estimated mass of the non-candidates' patches not
        counted in ``known`` (``_known_logits``; outside.py), from ``size`` sampled images. The draws
        depend only on (seed, t, draw, scale), not on the query's place in its batch."""
        if size <= 0 or len(cand) >= self.corpus.count:
            return {}
        guide = Guide(self.corpus.count, cand, mass, GUIDE_SHARE)
        out = {}
        for (d, sc), qp in qps.items():
            _, img, pos = known[(d, sc)]
            rng = np.random.default_rng([*seed, d, self.scales.index(sc)])
            out[(d, sc)] = estimate_outside(self.corpus, qp[0], self.groups[sc], sc, s, 1.0 / (2.0 * sigma2), img, pos, size, guide, rng, self.budget)
        return out

    def _rescore(self, cand, retrieved_out, sampled, qps, s, sigma2, weights, draws, topk, dtype):
        """Exact re-scoring of one query (``qps``: its patch vectors per (draw, scale)) against every
        position of the candidate images.

        The non-candidates' share of the softmax normaliser at each query position is
        ``retrieved_out`` (the exact mass of their retrieved patches) plus the sampled estimate of
        the rest (``sampled``: ``_sample_outside``; outside.py).
        """
        n, m = self.corpus.count, len(cand)
        inv = 1.0 / (2.0 * sigma2)
        scores = torch.zeros(m, dtype=torch.float64)
        per_pos: dict[Scale, list[torch.Tensor]] = {}
        outside = np.zeros(len(self.scales))
        log_zs: dict = {}
        for si, (sc, w) in enumerate(zip(self.scales, weights)):
            step = chunk_size(1, self.groups[sc], dtype, self.budget)
            for d in range(draws):
                qp = qps[(d, sc)]
                fulls, aggs = [], []
                for lo in range(0, m, step):
                    imgs = self.corpus.take(cand[lo : lo + step]).to(self.device, dtype) * s
                    full, agg = log_masses(qp, extract_patches(imgs, sc), self.groups[sc], inv, topk)
                    fulls.append(torch.logsumexp(full, -1))
                    aggs.append(agg[0])
                log_z_in = torch.logsumexp(torch.stack(fulls), 0)[0]  # (L,)
                log_z_out = retrieved_out[(d, sc)].to(log_z_in) if m < n else torch.full_like(log_z_in, -math.inf)
                if (d, sc) in sampled:
                    log_z_out = torch.logaddexp(log_z_out, sampled[(d, sc)].to(log_z_out))
                log_z = torch.logaddexp(log_z_in, log_z_out)
                log_zs[(d, sc)] = log_z
                outside[si] += float(torch.exp(log_z_out - log_z).mean()) / draws
                a = torch.exp(torch.cat(aggs, -1) - log_z[:, None]).double().cpu()  # (L, M)
                scores += w / draws * a.sum(0)
                per_pos.setdefault(sc, []).append(w / draws * a)
        keep = scores.numpy() > 0
        return cand[keep], scores.numpy()[keep], {sc: sum(parts) for sc, parts in per_pos.items()}, outside, log_zs

    def _add_tail(self, ids, vals, known, log_zs, weights, draws, contrib: "Contributions | None" = None):
        """Give non-candidates their retrieved patches' exact weights under the re-scoring normaliser.

        A lower bound of their exact score (only retrieved patches count; topk is not applied to
        them), instead of the 0 of SPEC section 4's estimator. On by default (measured: at t = 100,
        M = 200 on 3,000 crops, subset-sum Spearman 0.982 -> 0.997 and relative L1 0.18 -> 0.04;
        BENCHMARKS.md). ``known``: ``_known_logits``.
        """
        extra = np.zeros(self.corpus.count)
        for (d, sc), (logits, img, _) in known.items():
            w = torch.from_numpy(logits).sub(log_zs[(d, sc)].double().cpu()[:, None]).exp_().numpy()  # 0 where img is -1
            w *= weights[self.scales.index(sc)] / draws
            extra += _sum_by_image(img, w, self.corpus.count)
            if contrib is not None:
                contrib.tail.setdefault(sc, []).append((w, img))
        tail_ids = np.nonzero(extra)[0]
        return np.concatenate([ids, tail_ids]), np.concatenate([vals, extra[tail_ids]])
