"""The app's Search tab through `gradio_client`: its gallery (an images index) and its table (a captions index) hold
the API's hits for the same query, text or image; its errors are the API's sentences; without an index the tab says
how to load one and offers no search."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image

from .conftest import SETTINGS, _uvicorn_in_thread

QUERY = "a blue circle in the middle"


@pytest.fixture(scope="module")
def live(model_dir: Path, image_index: Path) -> Iterator[str]:
    with _uvicorn_in_thread(model_dir, SETTINGS, index_dir=image_index) as (url, _):
        yield url


def _api_hits(url: str, files: list[Any]) -> list[dict[str, Any]]:
    response = httpx2.post(f"{url}/v1/search", files=files)
    assert response.status_code == 200, response.text
    return list(response.json()["hits"])


def _labels(hits: list[dict[str, Any]]) -> list[str]:
    return [f"{h['score']:.4f} {Path(h['key']).name}" for h in hits]


def test_the_gallery_holds_the_apis_hits_for_a_text(live: str, tmp_path: Path) -> None:
    api = _api_hits(live, [("text", (None, QUERY)), ("top", (None, "3"))])
    client = Client(live, verbose=False, download_files=str(tmp_path))
    gallery, table, timing = client.predict(QUERY, None, 3, 0, api_name="/search")
    assert [item["caption"] for item in gallery] == _labels(api)
    sizes = [Image.open(item["image"]).size for item in gallery]
    assert sizes == [Image.open(h["key"]).size for h in api]  # each hit's own image (32 px: not resized)
    assert table["data"] in ([], [[]]) and timing.startswith("3 result(s) in ")


def test_the_gallery_holds_the_apis_hits_for_an_image(
    live: str, tmp_path: Path, search_images: tuple[list[Path], list[str]]
) -> None:
    query = search_images[0][3]
    api = _api_hits(live, [("image", (query.name, query.read_bytes(), "image/png")), ("top", (None, "4"))])
    client = Client(live, verbose=False, download_files=str(tmp_path))
    gallery = client.predict("", handle_file(str(query)), 4, 0, api_name="/search")[0]
    assert [item["caption"] for item in gallery] == _labels(api)
    assert api[0]["key"] == str(query.resolve())


def test_a_captions_index_is_a_table_of_the_apis_hits(
    model_dir: Path, caption_index: Path, search_images: tuple[list[Path], list[str]]
) -> None:
    query = search_images[0][1]
    with _uvicorn_in_thread(model_dir, SETTINGS, index_dir=caption_index) as (url, _):
        api = _api_hits(url, [("image", (query.name, query.read_bytes(), "image/png")), ("top", (None, "3"))])
        client = Client(url, verbose=False, download_files=False)
        gallery, table, _ = client.predict("", handle_file(str(query)), 3, 0, api_name="/search")
    assert gallery == [] or gallery is None
    assert [row[1:] for row in table["data"]] == [[h["key"], h["caption"]] for h in api]
    assert [row[0] for row in table["data"]] == pytest.approx([h["score"] for h in api])


@pytest.mark.parametrize(
    ("text", "with_image", "top", "message"),
    [
        (QUERY, True, 3, "give a text query (field `text`) or one image (field `image`), not both and not neither"),
        ("", False, 3, "not both and not neither"),
        (QUERY, False, 0, "top: Input should be greater than or equal to 1"),
    ],
)
def test_the_search_tab_says_what_is_wrong_in_a_sentence(
    live: str, search_images: tuple[list[Path], list[str]], text: str, with_image: bool, top: int, message: str
) -> None:
    client = Client(live, verbose=False, download_files=False)
    image = handle_file(str(search_images[0][0])) if with_image else None
    with pytest.raises(AppError) as raised:
        client.predict(text, image, top, 0, api_name="/search")
    assert message in str(raised.value) and "Traceback" not in str(raised.value)


def test_without_an_index_the_search_tab_says_how_to_load_one(model_dir: Path) -> None:
    with _uvicorn_in_thread(model_dir, SETTINGS) as (url, _):
        config = httpx2.get(f"{url}/config").json()
        client = Client(url, verbose=False, download_files=False)
        endpoints = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    notes = [c["props"].get("value", "") for c in config["components"] if c["props"].get("elem_id") == "search-note"]
    assert len(notes) == 1 and "start the server with `--index INDEX`" in notes[0]
    assert "/search" not in endpoints and "/caption" in endpoints
