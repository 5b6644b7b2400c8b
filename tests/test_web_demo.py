"""`clipsearch web` on the demo data where meaning matters: the committed demo model behind a
real server on port 0, a generated gallery ingested in the test, the page served by uvicorn on
port 0, and the page driven in a real headless Chromium (Debian's chromium and
chromium-driver, which .ci/run installs) through selenium.

Screenshots of every browser step go to test-artifacts/web/ (ignored by git).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import Select, WebDriverWait
from server_fixtures import ThreadedServer, quick_settings

from clipsearch.client import Client
from clipsearch.export.demo_data import GalleryItem, generate_gallery
from clipsearch.web.backends import WebConfig
from clipsearch.web.serve import WebServer

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts" / "web"
# The gallery of test_demo_search.py, on which the demo model's quality bars are known to hold.
N = 160
SEED = 21
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
WAIT_S = 60


@dataclass
class Demo:
    url: str
    http: httpx.Client
    gallery: Path
    items: dict[str, GalleryItem]


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Demo]:
    base = tmp_path_factory.mktemp("web-demo")
    gallery = base / "gallery"
    items = {item.id: item for item in generate_gallery(gallery, N, seed=SEED)}
    with ThreadedServer(quick_settings(base / "demo.db")) as server:
        with Client(server.address) as client:
            for collection, field in (("demo", "caption_en"), ("demo_zh", "caption_zh")):
                summary = client.ingest_path(
                    gallery / "manifest.csv",
                    caption_field=field,
                    collection=collection,
                    progress=False,
                )
                assert (summary.ok, summary.failed) == (N, 0)
        config = WebConfig(servers=(server.address,), media_root=gallery)
        with WebServer(config) as web, httpx.Client(base_url=web.url, timeout=60) as http:
            yield Demo(web.url, http, gallery, items)


def shows(item: GalleryItem, colour: str, shape: str) -> bool:
    return (item.colour, item.shape) == (colour, shape) or (item.colour2, item.shape2) == (
        colour,
        shape,
    )


def right(items: list[GalleryItem], colour: str, shape: str) -> bool:
    """The quality bar of test_demo_search.py: the first hit and 4 of the first 5 show it."""
    shown = [shows(item, colour, shape) for item in items[:5]]
    return len(shown) == 5 and shown[0] and sum(shown) >= 4


def single(demo: Demo, colour: str, shape: str) -> GalleryItem:
    return next(
        i
        for i in demo.items.values()
        if i.n_objects == 1 and (i.colour, i.shape) == (colour, shape)
    )


def data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


@pytest.mark.parametrize("query", ["a red circle", "红色的圆形"])
def test_http_search_finds_red_circles_first(demo: Demo, query: str) -> None:
    body = demo.http.post(
        "/api/search", json={"text": query, "collection": "demo", "top_k": 5}
    ).json()
    assert right([demo.items[hit["id"]] for hit in body["hits"]], "red", "circle"), body
    assert all(hit["thumbnail"] is not None for hit in body["hits"])


def test_openai_embeddings_put_each_text_nearest_its_image(demo: Demo) -> None:
    pairs = [("red", "circle"), ("blue", "square"), ("yellow", "star")]
    texts = [f"a {colour} {shape}" for colour, shape in pairs]
    images = [data_uri(demo.gallery / single(demo, *pair).path) for pair in pairs]
    body = demo.http.post("/v1/embeddings", json={"input": texts + images}).json()
    vectors = np.array([d["embedding"] for d in body["data"]], dtype=np.float32)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    similarity = vectors[:3] @ vectors[3:].T
    assert list(similarity.argmax(axis=1)) == [0, 1, 2], similarity


# --- the browser ------------------------------------------------------------------------------


def chromium(user_data: Path) -> WebDriver:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--window-size=1280,1000",
        f"--user-data-dir={user_data}",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    return webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))


class Page:
    def __init__(self, driver: WebDriver, demo: Demo) -> None:
        self.driver = driver
        self.demo = demo
        self.step = 0

    def seq(self) -> int:
        return int(self.driver.execute_script("return document.body.dataset.seq"))

    def settled_after(self, before: int) -> None:
        """Wait until the page finished the work started after `before` (no sleeping)."""
        WebDriverWait(self.driver, WAIT_S).until(
            lambda d: (
                self.seq() > before
                and d.execute_script("return document.body.dataset.state") == "ready"
            )
        )

    def act(self, action: Any) -> None:
        before = self.seq()
        action()
        self.settled_after(before)
        assert self.driver.find_element(By.ID, "status").text == ""

    def hits(self, within: str = "#results") -> list[GalleryItem]:
        cards = self.driver.find_elements(By.CSS_SELECTOR, f"{within} .hit")
        return [self.demo.items[card.get_attribute("data-id") or ""] for card in cards]

    def shot(self, name: str) -> Path:
        self.step += 1
        path = ARTIFACTS / f"{self.step:02d}-{name}.png"
        self.driver.save_screenshot(str(path))
        return path

    def search(self, text: str) -> None:
        box = self.driver.find_element(By.ID, "q")
        box.clear()
        box.send_keys(text)
        self.act(lambda: box.send_keys(Keys.ENTER))


def test_the_page_in_a_real_browser(demo: Demo, tmp_path: Path) -> None:
    shutil.rmtree(ARTIFACTS, ignore_errors=True)
    ARTIFACTS.mkdir(parents=True)
    driver = chromium(tmp_path / "chromium-profile")
    try:
        page = Page(driver, demo)
        driver.get(demo.url)
        page.settled_after(0)
        options = Select(driver.find_element(By.ID, "collection")).options
        assert [o.get_attribute("value") for o in options] == ["0/demo", "0/demo_zh"]

        # 1. English text -> images: red circles first, with thumbnails, captions and timing.
        page.search("a red circle")
        hits = page.hits()
        assert len(hits) == 12
        assert right(hits, "red", "circle"), hits[:5]
        first = driver.find_element(By.CSS_SELECTOR, "#results .hit")
        assert first.find_element(By.CSS_SELECTOR, ".caption").text == hits[0].caption_en
        assert float(first.find_element(By.CSS_SELECTOR, ".score").text) > 0
        assert first.find_element(By.CSS_SELECTOR, ".hit-id").text == hits[0].id
        WebDriverWait(driver, WAIT_S).until(
            lambda d: d.execute_script(
                "return [...document.querySelectorAll('#results .thumb img')]"
                ".every((img) => img.complete && img.naturalWidth > 0)"
            )
        )
        assert "inference" in driver.find_element(By.ID, "timing").text
        page.shot("text-query")

        # 2. Chinese text -> images.
        page.search("红色的圆形")
        assert right(page.hits(), "red", "circle")
        shutil.copyfile(page.shot("chinese-query"), ARTIFACTS / "README-web.png")  # docs/web.png

        # 3. "similar" on the first hit: more like it, without itself.
        liked = page.hits()[0]
        page.act(lambda: driver.find_element(By.CSS_SELECTOR, "#results .hit .similar").click())
        assert driver.find_element(By.ID, "query-label").text.startswith(f"more like {liked.id}")
        similar = page.hits()
        assert liked.id not in {item.id for item in similar}
        assert sum(shows(item, "red", "circle") for item in similar[:5]) >= 3, similar[:5]
        page.shot("similar")

        # 4. Upload an image with the file picker: image -> image.
        query = single(demo, "purple", "star")
        picker = driver.find_element(By.ID, "file")
        page.act(lambda: picker.send_keys(str(demo.gallery / query.path)))
        assert driver.find_element(By.ID, "query-label").text == f"image: {Path(query.path).name}"
        by_image = page.hits()
        assert by_image[0].id == query.id  # the image itself
        assert all(shows(item, "purple", "star") for item in by_image[:3]), by_image[:3]
        page.shot("upload-image-to-image")

        # 5. Drop an image on the page with target captions: image -> text.
        target = Select(driver.find_element(By.ID, "target"))
        page.act(lambda: target.select_by_value("caption"))  # searches again with the upload
        page.act(lambda: drop_file(driver, demo.gallery / query.path))
        caption = driver.find_element(By.CSS_SELECTOR, "#results .hit .caption").text
        assert "purple star" in caption
        page.shot("drop-image-to-text")

        # 6. Side by side: the same query against both collections, in columns.
        page.act(lambda: target.select_by_value("image"))
        page.search("a red circle")
        page.act(lambda: driver.find_element(By.ID, "view-compare").click())
        columns = driver.find_elements(By.CSS_SELECTOR, "#compare .column")
        assert [c.get_attribute("data-collection") for c in columns] == ["0/demo", "0/demo_zh"]
        for collection in ("0/demo", "0/demo_zh"):
            within = f'#compare .column[data-collection="{collection}"]'
            column_hits = page.hits(within)
            assert len(column_hits) == 12
            assert right(column_hits, "red", "circle"), (collection, column_hits[:5])
        zh_caption = driver.find_element(
            By.CSS_SELECTOR, '#compare .column[data-collection="0/demo_zh"] .hit .caption'
        ).text
        assert (
            zh_caption == page.hits('#compare .column[data-collection="0/demo_zh"]')[0].caption_zh
        )
        page.shot("side-by-side")

        # 7. Nothing left loopback: every request the browser made went to the page's origin.
        # (chrome:// pages are the browser's own start page, data: and blob: never leave it.)
        urls = requested_urls(driver)
        network = [u for u in urls if not u.startswith(("chrome:", "data:", "blob:"))]
        assert network and all(u.startswith(demo.url + "/") for u in network), sorted(set(urls))
        assert {u.split(":", 1)[0] for u in urls} <= {"http", "chrome", "data", "blob"}
        resources = driver.execute_script(
            "return performance.getEntriesByType('resource').map((e) => e.name)"
        )
        assert resources and all(r.startswith(("http://127.0.0.1:", "blob:")) for r in resources)
        severe = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert severe == []
    finally:
        driver.quit()


def drop_file(driver: WebDriver, path: Path) -> None:
    """Drag-and-drop of a file, as the browser delivers it: a drop event whose DataTransfer
    holds a File (WebDriver cannot drag from the desktop)."""
    driver.execute_script(
        """
        const [name, b64] = arguments;
        const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
        const transfer = new DataTransfer();
        transfer.items.add(new File([bytes], name, { type: "image/png" }));
        const target = document.getElementById("drop");
        target.dispatchEvent(new DragEvent("dragover", { dataTransfer: transfer, bubbles: true }));
        target.dispatchEvent(new DragEvent("drop", { dataTransfer: transfer, bubbles: true }));
        """,
        path.name,
        base64.b64encode(path.read_bytes()).decode(),
    )


def requested_urls(driver: WebDriver) -> list[str]:
    """Every URL the browser asked for, from the DevTools network log."""
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    return urls


# --- the command lines ------------------------------------------------------------------------


def test_demo_web_serves_the_page_until_interrupted(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "clipsearch", "demo", "--web", "--web-port", "0", "--n", "40",
         "--out", str(tmp_path / "demo")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )  # fmt: skip
    assert process.stdout is not None
    try:
        lines = []
        for line in process.stdout:
            lines.append(line)
            if line.startswith("7. the search page: "):
                break
        else:
            pytest.fail("".join(lines))
        url = line.split()[4]
        assert url.startswith("http://127.0.0.1:")
        with httpx.Client(base_url=url, timeout=30) as http:
            collections = http.get("/api/collections").json()["collections"]
            # One collection per committed model: the CLIP demo model and the Chinese-CLIP one.
            assert sorted((c["name"], c["count"]) for c in collections) == [
                ("demo", 40),
                ("demo_demo_zh", 40),
            ]
            hits = http.post("/api/search", json={"text": "a red circle", "collection": "demo"})
            thumbnail = hits.json()["hits"][0]["thumbnail"]
            assert http.get(thumbnail).headers["content-type"] == "image/jpeg"
        process.send_signal(signal.SIGINT)
        rest = process.stdout.read()
        assert process.wait(60) == 0, rest
        assert "8. server stopped (exit code 0)" in rest
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
