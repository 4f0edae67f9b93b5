#!/usr/bin/env python
"""Time per query through `nda-ann serve` against `nda-ann attribute`, and the server under load.

    # the million-image run's indexes (tools/million.py), its serving settings
    python tools/bench_serve.py --index 5k=results/million/index-5k --index 1m=results/million/index-1m --settings million
    # a quick check on any index (writes elsewhere than docs/benchmarks/)
    python tools/bench_serve.py --index tiny=/tmp/ix --seconds 2 --repeats 1 --md /tmp/bench.md

Per index:
- CLI cold: `nda-ann attribute INDEX one.png` as a fresh process after the index's and stores'
  pages were dropped from the page cache (posix_fadvise DONTNEED: clean pages only, no root
  needed); CLI warm: the same after reading them once. Wall time of the whole call (interpreter
  start, open, one query, results folder), the median of --repeats calls.
- server: `nda-ann serve INDEX` (it warms the page cache and runs one query before serving), then
  one client posting one image at a time: the median latency. Its start-up time is reported too.
- load: 1, 4 and 8 concurrent clients for --seconds each: requests per second, p50 and p95 latency.
Writes the section between ``<!-- bench_serve -->`` and ``<!-- /bench_serve -->`` of --md
(docs/benchmarks/serve.md by default) and the raw figures to --work/bench_serve.json.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
from bench_md import machine, simd, update_section  # noqa: E402

# the million-image run's serving settings (tools/million.py SERVE), or the attributor's defaults
SETTINGS = {"million": {"k": 256, "candidates": 300, "nprobe": 16, "topk": 100}, "default": {}}
CLIENTS = (1, 4, 8)
TIMEOUT_S = 300


def query_files(folder: Path, count: int) -> list[Path]:
    """``count`` held-out demo-corpus crops written as PNGs (the million run's queries are the same kind)."""
    from PIL import Image

    from nda_ann.corpus.demo_corpus import demo_corpus

    dc = demo_corpus(n_train=100, n_queries=count, seed=0)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, img in enumerate(dc.queries):
        Image.fromarray(img).save(folder / f"q{i}.png")
        paths.append(folder / f"q{i}.png")
    return paths


def index_files(index: Path) -> list[Path]:
    """The index folder and the stores it was built from."""
    from nda_ann.index.manifest import read_manifest

    m = read_manifest(index)
    stores = []
    for s in m["stores"]:
        absolute, relative = Path(s["path"]), (index / s["path_relative"]).resolve()
        stores.append(absolute if absolute.exists() else relative)
    return [index, *stores]


def _files(roots: list[Path]):
    for root in roots:
        yield from ([root] if root.is_file() else (p for p in root.rglob("*") if p.is_file()))


def drop_cache(roots: list[Path]) -> None:
    """Ask the kernel to drop the (clean) cached pages of every file under ``roots``."""
    for f in _files(roots):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def warm_cache(roots: list[Path]) -> None:
    for f in _files(roots):
        with open(f, "rb") as fh:
            while fh.read(64 << 20):
                pass


def cli_seconds(index: Path, query: Path, settings: dict, cold: bool, work: Path) -> float:
    """Wall seconds of one `nda-ann attribute` call on one image, page cache cold or warm."""
    roots = index_files(index)
    drop_cache(roots) if cold else warm_cache(roots)
    args = [f"--{k}={v}" for k, v in settings.items()]
    cmd = [sys.executable, "-m", "nda_ann", "attribute", str(index), str(query), "-t", "100", *args, "--out", str(work / "cli-out")]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, timeout=TIMEOUT_S)
    return time.perf_counter() - t0


def multipart(path: Path, fields: dict) -> tuple[bytes, str]:
    boundary = "bench-" + os.urandom(8).hex()
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode() for k, v in fields.items()]
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{path.name}"\r\n'
                 f"Content-Type: image/png\r\n\r\n".encode() + path.read_bytes() + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def start_server(index: Path, settings: dict, port: int, log: Path) -> tuple[subprocess.Popen, float]:
    """`nda-ann serve` on 127.0.0.1:port; (process, seconds until /health answered)."""
    args = [f"--{k}={v}" for k, v in settings.items() if k in ("k", "nprobe")]
    cmd = [sys.executable, "-m", "nda_ann", "serve", str(index), "--port", str(port), "--queue-size", "16", *args]
    t0 = time.perf_counter()
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    while time.perf_counter() - t0 < TIMEOUT_S and proc.poll() is None:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return proc, time.perf_counter() - t0
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"the server did not start; see {log}")


def run_clients(port: int, bodies: list[tuple[bytes, str]], clients: int, seconds: float) -> dict:
    """``clients`` threads posting for ``seconds``: requests/s, p50/p95 latency, failures."""
    lat: list[float] = []
    failures: list[str] = []
    deadline = time.monotonic() + seconds
    lock = threading.Lock()

    def client(c: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT_S)
        i = c
        while time.monotonic() < deadline:
            body, ctype = bodies[i % len(bodies)]
            i += 1
            t0 = time.perf_counter()
            conn.request("POST", "/attribute", body=body, headers={"Content-Type": ctype})
            resp = conn.getresponse()
            resp.read()
            with lock:
                (lat if resp.status == 200 else failures).append(time.perf_counter() - t0 if resp.status == 200 else str(resp.status))
        conn.close()

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + TIMEOUT_S)
    wall = time.perf_counter() - t0
    a = np.array(lat) if lat else np.array([np.nan])
    return {"clients": clients, "requests": len(lat), "failures": len(failures), "per_s": len(lat) / wall,
            "p50_s": float(np.median(a)), "p95_s": float(np.percentile(a, 95))}


