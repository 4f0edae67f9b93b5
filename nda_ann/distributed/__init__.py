"""Past one machine: build, ingest and query through a Ray cluster (extra ``nda-ann[ray]``).

Modules: cluster (connect, deadlines, errors), build (shard ranges as Ray tasks), ingest (decoding
in Ray tasks), placement (which actor holds which shards and images), actors (ShardActor), pool
(the actors of one index, byte counts), searcher (RaySearcher: fan-out and merge), corpus
(RemoteCorpus: pixels from the actors), open (open_ray_attributor). Ray is imported only when one
of them is used, so ``import nda_ann`` works without it. Tests: tests/distributed/test_ray.py; benchmark:
tools/bench_ray.py.
"""
from __future__ import annotations

from typing import Any

from .cluster import DistributedError

__all__ = ["DistributedError", "open_ray_attributor", "open_ray_searcher", "RaySearcher", "RemoteCorpus", "place"]

_LAZY = {"open_ray_attributor": "open", "open_ray_searcher": "open", "RaySearcher": "searcher",
         "RemoteCorpus": "corpus", "place": "placement"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from importlib import import_module

        return getattr(import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(name)
