"""The caption server: the API over the tiny model (FastAPI's TestClient), the micro-batcher, every bad input (the
right status, and the server healthy afterwards), the page in headless Chromium and graceful shutdown on a real
uvicorn, `captune serve` as a process, and property-based requests that never get a 500."""

from __future__ import annotations

import base64
import contextlib
import io
import itertools
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx2
import pytest
import uvicorn
from fastapi.testclient import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from captune.cli import main
from captune.config import GenerateConfig
from captune.data.images import load_rgb
from captune.errors import CaptuneError
from captune.generation.core import generate_captions
from captune.model_dir import load_model_dir
from captune.serve import OPTION_NAMES, ApiError, MicroBatcher, ServeSettings, create_app, listen, uvicorn_server

from . import test_cli, test_report
from .conftest import write_image, write_truncated_jpeg

# Shared fixtures: the saved tiny run directory (greedy, 1-5 new tokens) and Debian's headless Chromium.
model_dir = test_cli.model_dir
browser = test_report.browser

# Small limits, so that each one is cheap to reach; fast generation, so that property tests run many requests.
SETTINGS = ServeSettings(device="cpu", max_upload_bytes=200_000, max_images=4, max_new_tokens=8, max_num_beams=3,
                         max_wait_ms=5)  # fmt: skip
SERVER_STATUSES = {200, 400, 413, 415, 422}
"""What a request may get from a healthy, idle server: never 500, never 503."""


def _png(colour: tuple[int, int, int], size: int = 32) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buffer, "PNG")
    return buffer.getvalue()


RED, BLUE = _png((210, 30, 30)), _png((30, 40, 220), size=48)


