"""`POST /v1/search` and the thumbnails of indexed images: hits equal `SearchIndex.search_text` / `search_image` called
directly (text and image queries, multipart and JSON, re-ranked, a captions index), the errors as the API's sentences,
the same admission and limits as the other routes, only indexed images served, and a server of an index alone."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image

from captune.cli import main
from captune.errors import CaptuneError
from captune.retrieval import build_tiny_retrieval, save_retrieval
from captune.search import Hit, SearchIndex
from captune.serve import create_app
from captune.serve.search import THUMBNAIL_PX, image_url
from captune.serve.settings import MAX_SEARCH_RERANK, MAX_SEARCH_TOP

from .conftest import RED, SETTINGS, _error, _files, _free_port

QUERY = "a red square on the left"


@pytest.fixture(scope="module")
def app(model_dir: Path, image_index: Path) -> FastAPI:
    return create_app(model_dir, SETTINGS, index_dir=image_index)


@pytest.fixture(scope="module")
def client(app: FastAPI) -> Iterator[TestClient]:
    with TestClient(app) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def direct(image_index: Path) -> SearchIndex:
    """The same index opened directly, with its recorded model."""
    return SearchIndex.open(image_index, device="cpu")


def _pairs(hits: list[Any]) -> list[tuple[str, float]]:
    return [(h.key, h.score) if isinstance(h, Hit) else (h["key"], h["score"]) for h in hits]


def _assert_same_hits(api: list[dict[str, Any]], expected: list[Hit]) -> None:
    assert [h["key"] for h in api] == [h.key for h in expected]
    assert [h["score"] for h in api] == pytest.approx([h.score for h in expected], abs=1e-6)


def _image_part(data: bytes, name: str = "query.png") -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("image", (name, data, "image/png"))]


def _form(files: list[Any] | None = None, **fields: str) -> list[Any]:
    """A multipart body of text `fields` (and file parts), as `curl -F text=... -F top=3` sends it."""
    return [(name, (None, value)) for name, value in fields.items()] + (files or [])


# --- the hits are the library's ---------------------------------------------------------------------------------


def test_text_search_equals_search_text(client: TestClient, direct: SearchIndex) -> None:
    response = client.post("/v1/search", files=_form(text=QUERY, top="3"))
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["kind"], body["text"], body["top"], body["rerank"]) == ("images", QUERY, 3, 0)
    _assert_same_hits(body["hits"], direct.search_text(QUERY, 3))
    assert [h["image_url"] for h in body["hits"]] == [image_url(h["key"]) for h in body["hits"]]
    assert all(h["caption"] is None for h in body["hits"])


def test_image_search_equals_search_image(
    client: TestClient, direct: SearchIndex, search_images: tuple[list[Path], list[str]]
) -> None:
    query = search_images[0][5]
    response = client.post("/v1/search", files=_image_part(query.read_bytes(), query.name), data={"top": "4"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["filename"] == query.name and body["text"] is None
    _assert_same_hits(body["hits"], direct.search_image(query, 4))
    assert body["hits"][0]["key"] == str(query.resolve())  # the image itself, first


def test_json_requests_give_the_multipart_hits(
    client: TestClient, direct: SearchIndex, search_images: tuple[list[Path], list[str]]
) -> None:
    query = search_images[0][2]
    image = base64.b64encode(query.read_bytes()).decode()
    by_image = client.post("/v1/search", json={"image": f"data:image/png;base64,{image}", "top": 2}).json()
    _assert_same_hits(by_image["hits"], direct.search_image(query, 2))
    by_text = client.post("/v1/search", json={"text": QUERY}).json()
    _assert_same_hits(by_text["hits"], direct.search_text(QUERY))  # top 10 by default: every image of 8
    assert len(by_text["hits"]) == 8


def test_rerank_equals_search_text_reranked(client: TestClient, direct: SearchIndex) -> None:
    body = client.post("/v1/search", files=_form(text=QUERY, top="4", rerank="3")).json()
    expected = direct.search_text(QUERY, 4, rerank=3)
    _assert_same_hits(body["hits"], expected)
    assert _pairs(expected) != _pairs(direct.search_text(QUERY, 4))  # the matching head changed the scores


def test_a_captions_index_answers_captions(
    model_dir: Path, caption_index: Path, search_images: tuple[list[Path], list[str]]
) -> None:
    query = search_images[0][0]
    direct = SearchIndex.open(caption_index, device="cpu")
    with TestClient(create_app(model_dir, SETTINGS, index_dir=caption_index)) as client:
        body = client.post("/v1/search", files=_form(_image_part(query.read_bytes()), top="3")).json()
        assert body["kind"] == "captions"
        _assert_same_hits(body["hits"], direct.search_image(query, 3))
        captions = search_images[1]
        assert [h["caption"] for h in body["hits"]] == [captions[int(h["key"][1:])] for h in body["hits"]]
        assert all(h["image_url"] is None for h in body["hits"])
        text = client.post("/v1/search", files=_form(text=captions[3], top="2")).json()
        _assert_same_hits(text["hits"], direct.search_text(captions[3], 2))
        assert "holds captions, not images" in _error(client.get(image_url("c0")), 404, "not_indexed")


# --- errors as sentences ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "files", "status", "code", "fragment"),
    [
        ({"top": "3"}, None, 422, "invalid_query", "give a text query (field `text`) or one image"),
        ({"text": QUERY}, _image_part(RED), 422, "invalid_query", "not both and not neither"),
        ({"text": "   "}, None, 422, "invalid_query", "text: empty; give words to search for"),
        ({"text": QUERY, "top": "0"}, None, 422, "invalid_query", "top: Input should be greater than or equal to 1"),
        (
            {"text": QUERY, "top": str(MAX_SEARCH_TOP + 1)},
            None,
            422,
            "invalid_query",
            f"top: Input should be less than or equal to {MAX_SEARCH_TOP}",
        ),  # fmt: skip
        ({"text": QUERY, "top": "ten"}, None, 422, "invalid_query", "top: Input should be a valid integer"),
        (
            {"text": QUERY, "rerank": str(MAX_SEARCH_RERANK + 1)},
            None,
            422,
            "invalid_query",
            f"rerank: Input should be less than or equal to {MAX_SEARCH_RERANK}",
        ),  # fmt: skip
        ({"text": QUERY, "num_beams": "3"}, None, 422, "invalid_query", "num_beams: Extra inputs are not permitted"),
        (
            {},
            _image_part(b"not a picture", "notes.txt"),
            415,
            "not_an_image",
            "notes.txt: not an image Pillow can read",
        ),  # fmt: skip
        ({}, _image_part(RED) * 2, 422, "too_many_images", "2 images: a search takes one image query"),
        ({"rerank": "2"}, _image_part(RED), 422, "invalid_query", "--rerank scores image-text pairs"),
    ],
)
def test_a_bad_search_is_named(
    client: TestClient, data: dict[str, str], files: Any, status: int, code: str, fragment: str
) -> None:
    assert fragment in _error(client.post("/v1/search", files=_form(files, **data)), status, code)
    assert client.get("/health").json()["pending_images"] == 0  # every slot given back


def test_a_bad_json_search_is_named(client: TestClient) -> None:
    message = _error(client.post("/v1/search", json={"text": QUERY, "top": "3"}), 422, "invalid_request")
    assert "top: Input should be a valid integer" in message
    url = _error(client.post("/v1/search", json={"image": "https://example.com/a.jpg"}), 422, "url_not_fetched")
    assert "never fetches URLs" in url


def test_without_an_index_search_says_to_start_with_index(model_dir: Path) -> None:
    with TestClient(create_app(model_dir, SETTINGS)) as client:
        message = _error(client.post("/v1/search", files=_form(text=QUERY)), 404, "not_loaded")
        assert "no index is loaded; start the server with --index INDEX" in message
        assert "--index" in _error(client.get("/v1/index"), 404, "not_loaded")
        assert "--index" in _error(client.get(image_url("/etc/hostname")), 404, "not_loaded")


def test_search_is_admitted_and_limited_as_the_other_routes(app: FastAPI, client: TestClient) -> None:
    server = next(r.endpoint.__self__ for r in app.routes if getattr(r, "path", "") == "/v1/search")  # type: ignore[attr-defined]
    server.admission.pending = server.admission.capacity
    try:
        busy = client.post("/v1/search", files=_form(text=QUERY))
        assert "at capacity" in _error(busy, 503, "busy") and busy.headers["Retry-After"] == "1"
        assert _error(client.get(image_url("x")), 503, "busy")
    finally:
        server.admission.pending = 0
    big = Image.effect_noise((300, 300), 100).convert("RGB")
    buffer = io.BytesIO()
    big.save(buffer, "BMP")  # 270 KB, over the 200,000-byte limit
    too_large = client.post("/v1/search", files=_image_part(buffer.getvalue(), "big.bmp"))
    assert "exceeds this server's limit of 200000 bytes" in _error(too_large, 413, "upload_too_large")


# --- the images served --------------------------------------------------------------------------------------------


def test_a_hits_image_url_serves_its_thumbnail(client: TestClient, search_images: tuple[list[Path], list[str]]) -> None:
    hit = client.post("/v1/search", files=_form(text=QUERY, top="1")).json()["hits"][0]
    response = client.get(hit["image_url"])
    assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"
    thumbnail = Image.open(io.BytesIO(response.content))
    with Image.open(hit["key"]) as original:
        assert thumbnail.size == original.size and max(original.size) <= THUMBNAIL_PX  # 32 px: not enlarged


@pytest.mark.parametrize("where", ["outside", "traversal", "config"])
def test_a_path_that_is_not_indexed_is_refused(
    client: TestClient, image_index: Path, search_images: tuple[list[Path], list[str]], tmp_path: Path, where: str
) -> None:
    inside = search_images[0][0].resolve()
    Image.new("RGB", (8, 8)).save(tmp_path / "mine.png")
    path = {
        "outside": str(tmp_path / "mine.png"),
        "traversal": f"{inside.parent}/../images/{inside.name}",  # the same file, not the indexed key
        "config": str(image_index / "index.json"),
    }[where]
    assert Path(path).is_file()
    message = _error(client.get(image_url(path)), 404, "not_indexed")
    assert f"{path}: not an image of this server's index" in message


# --- a server of an index alone -----------------------------------------------------------------------------------


def test_a_server_of_an_index_alone(image_index: Path, direct: SearchIndex) -> None:
    with TestClient(create_app(None, SETTINGS, index_dir=image_index)) as client:
        hits = client.post("/v1/search", files=_form(text=QUERY)).json()["hits"]
        _assert_same_hits(hits, direct.search_text(QUERY))
        captions = client.post("/v1/captions", files=_files(RED))
        assert "start the server with --model-dir" in _error(captions, 404, "not_loaded")
        answers = client.post("/v1/answers", files=_form(_image_part(RED), question="what?"))
        assert "--vqa-model-dir" in _error(answers, 404, "not_loaded")
        assert "GET /v1/index describes the index" in _error(client.get("/v1/model"), 404, "not_loaded")
        info = client.get("/v1/index").json()
        assert (info["kind"], info["count"], info["index_kind"], info["model_id"]) == ("images", 8, "flat",
                                                                                       "tiny-retrieval")  # fmt: skip
        assert client.get("/health").json()["status"] == "ok"


def test_a_server_of_a_vqa_model_alone_answers_and_says_it_does_not_caption(
    model_dir: Path, client: TestClient
) -> None:
    question = _form(_image_part(RED), question="what colour is it?")
    expected = client.post("/v1/answers", files=question).json()["answer"]  # the same model as the caption model
    with TestClient(create_app(None, SETTINGS, vqa_model_dir=model_dir)) as alone:
        answers = alone.post("/v1/answers", files=question)
        assert answers.status_code == 200 and answers.json()["answer"] == expected
        captions = alone.post("/v1/captions", files=_files(RED))
        assert "no caption model is loaded; start the server with --model-dir" in _error(captions, 404, "not_loaded")
        assert "--index" in _error(alone.post("/v1/search", files=_form(text=QUERY)), 404, "not_loaded")


def test_nothing_to_serve_is_refused() -> None:
    with pytest.raises(CaptuneError, match="nothing to serve: give --model-dir"):
        create_app(None, SETTINGS)


def test_retrieval_model_dir_takes_a_copy_and_refuses_another_model(
    image_index: Path, direct: SearchIndex, tmp_path: Path
) -> None:
    save_retrieval(build_tiny_retrieval(), tmp_path / "copy")
    app = create_app(None, SETTINGS, index_dir=image_index, retrieval_model_dir=str(tmp_path / "copy"))
    with TestClient(app) as client:
        assert client.get("/v1/index").json()["retrieval_model"] == str(tmp_path / "copy")
        hits = client.post("/v1/search", files=_form(text=QUERY)).json()["hits"]
        _assert_same_hits(hits, direct.search_text(QUERY))
    save_retrieval(build_tiny_retrieval(seed=1), tmp_path / "other")
    with pytest.raises(CaptuneError, match=r"--index .*not comparable.*--retrieval-model-dir"):
        create_app(None, SETTINGS, index_dir=image_index, retrieval_model_dir=str(tmp_path / "other"))


def test_captune_serve_with_nothing_to_serve_says_what_to_give(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--port", str(_free_port()), "--device", "cpu"]) == 2
    assert "nothing to serve: give --model-dir (a caption model), --vqa-model-dir or --index" in capsys.readouterr().err


def test_captune_serve_index_flags_reach_the_server(
    image_index: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    given: dict[str, Any] = {}
    monkeypatch.setattr("captune.serve.run_server", lambda model_dir, **kwargs: given.update(kwargs, model=model_dir))
    for command in ("serve", "app"):
        argv = [command, "--index", str(image_index), "--retrieval-model-dir", str(tmp_path), "--port", "9"]
        assert main(argv) == 0
        assert (given["model"], given["index_dir"], given["retrieval_model_dir"]) == (None, str(image_index),
                                                                                      str(tmp_path))  # fmt: skip
        assert given["api"] == (command == "serve")
