"""The server's search (`POST /v1/search`, `GET /v1/search/image`, the app's Search tab): an index made by `captune
index`, opened with its retrieval model (`captune.search.SearchIndex`), searched on one worker thread of its own, and
the thumbnails of its images, served for the keys the index holds and for nothing else."""

from __future__ import annotations

import io
import logging
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from PIL import Image
from pydantic import BaseModel, ValidationError

from captune.data.images import ImageError, decode_size, load_rgb
from captune.errors import CaptuneError
from captune.search import Hit, SearchIndex
from captune.serve.errors import ApiError, _validation_message
from captune.serve.schemas import IndexInfo, SearchHit

log = logging.getLogger(__name__)

THUMBNAIL_PX = 256
"""Longest side of an indexed image as `GET /v1/search/image` serves it (and the Search tab shows it)."""
_THUMBNAIL_DRAFT_PX = 512
"""A large JPEG is decoded at a reduced scale that keeps at least this many pixels a side, then resized."""


@dataclass
class SearchQuery:
    """One validated query: a text, or an image, and how many results (`rerank`: how many re-scored)."""

    text: str | None
    image: Image.Image | None
    top: int
    rerank: int


@dataclass
class Searcher:
    """The server's index and its retrieval model; searches run one at a time on the worker thread (a tokenizer
    refuses two threads at once, and one model call at a time keeps the memory bounded)."""

    index: SearchIndex
    info: IndexInfo
    keys: frozenset[str]
    _worker: ThreadPoolExecutor | None = field(default=None, repr=False)

    def start(self) -> None:
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="captune-search")

    def close(self) -> None:
        """Finishes the searches queued, then stops the worker."""
        if self._worker is not None:
            self._worker.shutdown(wait=True)
            self._worker = None

    @property
    def decode_size(self) -> tuple[int, int] | None:
        return decode_size(self.index.loaded.image_processor)

    def submit(self, query: SearchQuery) -> Future[list[SearchHit]]:
        """Queues a search on the worker; its future gets the API's hits (or the search's `CaptuneError`)."""
        if self._worker is None:
            raise ApiError(503, "unavailable", "the search worker is not running (the server is starting or "
                           "stopping); retry in a moment", {"Retry-After": "1"})  # fmt: skip
        return self._worker.submit(self._search, query)

    def _search(self, query: SearchQuery) -> list[SearchHit]:
        if query.image is not None:
            found = self.index.search_image(query.image, query.top, rerank=query.rerank)
        else:
            found = self.index.search_text(query.text or "", query.top, rerank=query.rerank)
        return self._hits(found)

    def _hits(self, found: list[Hit]) -> list[SearchHit]:
        """The API's hits: an images index's with the URL of each image's thumbnail, a captions index's with each
        caption (the captions read from the index on the first search, on the worker)."""
        if self.index.kind == "captions":
            return [SearchHit(key=h.key, score=h.score, caption=self.index.caption(h.key), image_url=None)
                    for h in found]  # fmt: skip
        return [SearchHit(key=h.key, score=h.score, caption=None, image_url=image_url(h.key)) for h in found]

    def thumbnail(self, key: str) -> bytes:
        """The JPEG thumbnail of an indexed image, at most `THUMBNAIL_PX` a side.

        Raises:
            ApiError: 404 a key the index does not hold as an image (any other path is refused, never read), or an
                indexed file that can no longer be read.
        """
        if self.index.kind != "images":
            raise ApiError(404, "not_indexed", f"{key}: this server's index ({self.info.folder}) holds captions, "
                           "not images; there are no images to serve")  # fmt: skip
        if key not in self.keys:
            raise ApiError(404, "not_indexed", f"{key}: not an image of this server's index ({self.info.folder}); "
                           "only the images that /v1/search returns (their image_url) are served")  # fmt: skip
        try:
            image = load_rgb(Path(key), (_THUMBNAIL_DRAFT_PX, _THUMBNAIL_DRAFT_PX))
        except ImageError as err:
            raise ApiError(404, "image_gone", f"indexed, but it cannot be read now ({err}); index the folder again "
                           "with `captune index`") from None  # fmt: skip
        image.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=85)
        return buffer.getvalue()


def image_url(key: str) -> str:
    """Where the server serves an indexed image's thumbnail."""
    return f"/v1/search/image?key={quote(key, safe='')}"


def open_searcher(index_dir: Path, retrieval_model_dir: str | None, device: str) -> Searcher:
    """Opens the index with the retrieval model its manifest records (or `retrieval_model_dir`, the same weights
    saved elsewhere) on `device`.

    Raises:
        CaptuneError: not an index, or the model cannot be loaded or is not the one that made it.
    """
    try:
        index = SearchIndex.open(index_dir, model_dir=retrieval_model_dir, device=device)
    except CaptuneError as err:
        raise CaptuneError(
            f"--index {index_dir}: {err} (captune serve and app take the retrieval model as --retrieval-model-dir)"
        ) from None
    manifest = index.index.manifest
    info = IndexInfo(folder=str(index_dir), kind=index.kind, count=index.index.count,
                     index_kind=str(manifest.get("index_kind")), model_id=str(manifest["model_id"]),
                     retrieval_model=retrieval_model_dir or str(manifest["model_id"]))  # fmt: skip
    return Searcher(index=index, info=info, keys=frozenset(index.index.keys))


def search_query(given: dict[str, Any], with_image: bool, options_model: type[BaseModel]) -> SearchQuery:
    """A request's query: exactly one of `text` and an image (`with_image`: the request has one; the caller puts it
    in `image` once decoded), with `top` and `rerank` in the server's bounds.

    Raises:
        ApiError: 422 neither or both, an empty text, `top` or `rerank` out of range, an unknown field.
    """
    try:
        values = options_model.model_validate(given).model_dump()
    except ValidationError as err:
        raise ApiError(422, "invalid_query", _validation_message(err)) from None
    text = values["text"]
    if (text is not None) == with_image:
        raise ApiError(422, "invalid_query", "give a text query (field `text`) or one image (field `image`), not "
                       "both and not neither")  # fmt: skip
    if text is not None and not text.strip():
        raise ApiError(422, "invalid_query", "text: empty; give words to search for")
    return SearchQuery(text=text, image=None, top=values["top"], rerank=values["rerank"])