def _png_header(width: int, height: int) -> bytes:
    """A PNG that declares width x height and holds a few bytes of pixel data: decoding it would fail as truncated,
    so a 413 for it shows that the size was refused from the header, before decoding."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))


def _files(*images: bytes, name: str = "image.png") -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("images", (f"{i}-{name}", data, "image/png")) for i, data in enumerate(images)]


@pytest.fixture(scope="module")
def client(model_dir: Path) -> Iterator[TestClient]:
    with TestClient(create_app(model_dir, SETTINGS)) as test_client:
        yield test_client


def test_a_static_cache_server_fills_batches_to_powers_of_two(
    tmp_path: Path, client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    from captune.model_dir import save_tiny_model_dir

    static_dir = save_tiny_model_dir(tmp_path, ["num_beams=1", "min_new_tokens=1", "max_new_tokens=5",
                                                "static_cache=true"])  # fmt: skip
    import captune.serve as serve

    sizes: list[int] = []
    real = serve.generate_captions

    def recording(model: Any, processor: Any, images: list[Image.Image], *rest: Any) -> list[str]:
        sizes.append(len(images))
        return real(model, processor, images, *rest)

    monkeypatch.setattr(serve, "generate_captions", recording)
    three = _files(RED, BLUE, RED)
    with TestClient(create_app(static_dir, SETTINGS)) as static_client:
        response = static_client.post("/v1/captions", files=three)
    assert response.status_code == 200 and sizes == [4]  # 3 images, filled to 4 (max_batch allows it)
    expected = client.post("/v1/captions", files=three).json()  # the default server: a dynamic cache
    assert [c["caption"] for c in response.json()["captions"]] == [c["caption"] for c in expected["captions"]]


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


# --- captions ----------------------------------------------------------------------------------------------------


def test_multipart_images_get_the_captions_of_generate_captions(client: TestClient, model_dir: Path,
                                                                tmp_path: Path) -> None:  # fmt: skip
    response = client.post("/v1/captions", files=_files(RED, BLUE))
    assert response.status_code == 200, response.text
    body = response.json()
    loaded = load_model_dir(model_dir, device="cpu")
    paths = [tmp_path / "red.png", tmp_path / "blue.png"]
    for path, data in zip(paths, (RED, BLUE), strict=True):
        path.write_bytes(data)
    options = GenerateConfig(num_beams=1, min_new_tokens=1, max_new_tokens=5)
    expected = generate_captions(loaded.model, loaded.processor, [load_rgb(p) for p in paths], options)
    assert [c["caption"] for c in body["captions"]] == expected
    assert [(c["index"], c["filename"]) for c in body["captions"]] == [(0, "0-image.png"), (1, "1-image.png")]
    assert body["options"] == {"num_beams": 1, "min_new_tokens": 1, "max_new_tokens": 5, "repetition_penalty": 1.0}
    timing = body["timing"]
    assert timing["batch_images"] == 2 and 0 < timing["generate_ms"] <= timing["total_ms"]


def test_json_base64_images_get_the_same_captions_as_uploads(client: TestClient) -> None:
    uploaded = client.post("/v1/captions", files=_files(RED, BLUE)).json()["captions"]
    images = [base64.b64encode(RED).decode(), "data:image/png;base64," + base64.b64encode(BLUE).decode()]
    response = client.post("/v1/captions", json={"images": images})
    assert response.status_code == 200, response.text
    captions = response.json()["captions"]
    assert [c["caption"] for c in captions] == [c["caption"] for c in uploaded]
    assert [c["filename"] for c in captions] == [None, None]


@pytest.mark.parametrize("as_json", [False, True])
def test_request_options_override_the_model_defaults(client: TestClient, as_json: bool) -> None:
    options = {"num_beams": 3, "min_new_tokens": 2, "max_new_tokens": 2, "repetition_penalty": 1.5}
    if as_json:
        response = client.post("/v1/captions", json={"images": [base64.b64encode(RED).decode()], **options})
    else:
        response = client.post("/v1/captions", files=_files(RED), data={k: str(v) for k, v in options.items()})
    assert response.status_code == 200, response.text
    assert response.json()["options"] == options
    assert len(response.json()["captions"][0]["caption"].split()) <= 2


# --- health, model, OpenAPI, page ---------------------------------------------------------------------------------


def test_model_info_names_base_adapter_defaults_and_limits(client: TestClient, model_dir: Path) -> None:
    assert client.get("/health").json() == {"status": "ok", "pending_images": 0, "max_queue": SETTINGS.max_queue}
    info = client.get("/v1/model").json()
    assert info["base_model"] == "tiny" and info["model_dir"] == str(model_dir)
    assert info["adapter"]["type"] == "LORA" and info["adapter"]["r"] == 8
    assert info["generation_defaults"] == {"num_beams": 1, "min_new_tokens": 1, "max_new_tokens": 5,
                                           "repetition_penalty": 1.0}  # fmt: skip
    assert info["limits"]["max_images"] == 4 and info["limits"]["max_upload_bytes"] == 200_000
    assert (info["device"], info["dtype"], info["metrics"]) == ("cpu", "float32", {})


def test_model_info_reports_the_metrics_saved_with_the_model(model_dir: Path, tmp_path: Path) -> None:
    copy = shutil.copytree(model_dir, tmp_path / "best")
    (copy / "metrics.json").write_text(json.dumps({"CIDEr": 1.25, "Bleu_4": 0.5}))
    (copy / "eval-test").mkdir()
    (copy / "eval-test" / "metrics.json").write_text(json.dumps({"CIDEr": 1.0}))
    with TestClient(create_app(copy, SETTINGS)) as test_client:
        metrics = test_client.get("/v1/model").json()["metrics"]
    assert metrics == {"metrics.json": {"CIDEr": 1.25, "Bleu_4": 0.5}, "eval-test/metrics.json": {"CIDEr": 1.0}}


def test_openapi_document_describes_both_request_kinds_and_the_limits(client: TestClient) -> None:
    document = client.get("/openapi.json").json()
    assert {"/v1/captions", "/health", "/v1/model"} <= set(document["paths"])
    post = document["paths"]["/v1/captions"]["post"]
    content = post["requestBody"]["content"]
    assert set(content) == {"multipart/form-data", "application/json"}
    assert content["multipart/form-data"]["schema"]["properties"]["images"]["items"]["format"] == "binary"
    beams = content["application/json"]["schema"]["properties"]["num_beams"]["anyOf"][0]
    assert beams["maximum"] == SETTINGS.max_num_beams
    assert {"200", "413", "415", "422", "503"} <= set(post["responses"])
    assert client.get("/docs").status_code == 404  # Swagger UI would load scripts from a CDN


def test_page_is_served_with_a_same_origin_policy(client: TestClient) -> None:
    response = client.get("/")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    assert "Caption an image" in response.text and 'type="file"' in response.text
    assert "default-src 'self'" in response.headers["content-security-policy"]


# --- bad input: the right status, and the server stays healthy -----------------------------------------------------


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_body_over_the_upload_limit_gets_413(client: TestClient, chunked: bool) -> None:
    body = json.dumps({"images": [base64.b64encode(os.urandom(200_000)).decode()]}).encode()
    content = iter([body[i : i + 65536] for i in range(0, len(body), 65536)]) if chunked else body
    response = client.post("/v1/captions", content=content, headers={"content-type": "application/json"})
    assert "200000 bytes" in _error(response, 413, "upload_too_large")
    _assert_healthy(client)


def test_a_file_that_is_not_an_image_gets_415_naming_it(client: TestClient) -> None:
    files = [("images", ("notes.txt", b"just some text", "text/plain"))]
    message = _error(client.post("/v1/captions", files=files), 415, "not_an_image")
    assert message.startswith("notes.txt: not an image")
    _assert_healthy(client)


def test_a_truncated_image_gets_422_naming_the_problem(client: TestClient, tmp_path: Path) -> None:
    data = write_truncated_jpeg(tmp_path / "cut.jpg").read_bytes()
    files = [("images", ("cut.jpg", data, "image/jpeg"))]
    assert _error(client.post("/v1/captions", files=files), 422, "bad_image").startswith(
        "cut.jpg: truncated or corrupt"
    )
    _assert_healthy(client)


@pytest.mark.parametrize(
    ("side", "named"),
    [(7000, "0-image.png: 7000x7000 = 49000000 pixels exceeds this server's limit"), (60000, "decompression bomb")],
    ids=["over-server-limit", "over-pil-limit"],
)
def test_a_decompression_bomb_is_refused_from_its_header(client: TestClient, side: int, named: str) -> None:
    # 49 Mpx passes Pillow's own limit (89 Mpx) but not the server's 40 Mpx; 3.6 Gpx is a bomb to Pillow itself.
    message = _error(client.post("/v1/captions", files=_files(_png_header(side, side))), 413, "image_too_large")
    assert message.startswith("0-image.png: ") and named in message
    _assert_healthy(client)


def test_too_many_images_get_422(client: TestClient) -> None:
    message = _error(client.post("/v1/captions", files=_files(*[RED] * 5)), 422, "too_many_images")
    assert "5 images" in message and "at most 4" in message
    _assert_healthy(client)


@pytest.mark.parametrize("as_json", [False, True])
def test_a_request_without_images_gets_422(client: TestClient, as_json: bool) -> None:
    if as_json:
        _error(client.post("/v1/captions", json={"images": []}), 422, "invalid_request")
    else:
        _error(client.post("/v1/captions", files=[("other", ("a.png", RED, "image/png"))]), 422, "no_images")
        _error(client.post("/v1/captions", files={"images": (None, "text")}), 422, "invalid_request")
    _assert_healthy(client)


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"num_beams": "4"}, "num_beams: Input should be less than or equal to 3"),
        ({"num_beams": "0"}, "num_beams: Input should be greater than or equal to 1"),
        ({"max_new_tokens": "9"}, "max_new_tokens: Input should be less than or equal to 8"),
        ({"min_new_tokens": "6", "max_new_tokens": "2"}, "min_new_tokens 6 is above max_new_tokens 2"),
        ({"min_new_tokens": "6"}, "min_new_tokens 6 is above max_new_tokens 5"),
        ({"repetition_penalty": "abc"}, "repetition_penalty: Input should be a valid number"),
        ({"repetition_penalty": "nan"}, "repetition_penalty: Input should be a finite number"),
        ({"temperature": "0.7"}, "temperature: Extra inputs are not permitted"),
    ],
)
def test_invalid_options_get_422_naming_the_field(client: TestClient, options: dict[str, str], named: str) -> None:
    assert named in _error(client.post("/v1/captions", files=_files(RED), data=options), 422, "invalid_options")
    _assert_healthy(client)


@pytest.mark.parametrize(
    ("content_type", "body", "status", "code"),
    [
        ("text/plain", b"hello", 415, "unsupported_media_type"),
        ("", b"hello", 415, "unsupported_media_type"),
        ("application/json", b'{"images": [', 422, "invalid_json"),
        ("application/json", b'{"images": ["not base64!"]}', 422, "invalid_base64"),
        ("application/json", '{"images": ["\u00e9t\u00e9"]}'.encode(), 422, "invalid_base64"),
        ("application/json", b'{"images": ["https://example.com/cat.jpg"]}', 422, "url_not_fetched"),
        ("application/json", b'{"images": "one"}', 422, "invalid_request"),
        ("multipart/form-data", b"--x\r\n", 400, "invalid_multipart"),
    ],
)
def test_malformed_requests_get_a_json_error(client: TestClient, content_type: str, body: bytes, status: int,
                                             code: str) -> None:  # fmt: skip
    _error(client.post("/v1/captions", content=body, headers={"content-type": content_type}), status, code)
    _assert_healthy(client)


@pytest.mark.parametrize("nested", [b"[" * 5000 + b"]" * 5000, b'{"a": ' * 5000 + b"1" + b"}" * 5000],
                         ids=["arrays", "objects"])  # fmt: skip
def test_deeply_nested_json_gets_422_not_500(client: TestClient, nested: bytes) -> None:
    body = b'{"images": [], "num_beams": ' + nested + b"}"
    response = client.post("/v1/captions", content=body, headers={"content-type": "application/json"})
    assert "nested too deeply" in _error(response, 422, "invalid_json")
    _assert_healthy(client)


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"num_beams": True}, "num_beams: Input should be a valid integer"),
        ({"num_beams": "3"}, "num_beams: Input should be a valid integer"),
        ({"max_new_tokens": 4.0}, "max_new_tokens: Input should be a valid integer"),
        ({"repetition_penalty": "1.5"}, "repetition_penalty: Input should be a valid number"),
        ({"repetition_penalty": False}, "repetition_penalty: Input should be a valid number"),
    ],
)
def test_json_options_must_be_json_numbers(client: TestClient, options: dict[str, Any], named: str) -> None:
    response = client.post("/v1/captions", json={"images": [base64.b64encode(RED).decode()], **options})
    assert named in _error(response, 422, "invalid_request")
    accepted = client.post("/v1/captions", json={"images": [base64.b64encode(RED).decode()], "repetition_penalty": 2})
    assert accepted.status_code == 200 and accepted.json()["options"]["repetition_penalty"] == 2.0


def _multipart(*parts: tuple[str, bytes]) -> bytes:
    """A multipart body of (field, png) file parts with the boundary `b0undary`, closing delimiter included."""
    body = b"".join(b'--b0undary\r\nContent-Disposition: form-data; name="%s"; filename="%d.png"\r\n'
                    b"Content-Type: image/png\r\n\r\n%s\r\n" % (name.encode(), i, data)
                    for i, (name, data) in enumerate(parts))  # fmt: skip
    return body + b"--b0undary--\r\n"


@pytest.mark.parametrize("cut_in", ["first part", "second part", "closing delimiter"])
def test_a_cut_off_multipart_body_gets_400(client: TestClient, cut_in: str) -> None:
    whole = _multipart(("images", RED), ("images", BLUE))
    ends = {"first part": whole.index(RED) + 50, "second part": whole.index(BLUE) + 50, "closing delimiter": -6}
    headers = {"content-type": "multipart/form-data; boundary=b0undary"}
    assert client.post("/v1/captions", content=whole, headers=headers).status_code == 200
    response = client.post("/v1/captions", content=whole[: ends[cut_in]], headers=headers)
    assert "ends before its closing boundary" in _error(response, 400, "invalid_multipart")
    _assert_healthy(client)


def test_a_full_queue_gets_503_with_retry_after(model_dir: Path) -> None:
    # One request of 4 images fills the queue while the worker waits up to 1 s for a batch of 8.
    busy = ServeSettings(device="cpu", max_images=4, max_queue=4, max_batch=8, max_wait_ms=1000, retry_after_s=2)
    with TestClient(create_app(model_dir, busy)) as test_client, ThreadPoolExecutor(1) as pool:
        first = pool.submit(test_client.post, "/v1/captions", files=_files(*[RED] * 4))
        _wait_for(lambda: test_client.get("/health").json()["pending_images"] == 4)
        refused = test_client.post("/v1/captions", files=_files(BLUE))
        assert "at capacity (4 images" in _error(refused, 503, "busy")
        assert refused.headers["retry-after"] == "2"
        assert first.result().status_code == 200
        _assert_healthy(test_client)


def test_a_failed_generate_call_gets_500_and_the_server_lives_on(model_dir: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    calls: list[int] = []

    def fail_once(*args: Any, **kwargs: Any) -> list[str]:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("CUDA out of memory")
        return generate_captions(*args, **kwargs)

    monkeypatch.setattr("captune.serve.generate_captions", fail_once)
    with TestClient(create_app(model_dir, SETTINGS)) as test_client:
        message = _error(test_client.post("/v1/captions", files=_files(RED)), 500, "generation_failed")
        assert message.startswith("captioning failed (RuntimeError)") and "CUDA" not in message
        _assert_healthy(test_client)


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--max-batch", "0"], "--max-batch must be >= 1"),
        (["--header-timeout-s", "nan"], "--header-timeout-s must be a number of seconds > 0"),
        (["--body-timeout-s", "0"], "--body-timeout-s must be a number of seconds > 0"),
        (["--idle-timeout-s", "inf"], "--idle-timeout-s must be a number of seconds > 0"),
        (["--max-connections", "0"], "--max-connections must be >= 1"),
        (["--max-connections", "8", "--max-connections-per-client", "9"], "--max-connections-per-client must be from"),
    ],
)
def test_invalid_server_settings_are_refused_by_the_command(
    model_dir: Path, capsys: pytest.CaptureFixture[str], flags: list[str], named: str
) -> None:
    assert main(["serve", "--model-dir", str(model_dir), *flags]) == 2
    assert f"error: invalid server settings: {named}" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("port", "named"),
    [("99999", "--port 99999: not a TCP port"), ("-1", "--port -1: not a TCP port"), ("busy", "already in use")],
)
def test_a_bad_or_busy_port_is_refused_before_the_model_loads(model_dir: Path, capsys: pytest.CaptureFixture[str],
                                                              monkeypatch: pytest.MonkeyPatch, port: str,
                                                              named: str) -> None:  # fmt: skip
    def no_model(*_: Any, **__: Any) -> None:
        raise AssertionError("the model was loaded before the address was checked")

    monkeypatch.setattr("captune.serve.create_app", no_model)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        given = str(taken.getsockname()[1]) if port == "busy" else port
        assert main(["serve", "--model-dir", str(model_dir), "--host", "127.0.0.1", "--port", given]) == 2
    err = capsys.readouterr().err
    assert named in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_a_model_whose_defaults_break_the_limits_is_refused_at_start(model_dir: Path) -> None:
    with pytest.raises(CaptuneError, match=r"generation defaults break this server's limits \(max_new_tokens: "):
        create_app(model_dir, ServeSettings(device="cpu", max_new_tokens=4))


# --- micro-batching ------------------------------------------------------------------------------------------------


def _recording_generate(calls: list[tuple[int, int]]) -> Callable[[list[Image.Image], GenerateConfig], list[str]]:
    """A stand-in for generate_captions: records (images, num_beams) per call; the caption is the image's width."""

    def generate(images: list[Image.Image], options: GenerateConfig) -> list[str]:
        calls.append((len(images), options.num_beams))
        return [f"w{image.width}" for image in images]

    return generate


