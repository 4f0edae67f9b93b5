"""The known part of the non-candidates' normaliser (attribution/known.py): the tail distances are
measured once per query and masked per round, and equal a naive re-measure from the pixels."""
from __future__ import annotations

import numpy as np
import torch

from nda_ann import Attributor, build_index, demo_corpus, write_store
from nda_ann.attribution.known import TAIL_K, known_logits, tail_distances
from nda_ann.attribution.query_patches import NoisedBlock
from nda_ann.corpus.queries import load_query_batch
from nda_ann.scoring.patches import extract_patches
from nda_ann.scoring.schedule import NoiseSchedule


def test_known_logits_from_one_tail_measure_equal_a_naive_remeasure_for_every_candidate_set(tmp_path):
    dc = demo_corpus(n_train=120, n_queries=1, seed=3)
    store = write_store(tmp_path / "store", dc.train)
    build_index(store, tmp_path / "ix", ["7"], factory="PCA16,IVF{nlist},SQ8", progress=False)  # lossy: distances re-measured
    att = Attributor.open(tmp_path / "ix")
    sc = att.scales[0]
    assert not att._distances_exact(sc)
    batch = load_query_batch(dc.queries, att.corpus.shape)
    nb = NoisedBlock.make(batch.images, 100, NoiseSchedule("linear"), 0, 1, att.scales)
    key = nb.keys[0]
    d, i, p = att.searcher.search(sc, nb.search_vectors(key), 64, None)
    hits = {key: (d[0], i[0], p[0])}
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
