"""Task-level functions behind the CLI: attribute to a results folder, compare with exact."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .atomic import check_writable, write_json_atomic
from .attribution.attributor import Attribution, Attributor
from .scoring.exact import exact_attribution
from .results.fidelity import fidelity_table
from .corpus.inputs import CorpusView
from .corpus.queries import load_query_batch
from .results.report import write_report
from .corpus.store import Store


def attribute_to_folder(source: Path, queries: Sequence[Any], out: Path, *, exact: bool = False, timesteps: Sequence[int] = (100,), scales=None, alpha=None, topk=None, seed: int = 0, noise_draws: int = 1, schedule: str = "linear", device: str = "auto", k: int = 1024, candidates: int | None = None, nprobe=None, mode: str = "rescore", precision: str | None = None, top: int = 10, maps: int = 8, tail: bool | str | None = None, rerank: int | None = None, outside_sample: int | None = None, outside_smoothing: float | None = None, outside_topup: int | None = None, max_outside: float | None = None, time_budget: float | None = None, tail_retrieved: str = "all", allow_resize: bool = True, engine: str = "local", address: str | None = None, actors: int | None = None, timeout_s: float | None = None) -> str:
    """Attribute ``queries`` against an index (or, with ``exact``, a store); write ``out``; return the table text.

    ``engine="ray"`` serves the index from Ray shard actors (see ``open_attributor``); the scores are the same.

    Queries of another size than the corpus are resized (recorded in summary.json as
    ``resized_queries``), or refused with ``allow_resize=False``.
    """
    started = time.perf_counter()
    check_writable(out)  # a read-only --out fails now, not after the attribution
    if exact:
        store = Store.open(source)
        corpus = CorpusView(store)
        if not scales:
            raise ValueError("--exact needs at least one --scale, e.g. --scale 7 or --scale 14 --scale 10:2")
        batch = load_query_batch(queries, corpus.shape, allow_resize=allow_resize)
        q, names = batch.images, batch.names
        res = exact_attribution(store, q, timesteps=list(timesteps), scales=scales, alpha=alpha, topk=topk, seed=seed, noise_draws=noise_draws, schedule=schedule, device=device, precision=precision or "float64", maps_for=maps, progress=True)
        settings = {"method": "exact", "timesteps": list(timesteps), "scales": [str(s) for s in res.scales], "alpha": alpha, "topk": topk, "seed": seed, "noise_draws": noise_draws, "schedule": schedule, "precision": precision or "float64", "store": str(store.path), "store_fingerprint": store.fingerprint}
        result = Attribution.from_exact(res, corpus.sources(), names, settings)
    else:
        attributor = open_attributor(source, device=device, engine=engine, address=address, actors=actors, timeout_s=timeout_s)
        if scales and [str(s) for s in scales] != [str(s) for s in attributor.scales]:
            raise ValueError(f"the index holds scales {[str(s) for s in attributor.scales]}; --scale must match or be omitted")
        corpus = attributor.corpus
        batch = load_query_batch(queries, corpus.shape, allow_resize=allow_resize)
        q, names = batch.images, batch.names
        result = attributor.attribute(q, list(timesteps), k=k, candidates=candidates, nprobe=nprobe, topk=topk, alpha=alpha, seed=seed, noise_draws=noise_draws, schedule=schedule, mode=mode, precision=precision or "float32", maps=maps, names=names, progress=True, tail=tail, rerank=rerank, outside_sample=outside_sample, outside_smoothing=outside_smoothing, outside_topup=outside_topup, tail_retrieved=tail_retrieved, max_outside=max_outside, time_budget=time_budget)
        result.settings.update({"method": f"index/{mode}", "index": str(source)})
    summary = {"source": str(source), "seconds": round(time.perf_counter() - started, 3), "resized_queries": batch.resized}
    return write_report(Path(out), result, q, corpus, summary, top=top)


def open_attributor(index: Path, *, device: str = "auto", engine: str = "local", address: str | None = None,
                    actors: int | None = None, timeout_s: float | None = None) -> Attributor:
    """``Attributor.open(index)``, or with ``engine="ray"`` one whose searches and pixel reads go to
    ``actors`` shard actors on the Ray cluster at ``address`` (``nda_ann.distributed.open_ray_attributor``)."""
    if engine == "local":
        return Attributor.open(index, device=device)
    return Attributor.open(index, device=device, engine=engine, address=address, actors=actors,
                           **({} if timeout_s is None else {"timeout_s": timeout_s}))


def compare_to_exact(index: Path, queries: Sequence[Any], *, timesteps: Sequence[int] = (100,), json_path: Path | None = None, device: str = "auto", allow_resize: bool = True, **kwargs) -> str:
    """Run the index path and the exact scorer on the same queries and noise; docs/scores.md 7 metrics as text."""
    if json_path:
        check_writable(json_path)
    attributor = Attributor.open(index, device=device)
    batch = load_query_batch(queries, attributor.corpus.shape, allow_resize=allow_resize)
    q, names = batch.images, batch.names
    t0 = time.perf_counter()
    approx = attributor.attribute(q, list(timesteps), names=names, maps=0, progress=True, **kwargs)
    t_index = time.perf_counter() - t0
    t0 = time.perf_counter()
    exact = exact_attribution(attributor.corpus.stores, q, timesteps=list(timesteps), scales=attributor.scales, alpha=kwargs.get("alpha"), topk=kwargs.get("topk"), seed=kwargs.get("seed", 0), noise_draws=kwargs.get("noise_draws", 1), schedule=kwargs.get("schedule", "linear"), device=device, progress=True)
    t_exact = time.perf_counter() - t0
    rows = fidelity_table(approx.scores, exact.scores)
    keys = ("top10_overlap", "spearman", "subset_sum_spearman", "relative_l1")
    lines = [f"{'query':<24} {'t':>5} " + " ".join(f"{k:>20}" for k in keys) + f" {'outside':>9}"]
    for row in rows:
        ti, qi = row["t_index"], row["query"]
        out_mass = float(np.mean(approx.outside_mass[ti, qi])) if approx.outside_mass is not None else float("nan")
        lines.append(f"{names[qi][:24]:<24} {timesteps[ti]:>5} " + " ".join(f"{row[k]:>20.4f}" for k in keys) + f" {out_mass:>9.4f}")
    for ti, t in enumerate(timesteps):
        sel = [r for r in rows if r["t_index"] == ti]
        lines.append(f"{'mean':<24} {t:>5} " + " ".join(f"{np.mean([r[k] for r in sel]):>20.4f}" for k in keys))
    lines.append(f"time: index path {t_index:.2f} s, exact {t_exact:.2f} s ({t_exact / max(t_index, 1e-9):.1f}x)")
    if json_path:
        write_json_atomic(Path(json_path), {"index": str(index), "queries": names, "timesteps": list(timesteps), "settings": approx.settings, "resized_queries": batch.resized, "rows": rows, "seconds": {"index": t_index, "exact": t_exact}})
    return "\n".join(lines)