def _images(*widths: int) -> list[Image.Image]:
    return [Image.new("RGB", (width, 1)) for width in widths]


def test_batcher_captions_requests_with_the_same_options_in_one_call() -> None:
    calls: list[tuple[int, int]] = []
    # The worker waits (up to 10 s) until 6 images are queued, then captions them at once.
    batcher = MicroBatcher(_recording_generate(calls), max_batch=6, max_wait_s=10)
    batcher.start()
    greedy, beam = GenerateConfig(num_beams=1), GenerateConfig(num_beams=2)
    futures = [batcher.submit(_images(1, 2), greedy), batcher.submit(_images(3), beam),
               batcher.submit(_images(4, 5, 6), greedy)]  # fmt: skip
    results = [future.result(timeout=10) for future in futures]
    batcher.close()
    assert sorted(calls) == [(1, 2), (5, 1)]
    assert [r.captions for r in results] == [["w1", "w2"], ["w3"], ["w4", "w5", "w6"]]
    assert [r.batch_images for r in results] == [5, 1, 5]


def test_batcher_splits_a_group_larger_than_max_batch() -> None:
    calls: list[tuple[int, int]] = []
    batcher = MicroBatcher(_recording_generate(calls), max_batch=2, max_wait_s=0)
    batcher.start()
    result = batcher.submit(_images(1, 2, 3, 4, 5), GenerateConfig()).result(timeout=10)
    batcher.close()
    assert calls == [(2, 5), (2, 5), (1, 5)]
    assert result.captions == ["w1", "w2", "w3", "w4", "w5"] and result.batch_images == 2


