"""The page and the report in headless Chromium: a file set on the page's input is attributed, the
top proponent's score in the DOM equals the API's answer, every picture loads, and the screenshot
is not blank. Skips without Chromium locally (with the reason); in CI (CI=true) that fails."""
from __future__ import annotations

import json
import urllib.request

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from serve_helpers import (ServerThread, browser_or_skip, build_small_index, close_browser, multipart, require,
                           screenshot_dir, screenshot_stats)

require("fastapi")

from nda_ann.cli import main  # noqa: E402
from nda_ann.serve import ServeConfig, create_app  # noqa: E402
from nda_ann.serve.service import AttributionService  # noqa: E402

pytestmark = pytest.mark.browser
WAIT_S = 60


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return build_small_index(tmp_path_factory.mktemp("browser"))


@pytest.fixture
def browser():
    driver = browser_or_skip()
    yield driver
    close_browser(driver)


def _wait(driver, script: str, what: str):
    """Poll ``script`` (JS returning a truthy value when ready) for up to WAIT_S seconds."""
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, WAIT_S, poll_frequency=0.1).until(lambda d: d.execute_script(script), message=what)


ALL_IMAGES_LOADED = "return [...document.images].length > 0 && [...document.images].every(i => i.complete && i.naturalWidth > 0)"


def _check_screenshot(driver, path) -> None:
    driver.save_screenshot(str(path))
    std, covered = screenshot_stats(path)
    assert std > 20 and covered > 0.05, f"screenshot {path} looks blank (grey std {std:.1f}, {covered:.1%} non-background)"


def test_page_attributes_a_chosen_file_like_the_api(small, browser, tmp_path):
    from selenium.webdriver.common.by import By

    service = AttributionService(small.index, ServeConfig())
    query = small.queries["copy11.png"]
    try:
        with ServerThread(create_app(service=service)) as server:
            body, ctype = multipart([("image", query.name, query.read_bytes())], {"timestep": "100", "top": "10"})
            req = urllib.request.Request(server.url + "/attribute", data=body, headers={"Content-Type": ctype})
            api = json.loads(urllib.request.urlopen(req, timeout=60).read())["queries"][0]
            browser.get(server.url + "/")
            _wait(browser, "return document.getElementById('info').textContent.includes('60 training images')", "index info")
            browser.find_element(By.ID, "file").send_keys(str(query))
            _wait(browser, "return document.querySelectorAll('.prop .score').length === 10", "proponents shown")
            _wait(browser, ALL_IMAGES_LOADED, "query, proponent and heatmap images loaded")
            first = browser.find_element(By.CSS_SELECTOR, ".prop .score")
            assert float(first.get_attribute("data-score")) == api["top"][0]["score"]
            assert f"{api['top'][0]['score']:.4g}"[:4] in first.text
            card = browser.find_element(By.CSS_SELECTOR, ".prop")
            assert card.get_attribute("data-image-id") == str(api["top"][0]["image_id"]) == "11"
            assert len(browser.find_elements(By.CSS_SELECTOR, ".prop img.heat")) == 10
            outside = browser.find_element(By.CSS_SELECTOR, ".mass .outside")
            assert float(outside.get_attribute("data-outside")) == api["outside_mass"]
            _check_screenshot(browser, screenshot_dir(tmp_path) / "page.png")
    finally:
        service.close()


def test_report_opens_from_disk_and_shows_the_top_score(small, browser, tmp_path):
    from selenium.webdriver.common.by import By

    out = tmp_path / "results"
    r = CliRunner().invoke(main, ["attribute", str(small.index), str(small.root / "queries"), "-t", "100", "-t", "300", "--out", str(out), "--html"])
    assert r.exit_code == 0, r.output
    rows = pq.read_table(out / "scores.parquet").to_pylist()
    best = {row["query"]: row for row in rows if row["timestep"] == -1 and row["rank"] == 1}
    browser.get((out / "report.html").as_uri())
    _wait(browser, ALL_IMAGES_LOADED, "inlined images decoded")
    blocks = browser.find_elements(By.CSS_SELECTOR, "section.query-block")
    assert len(blocks) == 2
    for block in blocks:
        name = block.find_element(By.TAG_NAME, "h2").text.split(": ", 1)[1]
        cell = block.find_element(By.CSS_SELECTOR, "td.score")
        assert float(cell.get_attribute("data-score")) == best[name]["score"]
        row = block.find_element(By.CSS_SELECTOR, "tr.proponent")
        assert row.get_attribute("data-image-id") == str(best[name]["image_id"])
    sources = browser.execute_script("return [...document.images].map(i => i.src.slice(0, 22))")
    assert sources and all(s == "data:image/png;base64," for s in sources)
    _check_screenshot(browser, screenshot_dir(tmp_path) / "report.png")
