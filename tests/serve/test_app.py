"""The app: captions of multipart and JSON requests and their options, /health, /v1/model, the OpenAPI document,
the requests it refuses, a failed generate call, and the static cache's filled batches and warm-up (the web app:
test_web.py)."""

from __future__ import annotations

import base64
import json
import shutil
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from captune.config import GenerateConfig
from captune.data.images import load_rgb
from captune.errors import CaptuneError
from captune.generation.core import generate_captions
from captune.model_dir import load_model_dir
from captune.serve import ServeSettings, create_app

from .conftest import BLUE, RED, SETTINGS, _assert_healthy, _error, _files

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


# --- health, model, OpenAPI ---------------------------------------------------------------------------------------


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


# --- requests refused, a failed generate call, defaults over the limits --------------------------------------------


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


def test_a_failed_generate_call_gets_500_and_the_server_lives_on(model_dir: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    calls: list[int] = []

    def fail_once(*args: Any, **kwargs: Any) -> list[str]:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("CUDA out of memory")
        return generate_captions(*args, **kwargs)

    monkeypatch.setattr("captune.serve.app.generate_captions", fail_once)
    with TestClient(create_app(model_dir, SETTINGS)) as test_client:
        message = _error(test_client.post("/v1/captions", files=_files(RED)), 500, "generation_failed")
        assert message.startswith("captioning failed (RuntimeError)") and "CUDA" not in message
        _assert_healthy(test_client)


def test_a_model_whose_defaults_break_the_limits_is_refused_at_start(model_dir: Path) -> None:
    with pytest.raises(CaptuneError, match=r"generation defaults break this server's limits \(max_new_tokens: "):
        create_app(model_dir, ServeSettings(device="cpu", max_new_tokens=4))


# --- a static cache: filled batches, warm-up -----------------------------------------------------------------------


def test_a_static_cache_server_fills_batches_to_powers_of_two(
    tmp_path: Path, client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    from captune.model_dir import save_tiny_model_dir

    static_dir = save_tiny_model_dir(tmp_path, ["num_beams=1", "min_new_tokens=1", "max_new_tokens=5",
                                                "static_cache=true"])  # fmt: skip
    import captune.serve.app as serve

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
    import captune.serve.app as serve

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
