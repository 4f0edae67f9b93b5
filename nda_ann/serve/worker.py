"""One attribution thread fed by a bounded queue: the Attributor is not thread-safe (FAISS nprobe
is set on shared sub-indexes), so every job runs on the same thread, one at a time."""
from __future__ import annotations

import queue
import threading
from concurrent.futures import Future
from typing import Any, Callable


class Busy(Exception):
    """The queue is full: the caller should answer 503 and let the client retry."""


class SerialWorker:
    """Runs submitted callables one at a time on one daemon thread; at most ``queue_size`` wait."""

    def __init__(self, queue_size: int, name: str = "nda-ann-attribute"):
        if queue_size < 1:
            raise ValueError(f"queue_size must be at least 1, got {queue_size}")
        self.queue_size = queue_size
        self._jobs: queue.Queue = queue.Queue(maxsize=queue_size)
        self._running = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    @property
    def waiting(self) -> int:
        """Jobs queued and not started."""
        return self._jobs.qsize()

    @property
    def busy(self) -> bool:
        """Whether a job is running now."""
        return self._running.is_set()

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        """Queue ``fn(*args)``; its Future resolves on the worker thread. Raises Busy when the queue is full."""
        if not self._thread.is_alive():
            raise RuntimeError("the attribution worker has stopped")
        fut: Future = Future()
        try:
            self._jobs.put_nowait((fut, fn, args))
        except queue.Full:
            raise Busy(f"the server is busy: {self.queue_size} requests are already waiting; retry shortly") from None
        return fut

    def _loop(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            fut, fn, args = job
            if not fut.set_running_or_notify_cancel():
                continue
            self._running.set()
            try:
                fut.set_result(fn(*args))
            except BaseException as err:  # the thread must outlive any job's failure
                fut.set_exception(err)
            finally:
                self._running.clear()

    def close(self, timeout: float | None = 30.0) -> None:
        """Let queued jobs finish, then stop the thread (waits at most ``timeout`` seconds)."""
        if self._thread.is_alive():
            self._jobs.put(None)
            self._thread.join(timeout)
