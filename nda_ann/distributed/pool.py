"""The shard actors of one index on a Ray cluster: start them, call them, count the bytes moved.

Actors are restarted once by Ray when their process dies (``MAX_RESTARTS``) and a call in flight
is then retried on the restarted actor (``MAX_TASK_RETRIES``): a killed actor costs a restart, not
a wrong answer. A call that gets no answer within ``timeout_s`` raises a DistributedError naming
the actor; nothing partial is ever returned.
"""
from __future__ import annotations

from collections import Counter
from typing import Any, Sequence

import numpy as np

from .actors import ShardActor
from .cluster import connect, gather, log
from .placement import Placement

MAX_RESTARTS = 1
MAX_TASK_RETRIES = 1
DEFAULT_TIMEOUT_S = 120.0
START_TIMEOUT_S = 300.0  # a restarted or new actor opens its shards and stores (memory maps: seconds)


class ActorPool:
    """One ``ShardActor`` per placement slot, spread over the cluster's nodes.

    ``traffic`` counts the coordinator's bytes as the arrays' ``nbytes``: ``vectors`` sent (query
    vectors, once per actor searched), ``results`` received (their top-k), ``ids`` sent and
    ``pixels`` received (uint8 rows); ``calls`` counts the search calls.
    """

    def __init__(self, index_path: str, placement: Placement, timeout_s: float = DEFAULT_TIMEOUT_S,
                 address: str | None = None, actor_cpus: float | None = None):
        self.ray = connect(address)
        self.placement = placement
        self.timeout_s = float(timeout_s)
        self.traffic: Counter[str] = Counter()
        opts: dict[str, Any] = {"max_restarts": MAX_RESTARTS, "max_task_retries": MAX_TASK_RETRIES,
                                "scheduling_strategy": "SPREAD"}
        if actor_cpus is not None:
            opts["num_cpus"] = actor_cpus
        cls = self.ray.remote(ShardActor).options(**opts)
        self.actors = [cls.remote(str(index_path), placement.shards[a], (placement.bounds[a], placement.bounds[a + 1]))
                       for a in range(placement.actors)]
        self.labels = [placement.label(a) for a in range(placement.actors)]
        self.info = gather([h.info.remote() for h in self.actors], max(self.timeout_s, START_TIMEOUT_S), self.labels)
        log.info("%d shard actors ready: %s", len(self.actors), self.info)

    def call(self, method: str, which: Sequence[int], args: Sequence[Sequence[Any]]) -> list[Any]:
        """``actor.method(*args[i])`` on actors ``which[i]``, all within the timeout; results in that order."""
        refs = [getattr(self.actors[a], method).remote(*arg) for a, arg in zip(which, args)]
        return gather(refs, self.timeout_s, [f"{self.labels[a]}.{method}" for a in which])

    def search(self, scale: str, vectors: np.ndarray, k: int, nprobe: int | None) -> list[tuple[np.ndarray, ...]]:
        """Every actor holding shards at ``scale`` searches ``vectors`` (Q, L, D): their partial top-k, in actor order."""
        which = [a for a in range(self.placement.actors) if self.placement.shards[a].get(scale)]
        ref = self.ray.put(vectors)
        parts = self.call("search", which, [(scale, ref, k, nprobe)] * len(which))
        self.traffic["vectors"] += vectors.nbytes * len(which)
        self.traffic["results"] += sum(a.nbytes for part in parts for a in part)
        self.traffic["calls"] += 1
        return parts

    def pixels(self, ids: np.ndarray) -> np.ndarray:
        """(n, H, W, C) uint8 pixels of global ids (n,), fetched from the actors that own them."""
        ids = np.asarray(ids, dtype=np.int64)
        owner = self.placement.owner(ids)
        which = [int(a) for a in np.unique(owner)]
        sel = [np.nonzero(owner == a)[0] for a in which]
        parts = self.call("pixels", which, [(ids[s],) for s in sel])
        shape = parts[0].shape[1:] if parts else (0, 0, 0)
        out = np.empty((len(ids), *shape), dtype=np.uint8)
        for s, part in zip(sel, parts):
            out[s] = part
        self.traffic["ids"] += ids.nbytes
        self.traffic["pixels"] += out.nbytes
        return out

    def sources(self) -> list[str]:
        """Source names of every image, in id order."""
        parts = self.call("sources", range(self.placement.actors), [()] * self.placement.actors)
        return [name for part in parts for name in part]

    def close(self) -> None:
        """Stop the actors (they also stop when this process ends)."""
        for h in self.actors:
            self.ray.kill(h, no_restart=True)
        self.actors = []
