"""The known part of the non-candidates' normaliser (attribution/known.py): the tail distances are
measured once per query and masked per round, and equal a naive re-measure from the pixels; the tail's
other retrieved patches (tail_known) take the index distance plus the position's median offset."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from nda_ann import Attributor, build_index, demo_corpus, write_store
from nda_ann.attribution.known import TAIL_K, known_logits, tail_distances, tail_known
from nda_ann.attribution.query_patches import NoisedBlock
from nda_ann.corpus.queries import load_query_batch
from nda_ann.scoring.patches import extract_patches
from nda_ann.scoring.schedule import NoiseSchedule


@pytest.fixture(scope="module")
def lossy(tmp_path_factory):
    """A PCA + SQ8 index (approximate distances: the tail's are re-measured) over 120 demo images, and the corpus."""
    tmp = tmp_path_factory.mktemp("known")
    dc = demo_corpus(n_train=120, n_queries=2, seed=3)
    store = write_store(tmp / "store", dc.train)
    build_index(store, tmp / "ix", ["7"], factory="PCA16,IVF{nlist},SQ8", progress=False)
    return dc, tmp / "ix"


def _hits(att, dc, k: int):
    batch = load_query_batch(dc.queries[:1], att.corpus.shape)
    nb = NoisedBlock.make(batch.images, 100, NoiseSchedule("linear"), 0, 1, att.scales)
    key = nb.keys[0]
    d, i, p = att.searcher.search(att.scales[0], nb.search_vectors(key), k, None)
    return nb, key, {key: (d[0], i[0], p[0])}


def test_known_logits_from_one_tail_measure_equal_a_naive_remeasure_for_every_candidate_set(lossy):
    dc, ix = lossy
    att = Attributor.open(ix)
    sc = att.scales[0]
    assert not att._distances_exact(sc)
    nb, key, hits = _hits(att, dc, 64)
    d, i, p = (x[None] for x in hits[key])
    patches = nb.of(0, torch.device("cpu"), torch.float32)
    tail = tail_distances(att.corpus, hits, patches, {sc: False}, nb.s)
    # naive: every image's patches cut from its pixels, the distance of each hit measured directly
    cut = extract_patches(torch.from_numpy(dc.train).permute(0, 3, 1, 2).double() / 127.5 - 1.0, sc)  # (N, G*G, D)
    q = nb.vectors[key][0].double() / nb.s
    scale_logit = -(nb.s * nb.s) / (2 * nb.sigma2)
    for cand in (np.array([], dtype=np.int64), np.sort(np.unique(i[0][:, 0]))[:20], np.arange(60)):
        got = known_logits(att.corpus, cand, hits, patches, {sc: False}, nb.s, nb.sigma2, tail)[key]
        again = known_logits(att.corpus, cand, hits, patches, {sc: False}, nb.s, nb.sigma2)[key]
        for a, b in zip(got, again):
            assert np.array_equal(a, b)
        logits, image, position = got
        assert logits.shape == (q.shape[0], TAIL_K)
        for u in range(0, q.shape[0], 97):
            for k in range(TAIL_K):
                n, v = int(i[0][u, k]), int(p[0][u, k])
                if n < 0 or n in set(cand.tolist()):
                    assert logits[u, k] == -np.inf and image[u, k] == -1
                else:
                    want = float((q[u] - cut[n, v]).square().sum()) * scale_logit
                    assert abs(logits[u, k] - want) <= 1e-6 * abs(want) and image[u, k] == n and position[u, k] == v


def test_tail_known_appends_the_other_retrieved_at_the_index_distance_plus_the_median_offset(lossy):
    dc, ix = lossy
    att = Attributor.open(ix)
    sc = att.scales[0]
    nb, key, hits = _hits(att, dc, 96)
    dist, image, position = hits[key]
    patches = nb.of(0, torch.device("cpu"), torch.float32)
    tail = tail_distances(att.corpus, hits, patches, {sc: False}, nb.s)
    cand = np.sort(np.unique(image[:, 0]))[:10]
    known = known_logits(att.corpus, cand, hits, patches, {sc: False}, nb.s, nb.sigma2, tail)
    logits, img, pos = tail_known(known, hits, tail, cand, att.corpus.count, nb.s, nb.sigma2)[key]
    assert logits.shape == img.shape == pos.shape == (image.shape[0], 96)
    for a, b in zip((logits, img, pos), known[key]):  # the re-measured part as it was
        assert np.array_equal(a[:, :TAIL_K], b)
    scale_logit = -(nb.s * nb.s) / (2 * nb.sigma2)
    cut = extract_patches(torch.from_numpy(dc.train).permute(0, 3, 1, 2).double() / 127.5 - 1.0, sc)
    q = nb.vectors[key][0].double() / nb.s
    err_index, err_corrected, appended = [], [], 0
    for u in range(image.shape[0]):
        diffs = [tail[key][u, k] - float(dist[u, k]) for k in range(TAIL_K) if np.isfinite(tail[key][u, k])]
        offset, nearest = float(np.median(diffs)), min(tail[key][u, k] for k in range(TAIL_K))
        for k in range(TAIL_K, 96):
            n, v = int(image[u, k]), int(position[u, k])
            if n < 0 or n in set(cand.tolist()):
                assert logits[u, k] == -np.inf and img[u, k] == -1 and pos[u, k] == -1
                continue
            want = max(float(dist[u, k]) + offset, nearest)
            assert abs(logits[u, k] - want * scale_logit) <= 1e-9 * abs(want * scale_logit) and img[u, k] == n and pos[u, k] == v
            true = float((q[u] - cut[n, v]).square().sum())
            err_index.append(abs(float(dist[u, k]) - true))
            err_corrected.append(abs(want - true))
            appended += 1
    assert appended > 1000
    assert np.mean(err_corrected) < 0.5 * np.mean(err_index)  # the offset restores most of what PCA drops
    assert tail_known(known, hits, {}, cand, att.corpus.count, nb.s, nb.sigma2) is known  # exact distances: nothing to add


def test_tail_retrieved_all_scores_more_non_candidates_and_leaves_the_candidates_as_they_were(lossy):
    dc, ix = lossy
    att = Attributor.open(ix)
    kw = dict(candidates=8, k=96, topk=20, maps=0)
    every, remeasured = att.attribute(dc.queries, [100], **kw), att.attribute(dc.queries, [100], tail_retrieved="remeasured", **kw)
    assert every.settings["tail_retrieved"] == "all" and remeasured.settings["tail_retrieved"] == "remeasured"
    for q in range(len(dc.queries)):
        cand = every.candidate_ids[(0, q)]
        np.testing.assert_allclose(every.scores[0, q, cand], remeasured.scores[0, q, cand], rtol=1e-6, atol=1e-12)
        rest = np.setdiff1d(np.arange(every.scores.shape[2]), cand)
        a, r = every.scores[0, q, rest], remeasured.scores[0, q, rest]
        assert np.all(a[r > 0] > 0) and (a > 0).sum() > (r > 0).sum()
    with pytest.raises(ValueError, match="tail_retrieved"):
        att.attribute(dc.queries, [100], tail_retrieved="some", **kw)
