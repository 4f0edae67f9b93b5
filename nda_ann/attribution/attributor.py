"""The ``Attributor``: attribution through an index (docs/scores.md section 5), wiring the stages.

For each query and timestep (docs/scores.md, "The index estimator"):
1. noise the query and cut its patches per scale and draw once (query_patches.py); search the index
   with q / s (one index of unscaled patches serves every t) for the K nearest same-layout patches;
2. rank training images by the softmax mass (over the K) their retrieved patches receive, fused over
   scales and noise draws, and add the nearest images by thumbnail (candidates.py; rerank.py);
3. re-score the top M candidate images exactly at every position from the store's pixels
   (rescore.py); the non-candidates enter the normaliser through the exact mass of their retrieved
   patches (known.py) plus an unbiased estimate of the rest (outside.py), reported as
   ``outside_mass``; images outside the M score the weights of their retrieved patches, by default
   scaled up to the estimated outside mass (tail.py), or 0 (``tail=False``: docs/scores.md section 5's estimator);
4. keep heatmaps of the top images (maps.py).
``mode="fast"`` stops after step 1 and scores the truncated softmax over the K retrieved patches
(fast.py). Where M is a large share of the corpus (``FULL_RESCORE_SHARE``) every image is re-scored
and nothing is searched: the scores are then exact.
"""
from __future__ import annotations

import logging
import time
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..corpus.inputs import CorpusView, check_compatible
from ..corpus.thumbnails import corpus_thumbnails
from ..device import describe_device, resolve_device, resolve_dtype
from ..scoring.conv_layout import layouts_chosen
from ..scoring.operands import kernel_path
from ..scoring.exact import scale_weights
from ..scoring.patches import layout_groups
from ..scoring.scales import Scale
from ..scoring.schedule import NoiseSchedule
from ..units import parse_bytes
from .candidates import Hits, candidate_mass, query_thumbnail, ranked_candidates, select_candidates
from .fast import fast_scores
from .known import known_logits, retrieved_outside, tail_distances, tail_known
from .maps import Contributions, keep_maps
from . import rounds as rounds_mod
from .outside import sample_outside
from .pace import Pace, overrun_warning
from .query_patches import NoisedBlock
from .rerank import proxy_scores
from .rescore import Rescoring, rescore
from .rounds import RoundsRecord, grow
from .result import Attribution
from .settings import ADAPTIVE_FIRST, GUIDE_SHARE, AttributionSettings, Mode
from .tail import tail_scores

log = logging.getLogger("nda_ann.attribution")

# queries searched at once (their hits are QUERY_BLOCK x L x K x 20 bytes: 21 MB a query at 32 x 32,
# K = 1,024). One at a time is fastest on the CPU: with SQ8pixel codes at 5,000 images, 8 queries took
# 0.68 / 0.70 s each one at a time, 0.68 s in blocks of 2 and 0.74 / 0.77 s in blocks of 8 (FAISS's
# 5,408 result heaps at once); 64 at once held 1.3 GB. Searchers that batch better may raise it.
QUERY_BLOCK = 1
# M at least this share of N: re-score every image (exact scores) instead of search + candidates +
# outside sample, which then cost more than they save (issue: 390 images, 325 s index path against
# 190 s exact; BENCHMARKS.md "bench_attribute_speed" at 500 and 1,000 images).
FULL_RESCORE_SHARE = 0.5
# k-sized work of one query: float32 distance and two int64 ids from the search, float64 weights, known
# logits and their ids and tail weights downstream (about 100 bytes per neighbour and query patch); k is
# clipped so that it stays within MAX_K_BYTES (k = 20,971 at p = 7 on 32 x 32, one draw; default 1,024)
K_WORK_BYTES = 100
MAX_K_BYTES = 2 << 30


