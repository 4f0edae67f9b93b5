"""``open_ray_attributor``: an Attributor whose searches and pixel reads go to shard actors."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..index.search import PatchIndex
from .cluster import connect, require_ray
from .corpus import RemoteCorpus
from .placement import place
from .pool import DEFAULT_TIMEOUT_S, ActorPool
from .searcher import RaySearcher


def default_actors(manifest: dict[str, Any]) -> int:
    """One actor per alive node of the cluster, at most one per shard of the most-sharded scale."""
    ray = require_ray()
    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    return max(1, min(nodes, max(len(e["shards"]) for e in manifest["scales"])))


def open_ray_searcher(index: str | Path, address: str | None = None, actors: int | None = None,
                      timeout_s: float = DEFAULT_TIMEOUT_S, actor_cpus: float | None = None) -> tuple[RaySearcher, RemoteCorpus]:
    """Start the shard actors of ``index`` (the same folder path on every node) on the cluster at
    ``address``; return the searcher and the remote corpus that use them."""
    connect(address)
    local = PatchIndex.open(index)  # manifest and file checks only: no sub-index is loaded here
    placement = place(local.manifest, actors or default_actors(local.manifest))
    pool = ActorPool(str(local.path.resolve()), placement, timeout_s, address, actor_cpus)
    return RaySearcher(local, pool), RemoteCorpus(pool, local.manifest, local.store_paths())


def open_ray_attributor(index: str | Path, address: str | None = None, actors: int | None = None,
                        timeout_s: float = DEFAULT_TIMEOUT_S, *, actor_cpus: float | None = None, **kw: Any):
    """An ``Attributor`` over ``index`` served by ``actors`` shard actors on a Ray cluster.

    ``address``: None (the running Ray session, else a new local cluster), "auto", or "HOST:PORT".
    ``actors``: default one per node (at most one per shard). ``timeout_s``: the longest any actor
    may take to answer one call before a DistributedError. ``actor_cpus``: CPUs each actor
    reserves (its search threads; default Ray's, which reserves none and searches on one thread).
    Other keywords go to ``Attributor`` (``device``, ``memory_budget``). Its results equal
    ``Attributor.open(index)``'s; ``att.searcher.close()`` stops the actors.
    """
    from ..attribution.attributor import Attributor

    searcher, corpus = open_ray_searcher(index, address, actors, timeout_s, actor_cpus)
    manifest = searcher.manifest
    return Attributor(searcher, corpus, searcher.scales, index_id=manifest.get("index_id") or manifest.get("created"),
                      thumbs=searcher.thumbnails(), **kw)