def test_batcher_captions_what_is_queued_before_it_stops() -> None:
    calls: list[tuple[int, int]] = []
    batcher = MicroBatcher(_recording_generate(calls), max_batch=8, max_wait_s=30)
    batcher.start()
    future = batcher.submit(_images(7), GenerateConfig())
    batcher.close()  # well before the 30 s wait is over
    assert future.result(timeout=0).captions == ["w7"]
    with pytest.raises(ApiError, match="not running"):
        batcher.submit(_images(1), GenerateConfig())


def test_concurrent_requests_are_captioned_in_one_generate_call(model_dir: Path) -> None:
    batching = ServeSettings(device="cpu", max_batch=4, max_wait_ms=5000)
    with TestClient(create_app(model_dir, batching)) as test_client, ThreadPoolExecutor(4) as pool:
        started = time.monotonic()
        responses = list(pool.map(lambda data: test_client.post("/v1/captions", files=_files(data)), [RED, BLUE] * 2))
        # The batch closes when its 4th image comes, not after the 5 s wait.
        assert time.monotonic() - started < 4
    assert [r.status_code for r in responses] == [200] * 4
    assert [r.json()["timing"]["batch_images"] for r in responses] == [4] * 4
    assert responses[0].json()["captions"] == responses[2].json()["captions"]


