"""The Ray build: each shard's image range is added in its own Ray task, by the local build's code.

``build_index(..., engine="ray")`` trains the templates on the driver as a local build does, then
calls the runner made here for each scale in place of the local loop. The runner checks which
shards are already checkpointed (a resumed build reuses them, as locally), ships the scale's
trained templates once through the object store, and keeps at most ``workers`` range tasks in
flight. Each task opens the store by path and runs ``index.build.build_range``, which writes the
shard folder atomically with its checkpoint: the store and the index's staging folder must be at
the same path on every node (one machine, or a shared filesystem). A task whose worker dies is
retried by Ray (``MAX_RETRIES``); a retry rebuilds the range from scratch, so the shard is the same.
"""
from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any, Callable, Sequence

from tqdm.auto import tqdm

from ..corpus.store import Store
from ..index.layout_ids import ClassLayout
from ..index.plan import specs_of
from ..index.shard import template_bytes
from ..index.phases import log
from .cluster import cluster_cpus, connect, gather

MAX_RETRIES = 3
KILL_ONCE_ENV = "NDA_ANN_TEST_RAY_KILL_ONCE"  # test hook: a path; the first task to see it absent writes
                                             # its pid there and SIGKILLs its worker after its first batch


def _dying_after_first(batches: Callable[..., Any]) -> Callable[..., Any]:
    """``store.batches`` that SIGKILLs this process after yielding its first batch (fault tests)."""
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        for n, item in enumerate(batches(*args, **kwargs)):
            if n == 1:
                os.kill(os.getpid(), signal.SIGKILL)
            yield item
    return wrapped


def range_task(store_path: str, entry: dict[str, Any], layouts: Sequence[ClassLayout], scale_root: str,
               template_dir: str, rows: tuple[int, int], offset: int, sid: int, batch: int, use_gpu: bool,
               templates: dict[int, bytes], kill_marker: str | None = None) -> tuple[dict[str, Any], bool]:
    """One Ray task: ``build_range`` of store rows ``rows`` into shard ``sid``; (manifest entry, built now)."""
    from ..index.build import build_range

    store = Store.open(store_path)
    if kill_marker:
        try:
            with open(kill_marker, "x") as fh:
                fh.write(str(os.getpid()))
            store.batches = _dying_after_first(store.batches)  # type: ignore[method-assign]
        except FileExistsError:
            pass
    return build_range(store, entry, layouts, Path(scale_root), Path(template_dir), tuple(rows), offset, sid,
                       batch, use_gpu, False, templates)


def ray_shard_runner(address: str | None, workers: int | None) -> Callable[..., list[dict[str, Any]]]:
    """A function with the signature of ``index.build._build_shards`` that builds through Ray tasks."""
    ray = connect(address)
    limit = int(workers) if workers else cluster_cpus()
    if limit < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    remote = ray.remote(max_retries=MAX_RETRIES, retry_exceptions=False)(range_task)

    def run(store: Store, entry: dict[str, Any], layouts: Sequence[ClassLayout], scale_root: Path,
            template_dir: Path, rows_list: Sequence[tuple[int, int]], offset: int, first_shard: int, batch: int,
            use_gpu: bool, progress: bool, counter: list[int]) -> list[dict[str, Any]]:
        from ..index.build import count_built, done_shard, shard_entry

        out: dict[int, dict[str, Any]] = {}
        todo = []
        for k, rows in enumerate(rows_list):
            done = done_shard(store, entry, scale_root, rows, offset, first_shard + k)
            if done is not None:
                log.info("scale %s: shard %d already built, reused", entry["scale"], first_shard + k)
                out[k] = shard_entry(first_shard + k, done)
            else:
                todo.append(k)
        if todo:
            templates = ray.put(template_bytes(template_dir, layouts, specs_of(entry)))
            opts = {"num_gpus": 1} if use_gpu else {}
            submit = lambda k: remote.options(**opts).remote(  # noqa: E731
                str(store.path), entry, list(layouts), str(scale_root), str(template_dir), tuple(rows_list[k]), offset,
                first_shard + k, batch, use_gpu, templates, os.environ.get(KILL_ONCE_ENV))
            _drain(ray, todo, submit, limit, out, counter, count_built, progress, f"scale {entry['scale']} shards")
        return [out[k] for k in range(len(rows_list))]

    return run


def _drain(ray: Any, todo: list[int], submit: Callable[[int], Any], limit: int, out: dict[int, dict[str, Any]],
           counter: list[int], count_built: Callable[[list[int]], None], progress: bool, desc: str) -> None:
    """Run ``submit(k)`` for every k in ``todo`` with at most ``limit`` in flight; collect into ``out``."""
    queue, flight = list(todo), {}
    bar = tqdm(total=len(todo), desc=desc, unit="shard", disable=not progress, leave=False)
    while queue or flight:
        while queue and len(flight) < limit:
            k = queue.pop(0)
            flight[submit(k)] = k
        ready, _ = ray.wait(list(flight), num_returns=1)
        for ref in ready:
            k = flight.pop(ref)
            out[k], built = gather([ref], None, [f"{desc}: range task {k}"])[0]
            if built:
                count_built(counter)
            bar.update(1)
    bar.close()
