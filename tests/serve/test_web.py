"""The web app (Gradio) through `gradio_client`: a caption and an answer equal the REST API's for the same image, the
errors are the API's sentences, the uploads stay in captune's temporary directory (removed when the app stops), the
server reaches no outside host, `captune app` serves the app without the API, and the API works without gradio."""

from __future__ import annotations

import json
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest
from fastapi.testclient import TestClient
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError

from captune.cli import main
from captune.model_dir import save_tiny_model_dir
from captune.serve import create_app

from ..conftest import write_image, write_truncated_jpeg
from .conftest import BLUE, RED, SETTINGS, _error, _files, _uvicorn_in_thread

QUESTION = "what colour is the square?"
DEFAULTS = (1, 1, 5, 1.0)  # the tiny run's num_beams, min_new_tokens, max_new_tokens, repetition_penalty


@pytest.fixture(scope="module")
def vqa_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny `task: vqa` run, for --vqa-model-dir."""
    root = tmp_path_factory.mktemp("vqa")
    return save_tiny_model_dir(root, ["task=vqa", "num_beams=1", "min_new_tokens=1", "max_new_tokens=5"])


@pytest.fixture(scope="module")
def live(model_dir: Path, vqa_model_dir: Path) -> Iterator[str]:
    """The REST API and the web app in one server (`captune serve --vqa-model-dir`)."""
    with _uvicorn_in_thread(model_dir, SETTINGS, vqa_model_dir=vqa_model_dir) as (url, _):
        yield url


@pytest.fixture
def app_client(live: str, tmp_path: Path) -> Client:
    return Client(live, verbose=False, download_files=str(tmp_path / "downloads"))


def _image(tmp_path: Path, data: bytes, name: str = "red.png") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def _caption(client: Client, paths: list[Path], *options: Any) -> tuple[Any, ...]:
    given = options or DEFAULTS
    return tuple(client.predict([handle_file(str(p)) for p in paths], *given, api_name="/caption"))


# --- the same captions and answers as the API -----------------------------------------------------------------------


def test_the_app_captions_as_the_api_and_offers_csv_and_jsonl(live: str, app_client: Client, tmp_path: Path) -> None:
    api = httpx2.post(f"{live}/v1/captions", files=_files(RED, BLUE)).json()["captions"]
    paths = [_image(tmp_path, RED, "red.png"), _image(tmp_path, BLUE, "blue.png")]
    table, timing, csv_file, jsonl_file = _caption(app_client, paths)
    assert [row[1:] for row in table["data"]] == [["red.png", api[0]["caption"]], ["blue.png", api[1]["caption"]]]
    assert all(row[0].startswith('<img src="data:image/jpeg;base64,') for row in table["data"])  # thumbnails
    assert timing.startswith("2 image(s) in ") and "2 image(s) in the batch" in timing
    rows = [json.loads(line) for line in Path(jsonl_file["value"]).read_text().splitlines()]
    names = ["red.png", "blue.png"]
    assert rows == [{"image": name, "caption": c["caption"]} for name, c in zip(names, api, strict=True)]
    assert Path(csv_file["value"]).read_text().splitlines()[0] == "image,caption"


def test_the_apps_options_are_the_apis(live: str, app_client: Client, tmp_path: Path) -> None:
    options = {"num_beams": "3", "min_new_tokens": "2", "max_new_tokens": "2", "repetition_penalty": "1.5"}
    api = httpx2.post(f"{live}/v1/captions", files=_files(BLUE), data=options).json()["captions"][0]["caption"]
    table = _caption(app_client, [_image(tmp_path, BLUE)], 3, 2, 2, 1.5)[0]
    assert table["data"][0][2] == api


def test_the_ask_tab_answers_with_the_vqa_model_as_the_api(live: str, app_client: Client, tmp_path: Path) -> None:
    api = httpx2.post(f"{live}/v1/answers", files=[("image", ("blue.png", BLUE, "image/png"))],
                      data={"question": QUESTION}).json()  # fmt: skip
    answer, timing = app_client.predict(handle_file(str(_image(tmp_path, BLUE))), QUESTION, *DEFAULTS, api_name="/ask")
    assert answer == api["answer"] and timing.startswith("1 image(s) in ")
    info = httpx2.get(f"{live}/v1/model").json()
    assert info["vqa_model"]["tasks"] == ["caption", "vqa"] and info["tasks"] == ["caption"]


# --- errors as sentences -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("not an image", "notes.txt: not an image Pillow can read; send JPEG, PNG, WebP, GIF, BMP or TIFF"),
        ("truncated", "cut.jpg: "),
        ("too many", "5 images in one request; this server takes at most 4 (--max-images)"),
        ("too large", "exceeds this server's limit of 200000 bytes"),
        ("out of range", "num_beams: Input should be less than or equal to 3"),
        ("min above max", "min_new_tokens 6 is above max_new_tokens 5"),
    ],
)
def test_the_app_says_what_is_wrong_in_a_sentence(app_client: Client, tmp_path: Path, case: str,
                                                  message: str) -> None:  # fmt: skip
    good = _image(tmp_path, RED)
    paths, options = [good], DEFAULTS
    if case == "not an image":
        paths = [tmp_path / "notes.txt"]
        paths[0].write_text("not a picture")
    elif case == "truncated":
        paths = [write_truncated_jpeg(tmp_path / "cut.jpg")]
    elif case == "too many":
        paths = [good] * 5
    elif case == "too large":  # each file under the limit, the request over it (as the API's body)
        paths = [write_image(tmp_path / f"noise{i}.bmp", (i, 0, 0), size=200, fmt="BMP") for i in range(2)]
    elif case == "out of range":
        options = (9, 1, 5, 1.0)
    else:
        options = (1, 6, 5, 1.0)
    with pytest.raises(AppError) as raised:
        _caption(app_client, paths, *options)
    assert message in str(raised.value) and "Traceback" not in str(raised.value)
    assert _caption(app_client, [good])[0]["data"]  # the app lives on


def test_the_ask_tab_without_a_vqa_model_says_so(model_dir: Path, tmp_path: Path) -> None:
    with _uvicorn_in_thread(model_dir, SETTINGS) as (url, _):
        client = Client(url, verbose=False, download_files=False)
        with pytest.raises(AppError, match="no VQA model is loaded; start the server with --vqa-model-dir"):
            client.predict(handle_file(str(_image(tmp_path, RED))), QUESTION, *DEFAULTS, api_name="/ask")


# --- offline, temporary files --------------------------------------------------------------------------------------


def test_uploads_stay_in_captunes_temporary_directory_removed_at_stop(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    outside: list[Any] = []
    connect = socket.socket.connect

    def loopback_only(sock: socket.socket, address: Any) -> Any:
        if isinstance(address, tuple) and address[0] not in ("127.0.0.1", "::1", "localhost"):
            outside.append(address)
        return connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", loopback_only)
    with _uvicorn_in_thread(model_dir, SETTINGS) as (url, _):
        temp_dir = Path(os.environ["GRADIO_TEMP_DIR"])
        assert temp_dir.name.startswith("captune-app-")
        _caption(Client(url, verbose=False, download_files=False), [_image(tmp_path, RED, "mine.png")])
        assert list(temp_dir.rglob("mine.png")) and list(temp_dir.rglob("captions.jsonl"))
    assert not temp_dir.exists()
    assert outside == []  # no analytics, no version check, no share tunnel


def test_captune_app_serves_the_app_without_the_api(model_dir: Path) -> None:
    with TestClient(create_app(model_dir, SETTINGS, api=False)) as client:
        assert client.get("/").status_code == 200 and "<gradio-app" in client.get("/").text
        assert client.get("/health").json()["status"] == "ok"
        assert client.post("/v1/captions", files=_files(RED)).status_code != 200


def test_without_gradio_the_api_works_and_slash_says_how_to_get_the_app(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "gradio", None)  # `import gradio` raises ModuleNotFoundError
    monkeypatch.delitem(sys.modules, "captune.serve.web", raising=False)
    with TestClient(create_app(model_dir, SETTINGS)) as client:
        assert "pip install 'captune[app]'" in _error(client.get("/"), 404, "no_web_app")
        response = client.post("/v1/captions", files=_files(RED))
        assert response.status_code == 200, response.text


def test_captune_app_without_gradio_is_refused_before_the_model_loads(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    assert main(["app", "--model-dir", str(model_dir)]) == 2
    assert "pip install 'captune[app]'" in capsys.readouterr().err