# --- a real server: the page in Chromium, graceful shutdown --------------------------------------------------------


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
def _uvicorn_in_thread(model_dir: Path, serve_settings: ServeSettings) -> Iterator[tuple[str, uvicorn.Server]]:
    """The server `run_server` runs (uvicorn with captune's timeouts and connection limits) on a free port of
    127.0.0.1; stopped as SIGTERM stops it (should_exit)."""
    port = _free_port()
    listening = listen("127.0.0.1", port)
    server = uvicorn_server(create_app(model_dir, serve_settings), serve_settings, log_level="warning")
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listening]}, daemon=True)
    thread.start()
    try:
        _wait_for(lambda: server.started)
        yield f"http://127.0.0.1:{port}", server
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture(scope="module")
def live_url(model_dir: Path) -> Iterator[str]:
    with _uvicorn_in_thread(model_dir, SETTINGS) as (url, _):
        yield url


def _page_state(driver: webdriver.Chrome, states: tuple[str, ...]) -> str:
    """Waits until the page's body has one of `states` in data-state, and returns it."""
    WebDriverWait(driver, 30).until(lambda d: d.execute_script("return document.body.dataset.state") in states)
    return str(driver.execute_script("return document.body.dataset.state"))


def test_page_captions_an_uploaded_image_in_chromium(live_url: str, browser: webdriver.Chrome, tmp_path: Path) -> None:
    photo = write_image(tmp_path / "red.png", (210, 30, 30), size=32, fmt="PNG")
    expected = httpx2.post(f"{live_url}/v1/captions", files=_files(photo.read_bytes())).json()["captions"][0]["caption"]
    browser.get(live_url)
    assert _page_state(browser, ("ready", "error")) == "ready"
    assert browser.find_element(By.ID, "max_new_tokens").get_attribute("value") == "5"  # the model's default
    browser.find_element(By.ID, "file").send_keys(str(photo))
    assert _page_state(browser, ("done", "error")) == "done"
    assert browser.find_element(By.ID, "caption").text == (expected or "(the model gave an empty caption)")
    assert "1 image(s) in the batch" in browser.find_element(By.ID, "timing").text
    preview = browser.execute_script(
        "const i = document.getElementById('preview'); return [i.complete, i.naturalWidth]"
    )
    assert preview == [True, 32]
    screenshot = tmp_path / "serve-page.png"
    assert browser.save_screenshot(str(screenshot))
    assert Image.open(screenshot).size[0] > 1000


