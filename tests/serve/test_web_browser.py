"""The web app in Debian's headless Chromium: each tab run as a person would (upload, click, read), the captions, the
answer and the search hits equal to the API's, an error shown as a sentence, a screenshot, and no request to any host
but the server's (the browser's performance log: every network request it sent)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import httpx2
import pytest
from PIL import Image
from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import WebDriverWait

from ..conftest import write_image
from ..test_report import start_chromium
from .conftest import SETTINGS, _files, _uvicorn_in_thread
from .test_web import QUESTION, vqa_model_dir

__all__ = ["vqa_model_dir"]  # the fixture, shared with test_web
SEARCH = "a red square on the left"


@pytest.fixture(scope="module")
def live(model_dir: Path, vqa_model_dir: Path, image_index: Path) -> Iterator[str]:
    with _uvicorn_in_thread(model_dir, SETTINGS, vqa_model_dir=vqa_model_dir, index_dir=image_index) as (url, _):
        yield url


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[webdriver.Chrome]:
    """Debian's headless Chromium with a fresh profile, recording its network requests (the performance log)."""
    driver = start_chromium(tmp_path / "chromium-profile", performance_log=True)
    try:
        yield driver
    finally:
        driver.quit()


def _requested_hosts(driver: webdriver.Chrome) -> set[str]:
    """The hosts of every http(s) and ws(s) request the page sent (Chrome's own chrome:// pages and data: URLs
    reach no host)."""
    hosts = set()
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] in ("Network.requestWillBeSent", "Network.webSocketCreated"):
            url = urlparse(message["params"].get("request", message["params"]).get("url", ""))
            if url.scheme in ("http", "https", "ws", "wss"):
                hosts.add(url.hostname or "")
    return hosts


def _wait(driver: webdriver.Chrome, find: str, timeout: float = 60) -> WebElement:
    return WebDriverWait(driver, timeout).until(lambda d: d.find_element(By.CSS_SELECTOR, find))


def _upload(driver: webdriver.Chrome, component: str, *paths: Path) -> None:
    driver.find_element(By.CSS_SELECTOR, f"#{component} input[type=file]").send_keys("\n".join(map(str, paths)))
    names = [path.stem for path in paths]  # the page breaks a name before its extension
    WebDriverWait(driver, 30).until(lambda d: all(n in d.find_element(By.ID, component).text for n in names))


def _cells(driver: webdriver.Chrome) -> list[str]:
    """The texts of the Caption table's cells, row by row (its header left out)."""
    script = ("return [...document.querySelectorAll('#caption-table .cell-wrap')].filter(e => !e.closest('thead, "
              "th')).map(e => e.innerText.trim())")  # fmt: skip
    return list(driver.execute_script(script))


def _tab(driver: webdriver.Chrome, name: str) -> None:
    next(b for b in driver.find_elements(By.CSS_SELECTOR, "button[role=tab]") if b.text == name).click()


def test_every_tab_works_in_chromium_and_the_page_reaches_no_other_host(
    live: str, browser: webdriver.Chrome, tmp_path: Path
) -> None:
    red = write_image(tmp_path / "red.png", (210, 30, 30), size=32, fmt="PNG")
    blue = write_image(tmp_path / "blue.png", (30, 40, 220), size=48, fmt="PNG")
    api = httpx2.post(f"{live}/v1/captions", files=_files(red.read_bytes(), blue.read_bytes())).json()["captions"]
    answer = httpx2.post(f"{live}/v1/answers", files=[("image", ("blue.png", blue.read_bytes(), "image/png"))],
                         data={"question": QUESTION}).json()["answer"]  # fmt: skip
    browser.get(live)
    # Caption: two images, the model's defaults, a table of thumbnails and captions
    _wait(browser, "#caption-button")
    _upload(browser, "caption-files", red, blue)
    browser.find_element(By.ID, "caption-button").click()
    WebDriverWait(browser, 60).until(lambda d: "red.png" in _cells(d))
    texts = [cell for cell in _cells(browser) if cell]  # the thumbnails' cells hold no text
    assert texts == ["red.png", api[0]["caption"], "blue.png", api[1]["caption"]]
    thumbnails = browser.execute_script(
        "return [...document.querySelectorAll('#caption-table img')].map(i => [i.complete, i.naturalWidth])"
    )
    assert {tuple(t) for t in thumbnails} == {(True, 32), (True, 48)}  # the table draws its rows twice
    assert "2 image(s) in the batch" in browser.find_element(By.ID, "caption-timing").text
    screenshot = tmp_path / "app.png"
    assert browser.save_screenshot(str(screenshot)) and Image.open(screenshot).size[0] >= 1280
    # Ask: an image and a question, the answer of the VQA model
    _tab(browser, "Ask")
    _upload(browser, "ask-file", blue)
    browser.find_element(By.CSS_SELECTOR, "#ask-question textarea").send_keys(QUESTION)
    browser.find_element(By.ID, "ask-button").click()
    field = browser.find_element(By.CSS_SELECTOR, "#ask-answer textarea")
    WebDriverWait(browser, 60).until(lambda _: browser.find_element(By.ID, "ask-timing").text)
    assert field.get_attribute("value") == answer
    # Search: a text, a gallery of the API's hits (scores and names under each image)
    hits = httpx2.post(f"{live}/v1/search", files=[("text", (None, SEARCH)), ("top", (None, "3"))]).json()["hits"]
    _tab(browser, "Search")
    browser.find_element(By.CSS_SELECTOR, "#search-text textarea").send_keys(SEARCH)
    top = browser.find_element(By.CSS_SELECTOR, "#search-top input")
    top.clear()
    top.send_keys("3")
    browser.find_element(By.ID, "search-button").click()
    labels = "#search-gallery .caption-label"
    WebDriverWait(browser, 60).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, labels)) == 3)
    shown = [e.text for e in browser.find_elements(By.CSS_SELECTOR, labels)]
    assert shown == [f"{h['score']:.4f} {Path(h['key']).name}" for h in hits]
    WebDriverWait(browser, 30).until(lambda d: d.execute_script(
        "return [...document.querySelectorAll('#search-gallery img')].every(i => i.complete && i.naturalWidth == 32)"
    ))  # fmt: skip
    # Model: what is loaded
    _tab(browser, "Model")
    info = " ".join(browser.find_element(By.ID, "model-info").text.split())  # code spans break lines
    assert "base model: tiny" in info and "training mode: lora-lm" in info and "VQA model" in info
    assert "Index:" in info and "holds: 8 images (flat index)" in info
    assert _requested_hosts(browser) == {"127.0.0.1"}


def test_an_error_is_a_sentence_in_the_page(live: str, browser: webdriver.Chrome, tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("not a picture")
    browser.get(live)
    _wait(browser, "#caption-button")
    _upload(browser, "caption-files", notes)
    browser.find_element(By.ID, "caption-button").click()
    expected = "notes.txt: not an image Pillow can read; send JPEG, PNG, WebP, GIF, BMP or TIFF"
    WebDriverWait(browser, 60).until(lambda d: expected in d.find_element(By.TAG_NAME, "body").text)
    assert "Traceback" not in browser.find_element(By.TAG_NAME, "body").text
    assert _cells(browser) == [] or "notes.txt" not in _cells(browser)
