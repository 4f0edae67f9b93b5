"""The demo: attribute held-out photo crops to the embedded corpus with the exact scorer.

Writes under ``out_dir``: ``store/`` (the corpus, reused when its pixels match), ``scores.parquet``
(see ``results.py``), ``query-<q>.png`` (query, top proponents, contribution maps), ``demo.json``.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .atomic import write_json_atomic
from .corpus.demo_corpus import DemoCorpus, demo_corpus
from .errors import StoreError
from .scoring.exact import exact_attribution
from .results.figures import MAX_PROPONENTS, Proponent, render_attribution
from .results.tables import format_top_table, scores_table, write_parquet_atomic
from .corpus.store import Store, uint8_to_float, write_store


def open_or_write_store(path: Path, corpus: DemoCorpus) -> tuple[Store, bool]:
    """The store at ``path`` if it holds exactly these images and sources, else a freshly written one.

    Returns (store, reused). Equal pixels and shape imply an equal store fingerprint.
    """
    try:
        store = Store.open(path)
        same = (
            store.images.shape == corpus.train.shape
            and np.array_equal(np.asarray(store.images), corpus.train)
            and store.sources() == corpus.train_sources
        )
        if same:
            return store, True
    except StoreError:
        pass
    store = write_store(
        path,
        corpus.train,
        corpus.train_sources,
        transform={"kind": "demo-corpus", "note": "crops of the photographs shipped with scikit-image and scikit-learn"},
        overwrite=path.exists(),
    )
    return store, False


def run_demo(
    out_dir: str | Path,
    n_train: int = 3000,
    n_queries: int = 6,
    timestep: int = 100,
    scale: int | str = 7,
    topk: int | None = 100,
    device: str = "auto",
    *,
    precision: str = "float32",
    seed: int = 0,
    top_print: int = 5,
    echo: Callable[[str], Any] = print,
) -> dict[str, Any]:
    """Build the corpus, score the held-out queries exactly, print and write the results.

    Returns a summary dict: paths written, timings, device and each query's top image ids.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    corpus = demo_corpus(n_train=n_train, n_queries=n_queries, seed=seed)
    times["corpus_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    store, reused = open_or_write_store(out / "store", corpus)
    times["store_s"] = time.perf_counter() - t0
    echo(f"corpus: {len(store)} training crops ({'reused' if reused else 'written'}: {store.path}), {n_queries} held-out queries")

    t0 = time.perf_counter()
    result = exact_attribution(
        store,
        uint8_to_float(corpus.queries),
        timesteps=[timestep],
        scales=[scale],
        topk=topk,
        seed=seed,
        device=device,
        precision=precision,
        maps_for=MAX_PROPONENTS,
        progress=True,
    )
    times["exact_s"] = time.perf_counter() - t0
    echo(f"exact scores at t={timestep}, scale {scale}, topk={topk} on {result.device}: {times['exact_s']:.1f} s")

    sources = store.sources()
    names = [f"q{q}" for q in range(n_queries)]
    labels = dict(zip(names, corpus.query_sources))
    table = scores_table(result.scores, [timestep], sources, names)
    scores_path = write_parquet_atomic(table, out / "scores.parquet")
    echo("")
    echo(format_top_table(table, top=top_print, query_labels=labels))

    t0 = time.perf_counter()
    figures, top = [], {}
    for q, name in enumerate(names):
        ids = np.argsort(-result.scores[0, q], kind="stable")[:MAX_PROPONENTS]
        maps = result.maps(0, q, ids)
        proponents = [
            Proponent(np.asarray(store.images[i]), f"#{i} {sources[i]}", float(result.scores[0, q, i]), maps[k])
            for k, i in enumerate(ids)
        ]
        title = f"{name}: {corpus.query_sources[q]}  (t={timestep}, p={scale}, topk={topk}, N={len(store)})"
        figures.append(str(render_attribution(corpus.queries[q], proponents, out / f"query-{q}.png", title)))
        top[name] = [int(i) for i in ids]
    times["figures_s"] = time.perf_counter() - t0

    summary = {
        "out": str(out),
        "store": str(store.path),
        "store_fingerprint": store.fingerprint,
        "store_reused": reused,
        "scores": str(scores_path),
        "figures": figures,
        "queries": labels,
        "top": top,
        "params": {"n_train": n_train, "n_queries": n_queries, "timestep": timestep, "scale": str(scale),
                   "topk": topk, "precision": precision, "seed": seed},
        "device": result.device,
        "seconds": times,
    }
    write_json_atomic(out / "demo.json", summary)
    echo(f"wrote {scores_path}, {len(figures)} figures and {out / 'demo.json'}")
    return summary