def test_page_shows_errors_in_words(live_url: str, browser: webdriver.Chrome, tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("not a picture")
    browser.get(live_url)
    _page_state(browser, ("ready",))
    browser.find_element(By.ID, "file").send_keys(str(notes))
    assert _page_state(browser, ("done", "error")) == "error"
    error = browser.find_element(By.ID, "error").text
    assert error.startswith("Not captioned: notes.txt: not an image Pillow can read; send JPEG")
    assert not browser.find_element(By.ID, "result").is_displayed()
    field = browser.find_element(By.ID, "max_new_tokens")
    field.clear()
    field.send_keys("99")
    browser.find_element(By.ID, "file").send_keys(str(write_image(tmp_path / "ok.png", fmt="PNG")))
    assert _page_state(browser, ("done", "error")) == "error"
    assert "max_new_tokens: Input should be less than or equal to 8" in browser.find_element(By.ID, "error").text


def test_stopping_the_server_lets_requests_in_flight_finish(model_dir: Path) -> None:
    # A lone request waits 1.5 s in the batcher for company: the stop comes while it is in flight.
    slow = ServeSettings(device="cpu", max_batch=4, max_wait_ms=1500)
    with _uvicorn_in_thread(model_dir, slow) as (url, server), ThreadPoolExecutor(1) as pool:
        in_flight = pool.submit(httpx2.post, f"{url}/v1/captions", files=_files(RED), timeout=30)
        _wait_for(lambda: httpx2.get(f"{url}/health").json()["pending_images"] == 1)
        server.should_exit = True  # what uvicorn's SIGTERM / SIGINT handler does
        response = in_flight.result(timeout=30)
    assert response.status_code == 200 and response.json()["timing"]["queue_ms"] >= 1000
    with pytest.raises(httpx2.ConnectError):
        httpx2.get(f"{url}/health")


def test_captune_serve_process_answers_and_exits_cleanly_on_sigterm(model_dir: Path, tmp_path: Path) -> None:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "serve.log"
    command = [sys.executable, "-m", "captune.cli", "serve", "--model-dir", str(model_dir), "--port", str(port),
               "--device", "cpu", "--max-batch", "4", "--max-wait-ms", "1500"]  # fmt: skip
    with open(log, "w") as out:
        process = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env=os.environ | {"OMP_NUM_THREADS": "1"}
        )
    try:
        _wait_for(lambda: _answers(f"{url}/health") or process.poll() is not None, timeout=90)
        assert process.poll() is None, log.read_text()
        assert httpx2.get(url).text.startswith("<!DOCTYPE html>")
        with ThreadPoolExecutor(1) as pool:
            in_flight = pool.submit(httpx2.post, f"{url}/v1/captions", files=_files(RED), timeout=30)
            _wait_for(lambda: httpx2.get(f"{url}/health").json()["pending_images"] == 1)
            process.send_signal(signal.SIGTERM)
            assert in_flight.result(timeout=30).status_code == 200
        assert process.wait(timeout=30) == 0, log.read_text()
    finally:
        if process.poll() is None:
            process.kill()
    assert "Traceback" not in log.read_text()


# --- a real server: timeouts and connection limits (127.0.0.1 only, each bounded to a few seconds) -----------------

# Small timeouts and limits, so that each is reached in about a second.
GUARDED = ServeSettings(device="cpu", idle_timeout_s=0.5, header_timeout_s=1.0, body_timeout_s=1.0,
                        max_connections=6, max_connections_per_client=3, retry_after_s=2)  # fmt: skip


@pytest.fixture(scope="module")
def guarded_url(model_dir: Path) -> Iterator[str]:
    with _uvicorn_in_thread(model_dir, GUARDED) as (url, _):
        yield url


