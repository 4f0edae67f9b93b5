"""The attribution server through FastAPI's test client: answers equal to the Python API, the PNGs
it links to, every kind of bad request refused with a 4xx, 503 past the queue, health while busy."""
from __future__ import annotations

import io
import threading
import time

import numpy as np
import pytest
from PIL import Image

from serve_helpers import build_small_index, png, require

TestClient = require("fastapi.testclient").TestClient

from nda_ann import Attributor  # noqa: E402
from nda_ann.serve import ServeConfig, create_app  # noqa: E402
from nda_ann.serve.service import AttributionService  # noqa: E402


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return build_small_index(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def service(small):
    svc = AttributionService(small.index, ServeConfig(max_file_bytes=200_000, max_pixels=1 << 20, max_files=3, queue_size=1))
    yield svc
    svc.close()


@pytest.fixture(scope="module")
def client(service):
    return TestClient(create_app(service=service))


def post(client, files, **fields):
    return client.post("/attribute", files=[("image", f) for f in files], data=fields)


def test_answer_equals_the_python_api_and_links_real_pngs(small, client):
    data = small.queries["copy11.png"].read_bytes()
    r = post(client, [("copy11.png", data, "image/png")], timestep=["100", "300"], top="4")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["images"] == 60 and body["settings"]["timesteps"] == [100, 300]
    (q,) = body["queries"]
    assert q["name"] == "copy11.png" and q["timesteps"] == [100, 300] and len(q["top"]) == 4
    want = Attributor.open(small.index).attribute(Image.open(io.BytesIO(data)), [100, 300], maps=4)
    assert [(p["image_id"], p["score"], p["source"]) for p in q["top"]] == want.top(0, 4)
    assert q["top"][0]["image_id"] == 11  # the copy of training image 11 is its own top proponent
    assert q["outside_mass"] == pytest.approx(float(np.mean(want.outside_mass[:, 0])))
    assert set(q["outside_mass_detail"]) == {"t=100", "t=300"}
    assert set(q["candidates"]) == {"t=100", "t=300"}  # what the re-scoring reached at each timestep
    assert [q["candidates"][f"t={t}"]["candidates"] for t in (100, 300)] == want.candidates_used[:, 0].tolist()
    assert all(row["seconds"] > 0 and "within_budget" not in row for row in q["candidates"].values())
    assert set(q["heatmaps"]) == {str(p["image_id"]) for p in q["top"]}
    heat = client.get(q["heatmaps"]["11"])
    assert heat.status_code == 200 and heat.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(heat.content)).size[0] > 192  # the overlay and its colour bar
    query = Image.open(io.BytesIO(client.get(q["query_image"]).content))
    assert np.array_equal(np.asarray(query), small.images[11])  # the query as scored
    train = Image.open(io.BytesIO(client.get(q["top"][0]["image"]).content))
    assert np.array_equal(np.asarray(train), small.images[11])


def test_several_images_topk_candidates_and_health_info(small, client):
    files = [(n, p.read_bytes(), "image/png") for n, p in small.queries.items()]
    r = post(client, files, topk="5", candidates="20", top="3")
    assert r.status_code == 200, r.text
    body = r.json()
    assert [q["name"] for q in body["queries"]] == sorted(small.queries)
    assert body["settings"]["topk"] == 5 and body["settings"]["candidates"] == 20
    assert all(len(q["top"]) == 3 and q["timesteps"] == [100] for q in body["queries"])
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["requests"] >= 1
    info = client.get("/info").json()
    assert info["images"] == 60 and info["scales"] == ["5", "4:2"] and info["resolution"] == 16
    page = client.get("/")
    assert page.status_code == 200 and 'type="file"' in page.text and 'fetch("/attribute"' in page.text
    assert "http://" not in page.text and "https://" not in page.text  # nothing loaded from elsewhere


def _bomb() -> bytes:
    return png(np.zeros((1200, 1200, 3), np.uint8))  # 1.44 M pixels: over max_pixels (1 M), few bytes


