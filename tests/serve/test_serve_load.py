"""Load on loopback: 8 concurrent clients against a real `nda-ann serve` process for
NDA_ANN_LOAD_SECONDS (60 by default), every request answered 2xx, the server's RSS flat after
warm-up. Bounded: a deadline, a cap on requests per client, timeouts on every call; it stops the
server itself. Marked ``load``; CI runs it."""
from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from serve_helpers import build_small_index, free_port, multipart, require

require("fastapi")
require("uvicorn")

pytestmark = pytest.mark.load
DURATION_S = float(os.environ.get("NDA_ANN_LOAD_SECONDS", "60"))
CLIENTS = 8
WARMUP_SHARE = 0.25          # the first quarter of the run is warm-up (caches and allocator filling)
RSS_TOLERANCE = 24 << 20     # after warm-up the RSS may move by at most 24 MiB
MAX_REQUESTS_PER_CLIENT = 5_000
TIMEOUT_S = 60


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def _start_server(index: Path, log: Path) -> tuple[subprocess.Popen, int]:
    """`nda-ann serve` on a free loopback port, its output in ``log``; returns once /health answers."""
    port = free_port()
    cmd = [sys.executable, "-m", "nda_ann", "serve", str(index), "--port", str(port), "--cache-mb", "1", "--queue-size", str(CLIENTS)]
    with open(log, "wb") as out:  # a file, not a pipe: nobody reads it while the server runs
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return proc, port
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"the server did not come up: {log.read_text()[-2000:]}")


class Client(threading.Thread):
    """Posts queries, fetches one heatmap of each answer and /health now and then, until ``deadline``."""

    def __init__(self, port: int, bodies: list[tuple[bytes, str]], deadline: float):
        super().__init__(daemon=True)
        self.port, self.bodies, self.deadline = port, bodies, deadline
        self.latencies: list[float] = []
        self.failures: list[str] = []
        self.requests = 0

    def _call(self, conn, method: str, path: str, body: bytes | None = None, ctype: str | None = None) -> bytes:
        self.requests += 1
        conn.request(method, path, body=body, headers={"Content-Type": ctype} if ctype else {})
        resp = conn.getresponse()
        data = resp.read()
        if not 200 <= resp.status < 300:
            self.failures.append(f"{method} {path}: {resp.status} {data[:200]!r}")
        return data

    def run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=TIMEOUT_S)
        for i in range(MAX_REQUESTS_PER_CLIENT):
            if time.monotonic() >= self.deadline:
                break
            body, ctype = self.bodies[i % len(self.bodies)]
            try:
                t0 = time.perf_counter()
                answer = json.loads(self._call(conn, "POST", "/attribute", body, ctype))
                self.latencies.append(time.perf_counter() - t0)
                q = answer["queries"][0]
                self._call(conn, "GET", q["heatmaps"][str(q["top"][0]["image_id"])])
                if i % 5 == 0:
                    self._call(conn, "GET", "/health")
            except Exception as err:  # a refused connection, a timeout, a malformed answer
                self.failures.append(f"{type(err).__name__}: {err}")
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=TIMEOUT_S)
        conn.close()


def _sample_rss(pid: int, stop: threading.Event, out: list[tuple[float, int]]) -> None:
    t0 = time.monotonic()
    while not stop.wait(0.25):
        try:
            out.append((time.monotonic() - t0, _rss(pid)))
        except (OSError, RuntimeError):
            return


def test_eight_clients_no_failures_flat_memory(tmp_path):
    small = build_small_index(tmp_path)
    bodies = [multipart([("image", p.name, p.read_bytes())], {"timestep": "100", "top": "5"}) for p in small.queries.values()]
    log = tmp_path / "server.log"
    proc, port = _start_server(small.index, log)
    samples: list[tuple[float, int]] = []
    stop = threading.Event()
    sampler = threading.Thread(target=_sample_rss, args=(proc.pid, stop, samples), daemon=True)
    try:
        sampler.start()
        deadline = time.monotonic() + DURATION_S
        clients = [Client(port, bodies, deadline) for _ in range(CLIENTS)]
        for c in clients:
            c.start()
        for c in clients:
            c.join(DURATION_S + 2 * TIMEOUT_S)
        assert not any(c.is_alive() for c in clients), "a client did not stop"
    finally:
        stop.set()
        sampler.join(5)
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    failures = [f for c in clients for f in c.failures]
    lat = np.array([x for c in clients for x in c.latencies])
    assert not failures, f"{len(failures)} failed requests, e.g. {failures[:3]}; server log: {log.read_text()[-3000:]}"
    assert len(lat) >= CLIENTS, f"only {len(lat)} attributions in {DURATION_S} s"
    after = np.array([rss for t, rss in samples if t >= WARMUP_SHARE * DURATION_S], dtype=np.float64)
    assert len(after) >= 4, "too few RSS samples"
    base = np.median(after[: max(2, len(after) // 10)])
    growth = after.max() - base
    print(f"\n{len(lat)} attributions by {CLIENTS} clients in {DURATION_S:.0f} s: p50 {np.median(lat):.3f} s, "
          f"p95 {np.percentile(lat, 95):.3f} s; RSS after warm-up {base / 2**20:.0f} MiB, max growth {growth / 2**20:.1f} MiB")
    assert growth <= RSS_TOLERANCE, f"RSS grew {growth / 2**20:.1f} MiB after warm-up (tolerance {RSS_TOLERANCE >> 20} MiB)"