def _address(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").split(":")
    assert host == "127.0.0.1"
    return host, int(port)


def _until_closed(sock: socket.socket, limit_s: float, trickle: bytes = b"") -> tuple[bytes, float]:
    """What the server sends until it closes the connection, and after how many seconds; sends `trickle` a byte
    every 0.1 s meanwhile (a slow client). Fails after `limit_s` with the connection still open."""
    started, received = time.monotonic(), b""
    to_send = itertools.cycle(trickle) if trickle else None
    sock.settimeout(0.1)
    while time.monotonic() - started < limit_s:
        if to_send is not None:
            try:
                sock.sendall(bytes([next(to_send)]))
            except OSError:  # closed by the server
                to_send = None
        try:
            data = sock.recv(65536)
        except TimeoutError:
            continue
        except ConnectionResetError:
            return received, time.monotonic() - started
        if not data:
            return received, time.monotonic() - started
        received += data
    raise AssertionError(f"still open after {limit_s} s; received {received!r}")


def _raw_error(raw: bytes, status: int, code: str) -> str:
    """The message of an error written on a raw connection, after checking its status line, close and JSON shape."""
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode().lower().split("\r\n")
    assert lines[0].startswith(f"http/1.1 {status} ") and "connection: close" in lines, raw
    assert "content-type: application/json" in lines
    return _error(httpx2.Response(status, content=body), status, code)


def test_an_idle_connection_is_closed_after_the_idle_timeout(guarded_url: str) -> None:
    with socket.create_connection(_address(guarded_url)) as fresh:
        assert _until_closed(fresh, limit_s=5)[0] == b""  # nothing sent: closed without an answer
    with socket.create_connection(_address(guarded_url)) as kept:
        kept.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        answered, seconds = _until_closed(kept, limit_s=5)
    assert answered.startswith(b"HTTP/1.1 200 ") and 0.4 < seconds < 3  # kept alive, then closed when idle


def test_headers_sent_a_byte_at_a_time_get_408_after_the_header_timeout(guarded_url: str) -> None:
    with socket.create_connection(_address(guarded_url)) as slow:
        slow.sendall(b"GET /health HTTP/1.1\r\n")
        raw, seconds = _until_closed(slow, limit_s=5, trickle=b"X-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n")
    assert "within 1 s (--header-timeout-s)" in _raw_error(raw, 408, "header_timeout")
    assert 0.9 < seconds < 3  # the whole header's time, not the time between bytes (the idle timeout is 0.5 s)


def test_a_body_sent_a_byte_at_a_time_gets_408_after_the_body_timeout(guarded_url: str) -> None:
    with socket.create_connection(_address(guarded_url)) as slow:
        slow.sendall(b"POST /v1/captions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 10000\r\n\r\n")  # fmt: skip
        raw, seconds = _until_closed(slow, limit_s=5, trickle=b"[")
    assert "within 1 s (--body-timeout-s)" in _raw_error(raw, 408, "body_timeout")
    assert 0.9 < seconds < 3
    _assert_healthy(httpx2.Client(base_url=guarded_url))


def test_a_request_uvicorn_cannot_parse_gets_a_json_400(guarded_url: str) -> None:
    with socket.create_connection(_address(guarded_url)) as garbled:
        garbled.sendall(b"NOT HTTP AT ALL\r\n\r\n")
        raw, _ = _until_closed(garbled, limit_s=5)
    assert "not a valid HTTP/1.1 request" in _raw_error(raw, 400, "invalid_http")


@pytest.mark.parametrize(("per_client", "named"), [(3, "3 connections from 127.0.0.1 (--max-connections-per-client)"),
                                                   (6, "6 connections (--max-connections)")])  # fmt: skip
def test_connections_over_the_limits_are_refused_at_once(model_dir: Path, per_client: int, named: str) -> None:
    limits = replace(GUARDED, idle_timeout_s=30, header_timeout_s=30, max_connections_per_client=per_client)
    with _uvicorn_in_thread(model_dir, limits) as (url, _), contextlib.ExitStack() as held:
        half_sent = [held.enter_context(socket.create_connection(_address(url))) for _ in range(per_client)]
        for sock in half_sent:
            sock.sendall(b"POST /v1/captions HTTP/1.1\r\nHost: x\r\n")
        with socket.create_connection(_address(url)) as refused:
            raw, seconds = _until_closed(refused, limit_s=5)
        assert named in _raw_error(raw, 503, "too_many_connections") and seconds < 2  # the others wait 30 s
        assert b"retry-after: 2" in raw.lower()
        held.close()  # the half-sent requests go: their slots are free again
        _wait_for(lambda: _answers(f"{url}/health"), timeout=5)
        _assert_healthy(httpx2.Client(base_url=url))


def _answers(url: str) -> bool:
    try:
        return httpx2.get(url, timeout=2).status_code == 200
    except httpx2.TransportError:
        return False


# --- property-based: no input gets a 500 ---------------------------------------------------------------------------

# Each strategy mixes valid values (so that requests also reach decoding and generation) with hostile ones.
_options = st.one_of(
    st.fixed_dictionaries({}, optional={"num_beams": st.integers(1, 3), "max_new_tokens": st.integers(5, 8),
                                        "repetition_penalty": st.floats(1, 5)}),
    st.dictionaries(
        st.sampled_from([*OPTION_NAMES, "prompt"]),
        st.one_of(st.integers(-3, 12), st.floats(), st.text(max_size=6), st.none()),
        max_size=2,
    ),
)  # fmt: skip
_good_images = st.sampled_from([RED, BLUE])
_image_bytes = st.one_of(
    _good_images, st.sampled_from([RED[:60], _png_header(9000, 9000), b""]), st.binary(max_size=80)
)
_image_lists = st.one_of(st.lists(_good_images, min_size=1, max_size=4), st.lists(_image_bytes, min_size=1, max_size=4))
_good_base64 = _good_images.map(lambda data: base64.b64encode(data).decode())
_base64_images = st.one_of(
    _good_base64,
    st.sampled_from(["http://127.0.0.1/x.png", "@@", "data:image/png,abc", "data:image/png;base64,"]),
    st.binary(max_size=40).map(lambda data: base64.b64encode(data).decode()),
    st.text(max_size=8),
)
_base64_lists = st.one_of(st.lists(_good_base64, min_size=1, max_size=4), st.lists(_base64_images, min_size=1,
                                                                                   max_size=4))  # fmt: skip
_any_json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                         lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                                     max_size=3),
                         max_leaves=8)  # fmt: skip


