"""What the server's tests share: the saved tiny run, small limits and the app over them, images and uploads, the
checks of an answer, a real uvicorn on a free port, and an images index and a captions index on tiny-retrieval."""

from __future__ import annotations

import io
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx2
import pytest
import uvicorn
from fastapi.testclient import TestClient
from PIL import Image

from captune.data.synthetic import SyntheticSpec, generate_synthetic
from captune.retrieval import build_tiny_retrieval
from captune.search import index_captions, index_images
from captune.serve import ServeSettings, create_app, listen, uvicorn_server

from ..cli import test_caption as test_cli

# The saved tiny run directory (greedy, 1-5 new tokens).
model_dir = test_cli.model_dir


# Small limits, so that each one is cheap to reach; fast generation, so that property tests run many requests.
SETTINGS = ServeSettings(device="cpu", max_upload_bytes=200_000, max_images=4, max_new_tokens=8, max_num_beams=3,
                         max_wait_ms=5)  # fmt: skip


def _png(colour: tuple[int, int, int], size: int = 32) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buffer, "PNG")
    return buffer.getvalue()


RED, BLUE = _png((210, 30, 30)), _png((30, 40, 220), size=48)


def _files(*images: bytes, name: str = "image.png") -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("images", (f"{i}-{name}", data, "image/png")) for i, data in enumerate(images)]


@pytest.fixture(scope="module")
def client(model_dir: Path) -> Iterator[TestClient]:
    with TestClient(create_app(model_dir, SETTINGS)) as test_client:
        yield test_client


def _assert_healthy(client: TestClient | httpx2.Client) -> None:
    """Healthy: /health says ok with no image left admitted, and an image still gets a caption."""
    health = client.get("/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert health.json()["pending_images"] == 0
    response = client.post("/v1/captions", files=_files(RED))
    assert response.status_code == 200, response.text


def _error(response: httpx2.Response, status: int, code: str) -> str:
    """The message of an error answer, after checking its status, code and shape."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and body["error"]["code"] == code
    assert "Traceback" not in body["error"]["message"]
    return str(body["error"]["message"])


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_for(condition: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@contextmanager
def _uvicorn_in_thread(
    model_dir: Path, serve_settings: ServeSettings, **app_options: Any
) -> Iterator[tuple[str, uvicorn.Server]]:
    """The server `run_server` runs (uvicorn with captune's timeouts and connection limits; `create_app` with
    `app_options`) on a free port of 127.0.0.1; stopped as SIGTERM stops it (should_exit)."""
    port = _free_port()
    listening = listen("127.0.0.1", port)
    app = create_app(model_dir, serve_settings, **app_options)
    server = uvicorn_server(app, serve_settings, log_level="warning")
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listening]}, daemon=True)
    thread.start()
    try:
        _wait_for(lambda: server.started)
        yield f"http://127.0.0.1:{port}", server
    finally:
        server.should_exit = True
        thread.join(timeout=30)


# --- indexes to search -------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def search_images(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], list[str]]:
    """8 synthetic 32 px images (a shape of a colour at a place) and their first captions."""
    folder = tmp_path_factory.mktemp("search-images")
    manifest = json.loads(generate_synthetic(folder, SyntheticSpec(train=8, val=0, test=0, image_size=32)).read_text())
    return [folder / "images" / e["image"] for e in manifest["images"]], [e["captions"][0] for e in manifest["images"]]


@pytest.fixture(scope="session")
def image_index(search_images: tuple[list[Path], list[str]], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An images index of `search_images` on tiny-retrieval, as `captune index` makes it."""
    output = tmp_path_factory.mktemp("image-index") / "idx"
    index_images(search_images[0], build_tiny_retrieval(), output, model_id="tiny-retrieval", progress=False)
    return output


@pytest.fixture(scope="session")
def caption_index(search_images: tuple[list[Path], list[str]], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A captions index of `search_images`' captions (ids c0, c1, ...) on tiny-retrieval."""
    output = tmp_path_factory.mktemp("caption-index") / "idx"
    captions = [(f"c{i}", text) for i, text in enumerate(search_images[1])]
    index_captions(captions, build_tiny_retrieval(), output, model_id="tiny-retrieval", progress=False)
    return output
