"""The Ray ingest: batches of inputs decoded in Ray tasks in place of the local process pool.

``ingest(..., engine="ray")`` keeps everything else of a local ingest: the driver lists and reads
the source in order (file paths for a folder, the encoded bytes of each Parquet row, array rows),
and writes the pixels, records and checkpoints, so the store is byte-identical to a local
ingest's and an interrupted one resumes the same way. The CPU-heavy part (decoding, EXIF,
resizing, cropping: ``ingest.process_item``) runs on the cluster, at most ``workers`` batches in
flight, results taken in order. A task whose worker dies is retried by Ray.
"""
from __future__ import annotations

from collections import deque
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator

from .cluster import cluster_cpus, connect, gather

MAX_RETRIES = 3


def decode_batch(fn: Callable[[Any], Any], items: list[Any]) -> list[Any]:
    """One Ray task: ``fn`` (``process_item`` with its arguments bound) over a batch of items."""
    return [fn(item) for item in items]


@contextmanager
def ray_decoder(fn: Callable[[Any], Any], workers: int | None,
                address: str | None = None) -> Iterator[Callable[[Iterable[list[Any]]], Iterator[tuple[list[Any], list[Any]]]]]:
    """Like ``ingest._decoder``: yield a function mapping batches of items to (batch, results) in
    order, with at most ``workers`` (default: the cluster's CPUs, at least 2) batches in Ray tasks."""
    ray = connect(address)
    limit = int(workers) if workers else max(2, cluster_cpus())
    remote = ray.remote(max_retries=MAX_RETRIES, retry_exceptions=False)(decode_batch)
    fn_ref = ray.put(fn)

    def run(batches: Iterable[list[Any]]) -> Iterator[tuple[list[Any], list[Any]]]:
        flight: deque[tuple[list[Any], Any]] = deque()
        for b in batches:
            flight.append((b, remote.remote(fn_ref, b)))
            if len(flight) >= limit:
                head, ref = flight.popleft()
                yield head, gather([ref], None, ["ingest decode task"])[0]
        while flight:
            head, ref = flight.popleft()
            yield head, gather([ref], None, ["ingest decode task"])[0]

    yield run