def bench_index(label: str, index: Path, settings: dict, queries: list[Path], args, work: Path) -> dict:
    rec: dict = {"label": label, "index": str(index), "settings": settings}
    rec["cli_cold_s"] = float(np.median([cli_seconds(index, queries[r % len(queries)], settings, True, work) for r in range(args.repeats)]))
    rec["cli_warm_s"] = float(np.median([cli_seconds(index, queries[r % len(queries)], settings, False, work) for r in range(args.repeats)]))
    fields = {"timestep": "100", **{k: v for k, v in settings.items() if k in ("candidates", "topk")}}
    bodies = [multipart(q, fields) for q in queries]
    from socket import socket

    with socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc, rec["server_start_s"] = start_server(index, settings, port, work / f"serve-{label}.log")
    try:
        seq = [_one(port, bodies[r % len(bodies)]) for r in range(max(args.repeats, len(queries)))]
        rec["server_s"] = float(np.median(seq))
        rec["load"] = [run_clients(port, bodies, c, args.seconds) for c in CLIENTS]
    finally:
        proc.terminate()
        proc.wait(30)
    return rec


def _one(port: int, body: tuple[bytes, str]) -> float:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT_S)
    t0 = time.perf_counter()
    conn.request("POST", "/attribute", body=body[0], headers={"Content-Type": body[1]})
    resp = conn.getresponse()
    resp.read()
    conn.close()
    if resp.status != 200:
        raise SystemExit(f"the server answered {resp.status}")
    return time.perf_counter() - t0


def markdown(records: list[dict], args) -> str:
    lines = ["## Serving: `nda-ann serve` against `nda-ann attribute` (tools/bench_serve.py)", "",
             f"Machine: {machine()}; {simd()}. One 32x32 query image per call at t = 100; settings per row. CLI times are whole "
             f"calls (interpreter start, opening the index, one query, writing the results folder), median of {args.repeats}; "
             "cold: the index's and store's pages dropped from the page cache first, warm: read once first. "
             "Server: median latency of one client posting one image at a time, after its own warm-up.", "",
             "| index | settings | CLI cold (s) | CLI warm (s) | server (s) | server start (s) |", "|---|---|---|---|---|---|"]
    for r in records:
        lines.append(f"| {r['label']} | {json.dumps(r['settings']) if r['settings'] else 'defaults'} | {r['cli_cold_s']:.2f} | "
                     f"{r['cli_warm_s']:.2f} | {r['server_s']:.3f} | {r['server_start_s']:.1f} |")
    lines += ["", f"Under load: concurrent clients posting for {args.seconds:.0f} s each (one attribution worker; the queue holds 16).", "",
              "| index | clients | requests/s | p50 (s) | p95 (s) | failed |", "|---|---|---|---|---|---|"]
    for r in records:
        for ld in r["load"]:
            lines.append(f"| {r['label']} | {ld['clients']} | {ld['per_s']:.2f} | {ld['p50_s']:.3f} | {ld['p95_s']:.3f} | {ld['failures']} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--index", action="append", required=True, help="LABEL=PATH, repeatable (e.g. 5k=results/million/index-5k)")
    ap.add_argument("--settings", choices=list(SETTINGS), default="default")
    ap.add_argument("--queries", type=int, default=4, help="held-out query images")
    ap.add_argument("--repeats", type=int, default=3, help="CLI calls per figure")
    ap.add_argument("--seconds", type=float, default=30.0, help="duration of each load level")
    ap.add_argument("--work", type=Path, default=ROOT / "results" / "bench_serve")
    ap.add_argument("--md", type=Path, default=None, help="markdown file whose bench_serve section is written (default docs/benchmarks/serve.md)")
    ap.add_argument("--from-json", action="store_true", help="write the section from --work/bench_serve.json; run nothing")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.from_json:
        update_section("bench_serve", markdown(json.loads((args.work / "bench_serve.json").read_text()), args), args.md)
        return
    with tempfile.TemporaryDirectory() as tmp:
        queries = query_files(Path(tmp) / "queries", args.queries)
        records = []
        for spec in args.index:
            label, _, path = spec.partition("=")
            records.append(bench_index(label, Path(path).resolve(), SETTINGS[args.settings], queries, args, args.work))
            print(json.dumps(records[-1]), flush=True)
    (args.work / "bench_serve.json").write_text(json.dumps(records, indent=2))
    update_section("bench_serve", markdown(records, args), args.md)
    print(f"wrote the bench_serve section of {args.md or 'docs/benchmarks/serve.md'}")


if __name__ == "__main__":
    main()