@pytest.mark.parametrize("files,fields,status,words", [
    ([("notes.txt", b"just some text", "text/plain")], {}, 415, "not an image"),
    ([("broken.png", b"\x89PNG\r\n\x1a\n not really", "image/png")], {}, 400, "cannot be decoded"),
    ([("cut.png", None, "image/png")], {}, 400, "cannot be decoded"),
    ([("empty.png", b"", "image/png")], {}, 400, "empty"),
    ([("big.png", b"\x00" * 200_001, "image/png")], {}, 413, "at most 200,000"),
    ([("bomb.png", "bomb", "image/png")], {}, 413, "pixels"),
    ([("a.png", "ok", "image/png")] * 4, {}, 413, "at most 3 per request"),
    ([], {"top": "3"}, 400, "field 'image'"),
    ([("a.png", "ok", "image/png")], {"timestep": "abc"}, 422, "timestep must be an integer"),
    ([("a.png", "ok", "image/png")], {"timestep": "1000"}, 422, "0 to 999"),
    ([("a.png", "ok", "image/png")], {"top": "0"}, 422, "top must be"),
    ([("a.png", "ok", "image/png")], {"candidates": "-2"}, 422, "candidates must be"),
    ([("a.png", "ok", "image/png")], {"colour": "red"}, 422, "unknown form field"),
])
def test_bad_requests_get_a_clear_4xx_and_the_server_lives_on(small, client, files, fields, status, words):
    good = small.queries["copy11.png"].read_bytes()
    payload = {"ok": good, "bomb": _bomb(), None: good[: len(good) // 2]}
    files = [(n, payload.get(d, d) if not isinstance(d, bytes) else d, t) for n, d, t in files]
    r = post(client, files, **fields)
    assert r.status_code == status, r.text
    assert words in r.json()["error"]
    assert client.get("/health").json()["status"] == "ok"  # still serving (good requests: the other tests)


def test_non_multipart_and_oversized_bodies(client, service):
    r = client.post("/attribute", json={"image": "x"})
    assert r.status_code == 400 and "multipart/form-data" in r.json()["error"]
    limit = service.config.max_body_bytes
    r = client.post("/attribute", content=b"x" * (limit + 1), headers={"content-type": "multipart/form-data; boundary=x"})
    assert r.status_code == 413 and "request body over" in r.json()["error"]
    assert client.get("/heatmap/nosuchrequest/0/11.png").status_code == 404
    assert client.get("/image/60.png").status_code == 404 and "0..59" in client.get("/image/60.png").json()["error"]
    assert client.get("/image/x.png").status_code == 422


def test_queue_full_gets_503_while_health_answers(small, client, service):
    release = threading.Event()
    running = service.worker.submit(release.wait, 30)  # occupies the worker
    deadline = time.monotonic() + 10
    while not service.worker.busy and time.monotonic() < deadline:
        time.sleep(0.01)
    queued = service.worker.submit(lambda: None)  # fills the one queue slot
    try:
        t0 = time.perf_counter()
        health = client.get("/health").json()
        assert health["busy"] and health["waiting"] == 1 and time.perf_counter() - t0 < 2
        r = post(client, [("copy11.png", small.queries["copy11.png"].read_bytes(), "image/png")])
        assert r.status_code == 503 and r.headers["retry-after"] == "1" and "busy" in r.json()["error"]
    finally:
        release.set()
    running.result(10), queued.result(10)
    assert post(client, [("copy11.png", small.queries["copy11.png"].read_bytes(), "image/png")]).status_code == 200


def test_picture_cache_stays_within_its_bytes(small):
    from nda_ann.serve.cache import PictureCache, RequestPictures

    cache = PictureCache(max_bytes=20_000)
    for i in range(20):
        maps = {(0, j): np.random.default_rng(i).random((16, 16)).astype(np.float32) for j in range(4)}
        cache.put(f"r{i}", RequestPictures(small.images[i : i + 1], maps))
        assert cache.png(f"r{i}", ("q",), lambda p: png(p.queries[0])) is not None
        assert cache.nbytes <= 20_000
    assert cache.get("r0") is None and cache.get("r19") is not None and len(cache) < 20
