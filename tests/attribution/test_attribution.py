"""The index path (retrieval + exact re-scoring) against the exact scorer, with an exact searcher."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from nda_ann.attribution.attributor import Attributor
from nda_ann.attribution.rerank import proxy_groups, proxy_scores
from nda_ann.scoring.exact import exact_scores
from nda_ann.scoring.patches import extract_patches, layout_of_positions
from nda_ann.scoring.scales import Scale
from nda_ann.corpus.store import uint8_to_float
from nda_ann.index.torch_search import TorchFlatSearch


@pytest.fixture(scope="module")
def crops():
    from nda_ann.corpus.demo_corpus import demo_corpus

    dc = demo_corpus(n_train=40, n_queries=2, seed=3)
    small = torch.nn.functional.avg_pool2d(uint8_to_float(dc.train), 2)  # 16x16 real crops
    queries = torch.nn.functional.avg_pool2d(uint8_to_float(dc.queries), 2)
    return small[:, :, 2:14, 2:14].contiguous(), queries[:, :, 2:14, 2:14].contiguous()


@pytest.mark.parametrize("scales,topk", [([3], None), ([3], 4), (["4:2"], None), ([4, "2:2"], None), ([4, "2:2"], 5)])
def test_rescoring_all_images_equals_exact(crops, scales, topk):
    corpus, queries = crops
    att = Attributor(TorchFlatSearch(corpus, scales), corpus, scales)
    got = att.attribute(queries, [100, 300], k=16, candidates=len(corpus), topk=topk, precision="float64", outside_sample=0)
    want = exact_scores(corpus, queries, timesteps=[100, 300], scales=scales, topk=topk)
    assert np.abs(got.scores - want).max() <= 1e-9 * want.max()
    assert got.outside_mass.max() == 0


@pytest.mark.parametrize("topk", [None, 3])
def test_fast_mode_with_every_candidate_retrieved_equals_exact(crops, topk):
    corpus, queries = crops
    att = Attributor(TorchFlatSearch(corpus, [3]), corpus, [3])
    every = len(corpus) * 100  # more than any layout class holds: the truncated softmax is the full one
    got = att.attribute(queries, 300, k=every, mode="fast", topk=topk)
    want = exact_scores(corpus, queries, timesteps=300, scales=[3], topk=topk)
    assert np.abs(got.scores - want).max() <= 1e-6 * want.max()


def test_fast_mode_through_a_pixel_code_index_equals_exact(crops, tmp_path):
    """Pixel codes are lossless: with every list probed and every candidate retrieved, the truncated
    softmax over the index's own distances is the exact score."""
    from nda_ann.index import build_index
    from nda_ann.corpus.store import write_store

    corpus, queries = crops
    u8 = ((corpus + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    store = write_store(tmp_path / "store", u8)
    index = build_index(store, tmp_path / "ix", ["3"], factory="IVF2,SQ8pixel", progress=False)
    assert {c["factory"] for c in index.manifest["scales"][0]["classes"]} == {"IVF2,SQ8pixel", "Flat"}
    att = Attributor.open(tmp_path / "ix")
    got = att.attribute(queries, 300, k=len(corpus) * 100, nprobe=2, mode="fast")
    want = exact_scores(store, queries, timesteps=300, scales=[3])
    assert np.abs(got.scores - want).max() <= 1e-5 * want.max()


def test_torch_search_returns_brute_force_neighbours_of_the_same_layout(crops):
    corpus, queries = crops
    scale = Scale(5)
    q = extract_patches(queries, scale).numpy()  # (Q, L, D)
    dist, image, position = TorchFlatSearch(corpus, [scale], chunk_images=7).search(scale, q, 6)
    cand = extract_patches(corpus, scale).numpy()  # (N, L, D)
    layout = layout_of_positions(12, scale).numpy()
    for qi in range(q.shape[0]):
        for u in [0, 5, 30, 77, 143]:
            same = np.nonzero(layout == layout[u])[0]
            d = ((cand[:, same] - q[qi, u]) ** 2).sum(-1)  # (N, V)
            want = np.sort(d.ravel())[:6]
            np.testing.assert_allclose(dist[qi, u], want, rtol=1e-4, atol=1e-4)
            assert set(layout[position[qi, u]]) == {layout[u]}
            got_d = ((cand[image[qi, u], position[qi, u]] - q[qi, u]) ** 2).sum(-1)
            np.testing.assert_allclose(got_d, dist[qi, u], rtol=1e-4, atol=1e-4)


def test_small_candidate_set_finds_copy_and_reports_outside_mass(crops):
    corpus, _ = crops
    att = Attributor(TorchFlatSearch(corpus, [3]), corpus, [3])
    # the plain share (outside_smoothing=0) is the one the normaliser of the scores uses
    res = att.attribute(corpus[[7, 21]], [100, 500], k=32, candidates=5, outside_sample=8, seed=1, tail=False, outside_smoothing=0)
    assert [res.top(q, 1, 100)[0][0] for q in range(2)] == [7, 21]
    assert ((res.outside_mass > 0) & (res.outside_mass < 1)).all()
    per_image = res.scores
    assert (np.count_nonzero(per_image, axis=-1) <= 5).all()
    # mass of the candidates plus the estimated outside share is the positions count (144)
    np.testing.assert_allclose(per_image.sum(-1) / (1 - res.outside_mass[..., 0]), 144, rtol=1e-4)


def test_attribution_api_inputs_heatmaps_and_parquet(crops, tmp_path):
    import pyarrow.parquet as pq

    corpus, queries = crops
    att = Attributor(TorchFlatSearch(corpus, [3]), corpus, [3])
    u8 = ((queries[0].permute(1, 2, 0) + 1) * 127.5).round().to(torch.uint8).numpy()
    Image.fromarray(u8).save(tmp_path / "q.png")
    res = att.attribute([tmp_path / "q.png", Image.fromarray(u8), u8, uint8_to_float(u8[None])[0]], [100, 300], k=16, candidates=10)
    s = res.scores
    assert s.shape == (2, 4, len(corpus))
    np.testing.assert_allclose(s[:, 1:], np.repeat(s[:, :1], 3, axis=1), atol=1e-5 * s.max())
    best, score, _ = res.top(0, 1, 100)[0]
    heat = res.heatmap(0, best, timestep=100)
    assert heat.shape == (12, 12) and heat.sum() == pytest.approx(score, rel=1e-6)
    with pytest.raises(KeyError, match="maps are kept"):
        res.heatmap(0, int(np.argmin(s[0, 0])), timestep=100)
    res.to_parquet(tmp_path / "s.parquet")
    rows = pq.read_table(tmp_path / "s.parquet").to_pylist()
    assert {r["timestep"] for r in rows} == {100, 300, -1}
    assert all(r["score"] > 0 for r in rows)
    first = [r for r in rows if r["query"] == "q.png" and r["timestep"] == 100 and r["rank"] == 1][0]
    assert first["image_id"] == best


def test_heatmaps_cover_the_top_images_by_mean_and_per_timestep_and_sum_to_their_scores(crops):
    """With several timesteps, every image in the top ``maps`` by mean score or at a timestep has a
    map at every timestep: a candidate's dense map, a non-candidate's retrieved-patch (tail) map,
    or zeros where it scored nothing; each sums to that timestep's score."""
    corpus, queries = crops
    att = Attributor(TorchFlatSearch(corpus, [3, "2:2"]), corpus, [3, "2:2"])
    res = att.attribute(queries, [100, 300, 500], k=16, candidates=4, maps=6)
    for q in range(len(queries)):
        chosen = {i for i, _, _ in res.top(q, 6)} | {i for t in res.timesteps for i, _, _ in res.top(q, 6, t)}
        cand_at = [set(res.sparse[(ti, q)][0].tolist()) for ti in range(3)]
        assert any(len(c) > 4 for c in cand_at)  # tail images scored too
        for ti, t in enumerate(res.timesteps):
            ids, vals = res.query_scores(q, t)
            score = dict(zip(ids.tolist(), vals.tolist()))
            assert set(res.kept_maps[(ti, q)]) == chosen
            for i in chosen:
                heat = res.heatmap(q, i, timestep=t)
                assert heat.shape == (12, 12) and heat.min() >= 0
                assert heat.sum() == pytest.approx(score.get(i, 0.0), rel=1e-6, abs=1e-12)
        for i, mean_score, _ in res.top(q, 6):
            assert res.heatmap(q, i).sum() == pytest.approx(mean_score, rel=1e-6)


def test_exact_maps_cover_the_top_images_by_mean_too(crops):
    from nda_ann.scoring.exact import exact_attribution

    corpus, queries = crops
    ex = exact_attribution(corpus, queries, timesteps=[100, 500], scales=[3], topk=4, maps_for=3)
    mean = ex.scores.mean(0)
    for q in range(len(queries)):
        by_mean = np.argsort(-mean[q], kind="stable")[:3]
        for ti in range(2):
            maps = ex.maps(ti, q, by_mean)
            np.testing.assert_allclose(maps.sum(axis=(1, 2)), ex.scores[ti, q, by_mean], rtol=1e-6)


def test_tail_option_scores_retrieved_non_candidates_and_leaves_candidates_alone(crops):
    corpus, queries = crops
    att = Attributor(TorchFlatSearch(corpus, [3]), corpus, [3])
    kw = dict(k=64, candidates=5, outside_sample=8, topk=None)
    base = att.attribute(queries, 300, tail=False, **kw).scores[0]
    default = att.attribute(queries, 300, **kw).scores[0]  # the default: the tail scaled to the outside mass
    scaled = att.attribute(queries, 300, tail="scaled", **kw).scores[0]
    tail = att.attribute(queries, 300, tail=True, **kw).scores[0]
    for q in range(len(queries)):
        cand = np.nonzero(base[q])[0]
        np.testing.assert_array_equal(tail[q, cand], base[q, cand])
        others = np.setdiff1d(np.arange(len(corpus)), cand)
        assert (tail[q, others] > 0).any() and (tail[q, others] >= 0).all()
    np.testing.assert_array_equal(default, scaled)


class _Shifted:
    """An exact searcher whose distances come back wrong by a constant (as PCA or quantised codes
    misjudge them), and which says so. The shift leaves every softmax over the retrieved, and so
    the candidates, unchanged; only the use of the distances themselves would differ."""

    def __init__(self, inner, shift: float = 3.0):
        self.inner, self.shift = inner, shift

    def search(self, *args, **kwargs):
        dist, image, position = self.inner.search(*args, **kwargs)
        return dist + self.shift, image, position

    def distances_exact(self, scale) -> bool:
        return False


def test_retrieved_non_candidates_bound_the_normaliser_with_exact_distances(crops):
    """Without an outside sample the normaliser holds the candidates plus the exactly known mass of
    the retrieved non-candidates, a part of the full one: each candidate's score is at least its
    exact score. An index with approximate distances gets the same, its retrieved distances
    re-measured from the pixels."""
    corpus, queries = crops
    search = TorchFlatSearch(corpus, [3])
    kw = dict(k=32, candidates=6, outside_sample=0, precision="float64")
    exact = exact_scores(corpus, queries, timesteps=300, scales=[3])[0]
    honest = Attributor(search, corpus, [3]).attribute(queries, 300, tail=False, **kw)
    shifted = Attributor(_Shifted(search), corpus, [3]).attribute(queries, 300, tail=False, **kw)
    for q in range(len(queries)):
        ids, got = honest.sparse[(0, q)]
        assert len(ids) == 6 and (got >= exact[q, ids] * (1 - 1e-9)).all()
    assert (honest.outside_mass > 0).all()
    np.testing.assert_allclose(shifted.scores, honest.scores, rtol=1e-5)
    np.testing.assert_allclose(shifted.outside_mass, honest.outside_mass, rtol=1e-5)


def test_tail_from_an_index_with_approximate_distances_re_measures_them(crops):
    corpus, queries = crops
    search = TorchFlatSearch(corpus, [3, "2:2"])
    kw = dict(k=32, candidates=5, outside_sample=8, tail=True, precision="float64")
    honest = Attributor(search, corpus, [3, "2:2"]).attribute(queries, [100, 300], **kw).scores
    shifted = Attributor(_Shifted(search), corpus, [3, "2:2"]).attribute(queries, [100, 300], **kw).scores
    assert (np.count_nonzero(honest, axis=-1) > 5).all()
    np.testing.assert_allclose(shifted, honest, rtol=1e-5, atol=1e-12)


def test_rerank_by_exact_mass_on_a_query_subset_recovers_the_best_candidates(crops):
    """A stride-3 searcher ranks images by retrieved mass less well; re-ranking a pool of 4 M by
    exact mass at a subset of query positions must find candidates at least as good, and with
    the pool being every image it must pick the M images of largest proxy exactly."""
    corpus, queries = crops
    coarse = TorchFlatSearch(corpus, [3], stride=3)
    assert coarse.coarse_grid and not TorchFlatSearch(corpus, [3]).coarse_grid
    att = Attributor(coarse, corpus, [3])
    kw = dict(k=16, candidates=4, outside_sample=0, tail=False, precision="float64")
    exact = exact_scores(corpus, queries, timesteps=100, scales=[3])[0]
    plain = att.attribute(queries, 100, rerank=1, **kw)
    reranked = att.attribute(queries, 100, rerank=4, **kw)
    assert reranked.settings["rerank"] == 4 and att.attribute(queries[:1], 100, **kw).settings["rerank"] == 1
    for q in range(len(queries)):
        got = lambda r: set(r.sparse[(0, q)][0].tolist())
        best = set(np.argsort(-exact[q])[:4].tolist())
        assert len(got(reranked) & best) >= len(got(plain) & best)
    # the proxy against an independent computation: softmax over the pool of per-position logsumexps
    pool = np.arange(len(corpus))
    s, sigma2 = 0.946101, 1 - 0.895141
    noisy = [queries[:1] * s + sigma2 ** 0.5 * torch.randn_like(queries[:1])]
    patches = {(0, Scale(3)): extract_patches(noisy[0].double(), Scale(3))}
    proxy = proxy_scores(att.corpus, pool, patches, att.groups, att.scales, [1.0], 1, s, sigma2, att.budget)
    qp = extract_patches(noisy[0].double(), Scale(3))[0]
    cp = extract_patches(corpus.double() * s, Scale(3))
    want = np.zeros(len(pool))
    groups = proxy_groups(att.groups[Scale(3)], Scale(3).grid(12))
    for qpos, cpos, weight in groups:
        for u in qpos.tolist():
            d = ((cp[:, cpos] - qp[u]) ** 2).sum(-1)  # (N, |cpos|)
            lse = torch.logsumexp(-d / (2 * sigma2), -1)
            want += weight * torch.softmax(lse, 0).numpy()
    np.testing.assert_allclose(proxy, want, rtol=1e-9)
    assert sum(len(q) for q, _, _ in groups) < 12 * 12  # a subset of the query positions...
    assert sum(len(q) * w for q, _, w in groups) == pytest.approx(12 * 12)  # ...standing for all of them


@pytest.mark.parametrize("scale", ["5", "4:2", "3"])
def test_patch_vectors_read_from_the_store_equal_extract_patches(crops, tmp_path, scale):
    from nda_ann.corpus.inputs import CorpusView
    from nda_ann.corpus.store import write_store

    corpus, _ = crops
    u8 = ((corpus.permute(0, 2, 3, 1) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    store_view = CorpusView(write_store(tmp_path / "s", u8))
    sc = Scale.parse(scale)
    full = extract_patches(store_view.take(np.arange(len(corpus))), sc)  # (N, L, D)
    rng = np.random.default_rng(0)
    ids, pos = rng.integers(0, len(corpus), 300), rng.integers(0, full.shape[1], 300)
    for view in (store_view, CorpusView(store_view.take(np.arange(len(corpus))))):
        got = view.patch_vectors(ids, pos, sc)
        torch.testing.assert_close(got, full[torch.from_numpy(ids), torch.from_numpy(pos)], rtol=0, atol=1e-6)


def test_queries_searched_in_blocks_score_as_one_at_a_time(crops, monkeypatch):
    """Blocking the search (QUERY_BLOCK) changes no score, map or outside mass: 5 queries in blocks of 2
    (the last block short) against each query attributed alone. (Float32 search distances may differ
    in the last bit with the batch's shape, so: to float32 rounding.)"""
    import nda_ann.attribution.attributor as attribution

    corpus, queries = crops
    five = torch.cat([queries, queries.flip(-1), queries[:1].flip(-2)])
    att = Attributor(TorchFlatSearch(corpus, [3]), corpus, [3])
    kw = dict(k=16, candidates=6, topk=4, maps=2, outside_sample=8)
    monkeypatch.setattr(attribution, "QUERY_BLOCK", 2)
    together = att.attribute(five, [100, 300], **kw)
    for q in range(len(five)):
        alone = att.attribute(five[q : q + 1], [100, 300], **kw)
        np.testing.assert_allclose(together.scores[:, q], alone.scores[:, 0], rtol=1e-5, atol=1e-6)
        # the outside share is a sum of a few sampled exp(logit) terms and of retrieved search distances, each
        # float32 and rounded differently with the block's shape: 2.7e-4 relative measured on an Intel Xeon
        # (AMX), where MKL / oneDNN block the batched products otherwise than on the AMD EPYC (same bits
        # there); queries mixed up within a block would differ by far more (the five shares differ by 20% or more)
        np.testing.assert_allclose(together.outside_mass[:, q], alone.outside_mass[:, 0], rtol=1e-3, atol=1e-7)
        for t in (100, 300):
            top = alone.top(0, 1, timestep=t)[0][0]
            assert together.top(q, 1, timestep=t)[0][0] == top
            np.testing.assert_allclose(together.heatmap(q, top, timestep=t), alone.heatmap(0, top, timestep=t), rtol=1e-5, atol=1e-7)


def test_a_huge_k_is_clipped_and_bad_requests_get_clear_errors(crops):
    """Issue 14: k far beyond what the index holds is clipped to what a layout class holds (and to a bounded
    amount of work per query), not allocated; no timesteps, a repeated timestep, a query or timestep not in
    the result are named."""
    corpus, queries = crops
    att = Attributor(TorchFlatSearch(corpus, [3]), corpus, [3])
    got = att.attribute(queries, 100, k=10**8, candidates=4, maps=0)
    held = len(corpus) * max(len(g) for g in att.groups[Scale(3)])
    assert got.settings["k"] == min(held, att.max_k()) < 10**8
    want = att.attribute(queries, 100, k=held, candidates=4, maps=0)
    np.testing.assert_array_equal(got.scores, want.scores)
    assert att.max_k() < 10**8 and Attributor(TorchFlatSearch(corpus, [3]), corpus, [3]).max_k(draws=4) <= att.max_k()
    with pytest.raises(ValueError, match="at least one timestep"):
        att.attribute(queries, [])
    with pytest.raises(ValueError, match="duplicate timesteps"):
        att.attribute(queries, [100, 100])
    with pytest.raises(IndexError, match="holds 2 queries"):
        got.top(5, 3)
    with pytest.raises(KeyError, match="timestep 300 was not attributed"):
        got.top(0, 3, timestep=300)


def test_where_m_is_half_the_corpus_every_image_is_rescored_without_a_search(crops):
    """Issue 14, item 12: with M >= N / 2 the two-stage path would search, sample and re-score most of the
    corpus anyway; it re-scores every image instead (no search call), and its scores are the exact ones."""
    corpus, queries = crops

    class Counting(TorchFlatSearch):
        calls = 0

        def search(self, *a, **kw):
            Counting.calls += 1
            return super().search(*a, **kw)

    att = Attributor(Counting(corpus, [3]), corpus, [3])
    got = att.attribute(queries, [100, 300], candidates=len(corpus) // 2, topk=4, maps=2)
    assert Counting.calls == 0
    want = exact_scores(corpus, queries, timesteps=[100, 300], scales=[3], topk=4, precision="float32")
    assert np.abs(got.scores - want).max() <= 1e-4 * want.max()
    assert got.outside_mass.max() == 0 and (got.candidates_used == len(corpus)).all()
    att.attribute(queries, 100, candidates=len(corpus) // 2 - 1, maps=0)
    assert Counting.calls == len(queries)  # below half: the index is searched, once per query