class Attributor:
    """Attribute images against an indexed corpus. ``Attributor.open(INDEX)`` or with any searcher
    exposing ``search(scale, vectors (Q, L, D), k, nprobe) -> (dist, image, position)``."""

    def __init__(self, searcher, corpus, scales: Sequence, *, index_id: str | None = None, device="auto",
                 thumbs: np.ndarray | None = None, memory_budget: int | str = "512M"):
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
        self._paces: dict[tuple, Pace] = {}  # a time budget's running costs, per settings that cost alike

    @classmethod
    def open(cls, index_path, device="auto", mmap: bool = True, engine: str = "local", **engine_options) -> "Attributor":
        """Open an index built by ``nda-ann build`` together with the store(s) it was built from.
        ``engine="ray"`` serves it from Ray actors (``nda_ann.distributed``; options: address, actors, timeout_s)."""
        if engine == "ray":
            from ..distributed import open_ray_attributor

            return open_ray_attributor(index_path, device=device, **engine_options)
        if engine != "local":
            raise ValueError(f"engine must be 'local' or 'ray', got {engine!r}")
        if engine_options:
            raise TypeError(f"unexpected options for the local engine: {sorted(engine_options)}")
        from ..corpus.store import Store
        from ..errors import IndexError_
        from ..index import PatchIndex

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

    def max_k(self, draws: int = 1) -> int:
        """The k a query can use: at most the same-layout training patches any query patch can have (the
        corpus size times the largest layout class), and at most what keeps one query's k-sized work
        (retrieved distances, ids, weights and logits, about K_WORK_BYTES per neighbour and query patch)
        within MAX_K_BYTES. A user's k is clipped to it, so it never sizes an allocation beyond that."""
        held = self.corpus.count * max(len(g) for groups in self.groups.values() for g in groups)
        patches = draws * sum(sc.grid(self.size) ** 2 for sc in self.scales)
        return int(max(1, min(held, MAX_K_BYTES // (K_WORK_BYTES * patches))))

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
        tail: bool | str | None = None,
        rerank: int | None = None,
        names: Sequence[str] | None = None,
        progress: bool = False,
        max_outside: float | None = None,
        time_budget: float | None = None,
        allow_resize: bool = True,
        outside_estimator: str = "images",
        outside_smoothing: float | None = None,
        outside_topup: int | None = None,
        tail_retrieved: str = "all",
    ) -> Attribution:
        """Attribute query images (paths, PIL images, uint8 arrays or floats in [-1, 1]).

        Returns an Attribution with scores (T, Q, N), heatmaps of the top ``maps`` images (by mean
        score and at each timestep, kept at every timestep), and the estimated mass outside the M
        candidates per query and scale. ``tail`` scores non-candidates by their retrieved patches:
        "scaled" (the default, None) scales those weights up to the estimated outside mass at each query
        position (at most tail.SCALE_CAP times), True keeps them unscaled, False scores 0. ``candidates``
        None means M sized by the outside mass (rounds to ``max_outside`` 0.3, at most 1,000); a number
        fixes M. ``rerank`` > 1 re-ranks a pool of rerank x M candidates (rerank.py); ``outside_sample``
        (None: 128) non-candidate images, each scored at every position, estimate the non-candidates'
        share of the normaliser (outside_images.py), smoothed over neighbouring query positions by a
        Gaussian of ``outside_smoothing`` positions (None: 1.0; 0 = off; outside.smoothed_share), and topped
        up in each later round by ``outside_topup`` (None: 64; 0 = off) images drawn against that round's
        candidates (rounds.py). ``tail_retrieved`` (indexes with approximate distances: PCA, lossy codes):
        "all" (the default) builds the tail from all K retrieved patches, those past the TAIL_K re-measured
        ones at their index distance corrected per position (known.tail_known); "remeasured" from the
        TAIL_K re-measured ones only. ``max_outside`` F and / or
        ``time_budget`` S (seconds per query): re-score candidates in rounds until the estimated share
        outside them is below F or the time is spent (rounds.py; ``candidates`` then caps M);
        ``result.rounds`` says per query and timestep what was reached. Query images of another size are
        resized as the training images were, and listed in ``settings["resized_queries"]``
        (``allow_resize=False`` refuses them).
        """
        from ..corpus.queries import load_query_batch

        batch = load_query_batch(images, self.corpus.shape, names=names, allow_resize=allow_resize)
        queries, qnames = batch.images, batch.names
        check_compatible(queries, self.corpus.shape, "index")
        sched = NoiseSchedule(schedule)
        settings = AttributionSettings.create(
            timesteps, sched, k=k, candidates=candidates, nprobe=nprobe, topk=topk, alpha=alpha, seed=seed,
            noise_draws=noise_draws, schedule=schedule, mode=mode, thumbnail_share=thumbnail_share,
            outside_sample=outside_sample, precision=precision, maps=maps, tail=tail, rerank=rerank,
            max_outside=max_outside, time_budget=time_budget, outside_estimator=outside_estimator,
            outside_smoothing=outside_smoothing, outside_topup=outside_topup, tail_retrieved=tail_retrieved)
        if settings.k > self.max_k(settings.noise_draws):
            log.warning("k = %d clipped to %d (the most same-layout training patches a query patch has, within %d GiB of "
                        "work per query)", settings.k, self.max_k(settings.noise_draws), MAX_K_BYTES >> 30)
            settings.k = self.max_k(settings.noise_draws)
        weights = scale_weights(self.scales, alpha)
        dtype = resolve_dtype(precision)
        ts = settings.timesteps
        m_per_t = [settings.candidates_at(t, sched) for t in ts]
        record = {**settings.record(), "candidates_per_timestep": m_per_t, "index_id": self.index_id,
                  "resized_queries": batch.resized, "kernel": kernel_path(self.device, dtype)}
        result = Attribution(self.corpus.count, ts, qnames, self.sources, record, describe_device(self.device), scale_names=[str(s) for s in self.scales])
        result.outside_mass = np.zeros((len(ts), len(qnames), len(self.scales)))
        result.candidates_used = np.zeros((len(ts), len(qnames)), dtype=np.int64)
        bar = tqdm(total=len(ts) * len(qnames), unit="query", desc="attribute", disable=not progress)
        for lo in range(0, len(qnames), QUERY_BLOCK):
            block = range(lo, min(lo + QUERY_BLOCK, len(qnames)))
            parts: dict[int, list] = {q: [] for q in block}
            for ti, t in enumerate(ts):
                started = time.perf_counter()
                noised = NoisedBlock.make(queries[block.start : block.stop], t, sched, seed, noise_draws, self.scales)
                n = self.corpus.count  # every image re-scored: M fixed at half of N or more, or rounds on a tiny corpus
                full = mode == "rescore" and (n <= 2 * ADAPTIVE_FIRST if settings.adaptive else m_per_t[ti] >= FULL_RESCORE_SHARE * n)
                hits = None if full else {key: self.searcher.search(key[1], noised.search_vectors(key), settings.k, nprobe) for key in noised.keys}
                for q in block:
                    b = q - lo
                    q_hits = None if full else {key: (d[b], i[b], p[b]) for key, (d, i, p) in hits.items()}
                    ids, vals, contrib = self._attribute_one(q, ti, noised, b, q_hits, m_per_t[ti], weights, settings, dtype, result, started)
                    result.sparse[(ti, q)] = (ids, vals)
                    parts[q].append(contrib)
                    bar.update(1)
            if settings.maps > 0 and mode == "rescore":
                for q in block:
                    keep_maps(result, q, parts[q], settings.maps, self.size)
        bar.close()
        if settings.time_budget is not None and (warning := overrun_warning(result.rounds, settings.time_budget / len(ts))):
            log.warning("%s", warning)
        if record["kernel"] == "conv":
            record["conv_layout"] = layouts_chosen()  # chosen at run time (conv_layout.py): say which ran
        return result

    def _attribute_one(self, q: int, ti: int, noised: NoisedBlock, b: int, hits: Hits | None, m: int, weights: list[float],
                       settings: AttributionSettings, dtype, result: Attribution, started: float):
        """(ids, scores, contributions) of query ``q`` (row ``b`` of ``noised``) at timestep index
        ``ti``; ``hits`` None: re-score every image; ``started``: perf_counter() when this timestep's
        noising and search began (a time budget counts from it). Stores its outside mass, M and
        seconds in ``result``.
        ``contributions`` (None in fast mode or without maps) holds what its heatmaps are drawn from."""
        n, draws, s, sigma2 = self.corpus.count, settings.noise_draws, noised.s, noised.sigma2
        deadline = None if settings.time_budget is None else started + settings.time_budget / len(settings.timesteps)
        if settings.mode == "fast":
            return (*fast_scores(hits, self.scales, weights, draws, n, s, sigma2, settings.topk), None)
        patches = noised.of(b, self.device, dtype)
        exact_at = {sc: self._distances_exact(sc) for sc in self.scales}
        tail = None if hits is None else tail_distances(self.corpus, hits, patches, exact_at, s)  # once for every round
        known_of = (lambda cand: known_logits(self.corpus, cand, hits, patches, exact_at, s, sigma2, tail)) if hits is not None else (lambda cand: {})
        if hits is None:
            pool, mass = np.arange(n), None
        else:
            mass = candidate_mass(hits, self.scales, weights, draws, n, s, sigma2)
            pool = (self._pool(mass, min(m, n), noised, b, settings) if settings.adaptive
                    else self._candidates(q, mass, min(m, n), noised, b, patches, weights, settings))
        rounds = settings.adaptive and hits is not None
        pace = self._pace(settings) if rounds else None
        first = len(pool)
        if rounds:
            remaining = None if deadline is None else deadline - time.perf_counter()
            first = pace.first_round(min(ADAPTIVE_FIRST, len(pool)), remaining, rounds_mod.MIN_ROUND)
        setup_started = time.perf_counter()
        cand0 = np.sort(pool[:first])
        known = known_of(cand0)
        known_took = time.perf_counter() - setup_started
        hint = None if hits is None else self._shift_hint(hits, known, s, sigma2)
        def draw_sample(cand: np.ndarray, known: dict, size: int, round_: int = 0) -> dict:
            return sample_outside(
                self.corpus, cand, known, patches, self.groups, self.scales, s, sigma2, size, (settings.seed, noised.t),
                mass, GUIDE_SHARE, self.budget, settings.outside_estimator, hint,
                Rescoring.chunk(self.groups, self.scales, dtype, self.budget), settings.outside_smoothing, round_)

        sampled = {} if hits is None else draw_sample(cand0, known, settings.outside_sample)
        if rounds:
            res = Rescoring(self.corpus, patches, self.groups, self.scales, weights, draws, s, sigma2, settings.topk, self.budget, hint)
            topup = ((lambda cand, known, round_: draw_sample(cand, known, settings.outside_topup, round_))
                     if settings.outside_topup > 0 and settings.outside_sample > 0 else None)
            pace.note("setup", time.perf_counter() - setup_started)
            known, sampled, record = grow(res, pool, first, known_of, sampled, settings.max_outside, deadline, topup,
                                          first_known=(known, known_took), finish=pace.finish or 0.0, pace=pace)
            finish_started = time.perf_counter()
            out = res.result(retrieved_outside(known), sampled)
        else:
            out = self._rescore(q, cand0, patches, weights, settings, s, sigma2, retrieved_outside(known), sampled, hint)
            record = RoundsRecord(len(cand0), float(np.mean(out.outside)), False, 1, "fixed")
        cand = cand0 if out.cand is None else out.cand
        ids, vals = out.ids, out.scores
        contrib = Contributions(cand, out.per_pos, {}) if settings.maps > 0 else None
        if settings.tail and known:
            if settings.tail_retrieved == "all":
                known = tail_known(known, hits, tail, cand, n, s, sigma2)
            extra = tail_scores(known, out.log_z, self.scales, weights, draws, n, None if contrib is None else contrib.tail,
                                out.log_z_out if settings.tail == "scaled" else None)
            tail_ids = np.nonzero(extra)[0]
            ids, vals = np.concatenate([ids, tail_ids]), np.concatenate([vals, extra[tail_ids]])
        if rounds:
            pace.note("finish", time.perf_counter() - finish_started)
        record.seconds, record.before_rounds = time.perf_counter() - started, setup_started - started
        result.outside_mass[ti, q] = out.outside
        result.candidates_used[ti, q] = len(cand)
        result.rounds[(ti, q)] = record
        result.candidate_ids[(ti, q)] = cand
        return ids, vals, contrib

    def _pace(self, settings: AttributionSettings) -> Pace:
        """The running costs (pace.py) of this Attributor's earlier queries under settings that cost alike."""
        key = (settings.k, settings.nprobe, settings.topk, settings.noise_draws, settings.outside_sample, settings.outside_topup,
               settings.tail, settings.tail_retrieved, settings.maps > 0)
        return self._paces.setdefault(key, Pace())

    def _pool(self, mass: np.ndarray, cap: int, noised: NoisedBlock, b: int, settings: AttributionSettings) -> np.ndarray:
        """Up to ``cap`` candidate ids ranked for re-scoring in rounds (candidates.ranked_candidates)."""
        share = settings.thumbnail_share_at(noised.t, NoiseSchedule(settings.schedule))
        qthumb = query_thumbnail(noised.mean_image(b), noised.s) if share > 0 else None
        return ranked_candidates(mass, cap, self.thumbs if share > 0 else None, qthumb, share)

    def _rescore(self, q: int, cand: np.ndarray, patches: dict, weights: list[float], settings: AttributionSettings,
                 s: float, sigma2: float, retrieved_out: dict, sampled: dict, hint: dict | None = None):
        """Stage 2 for query ``q`` (rescore.py); a method so that benchmarks can substitute oracles."""
        return rescore(self.corpus, cand, patches, self.groups, self.scales, weights, settings.noise_draws, s, sigma2,
                       retrieved_out, sampled, settings.topk, self.budget, hint)

    def _shift_hint(self, hits: Hits, known: dict, s: float, sigma2: float) -> dict:
        """Per (draw, scale), (L,): a lower bound of each query position's largest logit: the nearest
        retrieved patch's where distances are exact, else the largest re-measured known logit."""
        out = {}
        for key, (dist, _, _) in hits.items():
            if self._distances_exact(key[1]):
                out[key] = torch.from_numpy(-dist[:, 0].astype(np.float64) * (s * s) / (2 * sigma2))
            else:
                out[key] = torch.from_numpy(known[key][0].max(-1))
        return out

    def _candidates(self, q: int, mass: np.ndarray, m: int, noised: NoisedBlock, b: int, patches: dict, weights: list[float],
                    settings: AttributionSettings) -> np.ndarray:
        """Query ``q``'s M candidate ids (sorted): by retrieved mass and thumbnails, re-ranked when
        ``rerank`` > 1; a method so that benchmarks can substitute oracles."""
        share = settings.thumbnail_share_at(noised.t, NoiseSchedule(settings.schedule))
        qthumb = query_thumbnail(noised.mean_image(b), noised.s) if share > 0 else None
        cand = select_candidates(mass, min(m * settings.rerank, self.corpus.count), self.thumbs if share > 0 else None, qthumb, share)
        if len(cand) > m:
            proxy = proxy_scores(self.corpus, cand, patches, self.groups, self.scales, weights, settings.noise_draws,
                                 noised.s, noised.sigma2, self.budget)
            cand = np.sort(cand[np.argsort(-proxy, kind="stable")[:m]])
        return cand