@settings(max_examples=100, deadline=None, derandomize=True, database=None)
@given(options=_options, images=_image_lists)
def test_any_multipart_request_gets_a_caption_or_a_json_error(client: TestClient, options: dict[str, Any],
                                                              images: list[bytes]) -> None:  # fmt: skip
    data = {name: str(value) for name, value in options.items()}
    response = client.post("/v1/captions", files=_files(*images), data=data)
    assert response.status_code in SERVER_STATUSES, response.text
    body = response.json()
    if response.status_code == 200:
        assert len(body["captions"]) == len(images)
    else:
        assert set(body) == {"error"} and body["error"]["message"]


@settings(max_examples=100, deadline=None, derandomize=True, database=None)
@given(payload=st.one_of(_any_json, st.builds(lambda images, options: {"images": images, **options},
                                              _base64_lists, _options)))  # fmt: skip
def test_any_json_request_gets_a_caption_or_a_json_error(client: TestClient, payload: Any) -> None:
    # json.dumps writes NaN and Infinity, which the server must refuse like any other bad value.
    response = client.post("/v1/captions", content=json.dumps(payload), headers={"content-type": "application/json"})
    assert response.status_code in SERVER_STATUSES, response.text
    assert ("captions" if response.status_code == 200 else "error") in response.json()


@pytest.mark.parametrize(("max_batch", "sizes"), [(1, [1]), (4, [1, 2, 4]), (6, [1, 2, 4, 6]), (16, [1, 2, 4, 8, 16])])
def test_static_batch_sizes_are_those_batches_are_filled_to(max_batch: int, sizes: list[int]) -> None:
    from captune.generation.core import filled_size
    from captune.serve import static_batch_sizes

    assert static_batch_sizes(max_batch) == sizes
    assert {filled_size(count, max_batch, powers_of_two=True) for count in range(1, max_batch + 1)} == set(sizes)


@pytest.mark.parametrize("static", [True, False])
def test_warm_up_captions_every_static_batch_size_before_the_first_request(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, static: bool
) -> None:
    from captune.model_dir import save_tiny_model_dir

    run = save_tiny_model_dir(tmp_path, ["num_beams=1", "min_new_tokens=1", "max_new_tokens=5",
                                         f"static_cache={str(static).lower()}"])  # fmt: skip
    import captune.serve as serve

    calls: list[tuple[int, str]] = []
    real = serve.generate_captions

    def recording(model: Any, processor: Any, images: list[Image.Image], *rest: Any) -> list[str]:
        calls.append((len(images), threading.current_thread().name))
        return real(model, processor, images, *rest)

    monkeypatch.setattr(serve, "generate_captions", recording)
    with TestClient(create_app(run, replace(SETTINGS, warm_up=True, max_batch=4))) as warm:
        at_start = list(calls)
        assert warm.post("/v1/captions", files=_files(RED, BLUE, RED)).status_code == 200
    # On the generation worker's thread (CUDA graphs belong to the thread that records them); nothing without a
    # static cache (nothing is compiled then).
    assert at_start == ([(1, "captune-generate"), (2, "captune-generate"), (4, "captune-generate")] if static else [])
    assert calls[len(at_start) :] == [(4 if static else 3, "captune-generate")]
