"""Shared by the server, report, browser and load tests: a small real index, a uvicorn server on a
free loopback port, and headless Chromium (Debian's chromium + chromedriver) driven by Selenium."""
from __future__ import annotations

import io
import os
import shutil
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

CHROMIUM = Path(os.environ.get("NDA_ANN_CHROMIUM", "/usr/bin/chromium"))
CHROMEDRIVER = Path(os.environ.get("NDA_ANN_CHROMEDRIVER", "/usr/bin/chromedriver"))
IN_CI = os.environ.get("CI", "").lower() == "true"


def require(module: str):
    """Import ``module`` (a server dependency of the ``test`` extra): skip with the reason where it is
    missing, except in CI, where a missing dependency is a failure (a skip would hide the tests)."""
    import importlib

    try:
        return importlib.import_module(module)
    except (ImportError, RuntimeError) as err:  # starlette's test client raises RuntimeError without httpx2
        if IN_CI:
            pytest.fail(f"{module} is needed by the server tests (pip install -e '.[test]'): {err}", pytrace=False)
        pytest.skip(f"{module} is not importable ({err}); pip install -e '.[test]'", allow_module_level=True)


@dataclass
class SmallIndex:
    """A 60-image 16x16 store of real photo crops, its index (scales 5 and 4:2), and query files."""

    root: Path
    index: Path
    images: np.ndarray  # (60, 16, 16, 3) uint8, the store's pixels
    queries: dict[str, Path]  # name -> PNG: copy11.png (training image 11), gen0.png (a held-out crop)


def build_small_index(root: Path, held_out: int = 1) -> SmallIndex:
    """The small index under ``root``, with ``held_out`` held-out query crops (gen0.png, gen1.png)."""
    from nda_ann.corpus.demo_corpus import demo_corpus
    from nda_ann.corpus.store import write_store
    from nda_ann.index import build_index

    dc = demo_corpus(n_train=60, n_queries=2, seed=5)
    small = np.stack([np.asarray(Image.fromarray(x).resize((16, 16), Image.Resampling.BOX)) for x in dc.train])
    store = write_store(root / "store", small, dc.train_sources)
    build_index(store, root / "index", ["5", "4:2"], progress=False)
    qdir = root / "queries"
    qdir.mkdir()
    Image.fromarray(small[11]).save(qdir / "copy11.png")
    for i, x in enumerate(dc.queries[:held_out]):
        Image.fromarray(x).save(qdir / f"gen{i}.png")  # 32x32: the transform brings them to 16x16
    return SmallIndex(root, root / "index", small, {p.name: p for p in sorted(qdir.iterdir())})


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerThread:
    """uvicorn serving ``app`` on 127.0.0.1:port in a thread; ``with`` starts and stops it."""

    def __init__(self, app):
        import uvicorn

        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def browser_or_skip():
    """A headless Chromium WebDriver; skips with the reason when Chromium or its driver is missing,
    except in CI (CI=true), where that fails the test instead (.ci/run installs them)."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    try:
        from selenium import webdriver  # noqa: F401
    except ImportError:
        missing.append("the selenium package (pip install -e '.[test]')")
    if missing:
        reason = f"browser test needs {', '.join(missing)} (Debian: apt-get install chromium chromium-driver)"
        if IN_CI:
            pytest.fail(reason + "; .ci/run installs them, so in CI this is an error", pytrace=False)
        pytest.skip(reason)
    return _start_chromium()


def _start_chromium():
    import tempfile

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="nda-ann-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--window-size=1280,1400"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=opts)
    driver.set_page_load_timeout(60)
    driver._nda_profile = profile  # removed by close_browser
    return driver


def close_browser(driver) -> None:
    driver.quit()
    shutil.rmtree(getattr(driver, "_nda_profile", ""), ignore_errors=True)


def screenshot_stats(path: Path) -> tuple[float, float]:
    """(standard deviation of the grey levels, share of pixels that are not the page background)."""
    grey = np.asarray(Image.open(path).convert("L"), dtype=np.float64)
    background = np.median(grey)
    return float(grey.std()), float(np.mean(np.abs(grey - background) > 12))


def screenshot_dir(tmp: Path) -> Path:
    """Where browser tests put their screenshots: $NDA_ANN_SCREENSHOTS if set, else ``tmp``."""
    out = Path(os.environ.get("NDA_ANN_SCREENSHOTS") or tmp)
    out.mkdir(parents=True, exist_ok=True)
    return out


def multipart(files: list[tuple[str, str, bytes]], fields: dict[str, str | list[str]]) -> tuple[bytes, str]:
    """A multipart/form-data body (and its content type) of ``files`` [(field, filename, bytes)] and
    text ``fields`` (a list value repeats the field), for stdlib HTTP clients."""
    boundary = "nda-ann-" + os.urandom(8).hex()
    parts = []
    for key, values in fields.items():
        for v in values if isinstance(values, list) else [values]:
            parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{key}"\r\n\r\n{v}\r\n'.encode())
    for key, filename, data in files:
        head = f'--{boundary}\r\nContent-Disposition: form-data; name="{key}"; filename="{filename}"\r\nContent-Type: image/png\r\n\r\n'
        parts.append(head.encode() + data + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"
