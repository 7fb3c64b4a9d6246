"""Reading a request: every bad body, image or JSON gets the right status and a message naming it, and the
server stays healthy; property-based requests that never get a 500."""

from __future__ import annotations

import base64
import json
import os
import struct
import zlib
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st

from captune.serve import OPTION_NAMES

from ..conftest import write_truncated_jpeg
from .conftest import BLUE, RED, _assert_healthy, _error, _files

SERVER_STATUSES = {200, 400, 413, 415, 422}
"""What a request may get from a healthy, idle server: never 500, never 503."""


def _png_header(width: int, height: int) -> bytes:
    """A PNG that declares width x height and holds a few bytes of pixel data: decoding it would fail as truncated,
    so a 413 for it shows that the size was refused from the header, before decoding."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))


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
