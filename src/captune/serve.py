"""The caption server behind `captune serve`: a REST API and a web page over the one captioning path.

    captune serve --model-dir runs/blip2-opt-2.7b-flickr8k/best --port 8000

`create_app` loads the model once and returns a FastAPI app:

- `POST /v1/captions`: images as multipart uploads (field `images`, repeated) or JSON with base64 images, plus the
  generation options; answers the captions with timings. URLs are refused, never fetched.
- `GET /health`, `GET /v1/model` (base model, adapter, generation defaults, limits, metrics saved beside the model),
  `GET /openapi.json`, and the page at `/`.

How a request flows, and why each step is where it is:

0. Connections (`GuardedH11Protocol`, uvicorn's h11 protocol with limits): one beyond `max_connections`, or beyond
   `max_connections_per_client` from one address, gets 503 and is closed as it opens; a connection idle for
   `idle_timeout_s` is closed, and a request whose headers take over `header_timeout_s` gets 408, so that slow or
   idle clients cannot hold the server's file descriptors.
1. Admission: the request takes one slot of `max_queue` before its body is read, then one per image once they are
   counted; past the limit it gets 503 with Retry-After, so memory is bounded by the limits, not by the load.
2. The body is read through a counter that stops at `max_upload_bytes` (413), with or without a Content-Length,
   and within `body_timeout_s` (408).
3. Each image's header is checked against `max_image_pixels` before any pixel is decoded (413), then `load_rgb`
   decodes it with captune's checks; non-images get 415, damaged images 422, in a worker thread off the event loop.
4. The decoded images go to `MicroBatcher`: one thread that gathers queued requests up to `max_batch` images
   (waiting at most `max_wait_ms` after the first) and captions each group of identical options with one
   `generate_captions` call, so throughput rises with load.

Every error is JSON, `{"error": {"code": ..., "message": ...}}`, with a message that names the image, field or limit.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import math
import os
import queue
import signal
import socket
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Future
from contextlib import aclosing, asynccontextmanager, contextmanager
from dataclasses import asdict, dataclass, replace
from http import HTTPStatus
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar, cast

import anyio
import h11
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.types import Message
from uvicorn.protocols.http.h11_impl import H11Protocol

from captune.config import Config, GenerateConfig
from captune.data.images import ImageError, decode_size, load_rgb
from captune.errors import CaptuneError
from captune.generation.choice import choose, facts_of, log_choice
from captune.generation.core import filled, filled_size, generate_captions
from captune.model import LoadedModel
from captune.model_dir import META_FILE, load_model_dir, saved_config

log = logging.getLogger(__name__)

MAX_REPETITION_PENALTY = 5.0
"""Highest `repetition_penalty` a request may ask for (1.0 is none)."""
GRACEFUL_SHUTDOWN_S = 60
"""How long `run_server` lets requests in flight finish after SIGTERM or Ctrl-C before cancelling them."""
DECODE_THREADS = min(8, os.cpu_count() or 1)
"""Images decoded at once; more threads than cores decode no faster and each holds a malloc arena of its own."""
OPTION_NAMES = ("num_beams", "min_new_tokens", "max_new_tokens", "repetition_penalty")
# What Pillow raises for a damaged header; load_rgb opens the image again and names the problem.
_DAMAGED_HEADER = (OSError, SyntaxError, ValueError, EOFError)
_PAGE_CSP = "default-src 'self'; img-src 'self' blob:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"


@dataclass
class ServeSettings:
    """The server's limits and batching; `captune serve` sets each with the flag of the same name."""

    device: str = "auto"
    """Where the model runs: `auto` (the first GPU if there is one), `cpu`, `cuda`, `cuda:N`."""
    merge_adapter: bool = False
    """Merge the LoRA adapter into the base weights at load (`load_model_dir(merge=True)`)."""
    max_upload_bytes: int = 20 * 1024 * 1024
    """Largest request body; a larger one gets 413 as soon as the limit is passed (or from its Content-Length)."""
    max_images: int = 16
    """Images in one request (422 beyond)."""
    max_image_pixels: int = 40_000_000
    """Largest width x height of one image, checked from its header before decoding (413 beyond); at most
    `PIL.Image.MAX_IMAGE_PIXELS`, which `load_rgb` enforces."""
    max_new_tokens: int = 100
    """Highest `max_new_tokens` and `min_new_tokens` a request may ask for."""
    max_num_beams: int = 10
    """Widest beam a request may ask for."""
    max_batch: int = 16
    """Images per generate call."""
    max_wait_ms: float = 10.0
    """How long the generation worker waits after the first queued image for more, to fill a batch."""
    max_queue: int = 64
    """Images admitted at once (being read, decoded, queued or captioned); beyond it 503 with Retry-After. Decoded
    images take at most `max_queue * max_image_pixels * 3` bytes."""
    retry_after_s: int = 1
    """The Retry-After header of a 503, in seconds."""
    idle_timeout_s: float = 5.0
    """A connection with no request under way (just opened, or kept alive after an answer) is closed after this
    long without a byte (uvicorn's keep-alive timeout, which captune also starts when a connection opens)."""
    header_timeout_s: float = 10.0
    """A request's line and headers must all have come this long after its first byte, else 408 and the connection
    closed: a client sending a byte at a time cannot hold a connection open."""
    body_timeout_s: float = 60.0
    """A request's body must all have come this long after its headers, else 408 and the connection closed; a
    full 20 MiB body in 60 s is 2.8 Mbit/s: raise it for clients on slower links."""
    max_connections: int = 256
    """Open connections in all; a connection beyond it gets 503 (with Retry-After) and is closed at once, before its
    request is read. Each takes a file descriptor (the usual limit is 1,024 a process)."""
    max_connections_per_client: int = 32
    """Open connections from one IP address; beyond it as `max_connections`, so one client cannot take them all.
    Behind a proxy every request comes from the proxy's address: set it to `max_connections` there."""
    warm_up: bool = False
    """With a model whose generate settings use a static cache: before accepting requests, caption a blank image at
    every batch size the server compiles (`static_batch_sizes`) with those settings, so that no request waits for a
    compilation (about a minute per size on an H100 for the first: the decode step, and the image side up to batch
    32). Requests with other options still compile their own on first use."""


def check_settings(settings: ServeSettings) -> None:
    """Refuses settings no server can run with, naming the flag."""
    pil_limit = Image.MAX_IMAGE_PIXELS
    checks = [
        (settings.max_upload_bytes >= 1, "--max-upload-bytes must be >= 1"),
        (settings.max_images >= 1, "--max-images must be >= 1"),
        (settings.max_image_pixels >= 1, "--max-image-pixels must be >= 1"),
        (
            pil_limit is None or settings.max_image_pixels <= pil_limit,
            f"--max-image-pixels must be <= PIL.Image.MAX_IMAGE_PIXELS ({pil_limit}), which every image load enforces",
        ),
        (settings.max_new_tokens >= 1, "--max-new-tokens must be >= 1"),
        (settings.max_num_beams >= 1, "--max-num-beams must be >= 1"),
        (settings.max_batch >= 1, "--max-batch must be >= 1"),
        (settings.max_wait_ms >= 0, "--max-wait-ms must be >= 0"),
        (settings.max_queue >= settings.max_images, "--max-queue must be >= --max-images (a request must fit)"),
        (settings.retry_after_s >= 1, "--retry-after-s must be >= 1"),
        *[
            (
                0 < getattr(settings, f"{kind}_timeout_s") < math.inf,
                f"--{kind}-timeout-s must be a number of seconds > 0",
            )
            for kind in ("idle", "header", "body")
        ],
        (settings.max_connections >= 1, "--max-connections must be >= 1"),
        (
            1 <= settings.max_connections_per_client <= settings.max_connections,
            "--max-connections-per-client must be from 1 to --max-connections",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise CaptuneError(f"invalid server settings: {message}")


# ------------------------------------------------------------------------------------------------------ schemas ---
class GenerationOptions(BaseModel):
    """The generation options a caption was made with (the model's defaults where the request gave none)."""

    num_beams: int
    min_new_tokens: int
    max_new_tokens: int
    repetition_penalty: float


class ImageCaption(BaseModel):
    index: int = Field(description="position of the image in the request, from 0")
    filename: str | None = Field(description="the upload's file name (multipart), else null")
    caption: str


class Timing(BaseModel):
    decode_ms: float = Field(description="reading and decoding this request's images")
    queue_ms: float = Field(description="waiting for the generation worker")
    generate_ms: float = Field(description="the generate call(s) that captioned these images")
    total_ms: float = Field(description="from the request's arrival to its answer")
    batch_images: int = Field(description="images in the generate call, other requests' included")


class CaptionResponse(BaseModel):
    captions: list[ImageCaption]
    options: GenerationOptions
    timing: Timing


class ErrorDetail(BaseModel):
    code: str = Field(description="machine-readable, e.g. not_an_image, upload_too_large, invalid_options, busy")
    message: str = Field(description="what went wrong and what to do, naming the image, field or limit")


class ErrorResponse(BaseModel):
    error: ErrorDetail


class Health(BaseModel):
    status: str = Field(description="`ok`, or `unavailable` when the generation worker is not running")
    pending_images: int = Field(description="images admitted now (read, decoded, queued or being captioned)")
    max_queue: int


class AdapterInfo(BaseModel):
    type: str
    r: int | None
    alpha: float | None
    target_modules: str | list[str] | None


class ModelInfo(BaseModel):
    model_dir: str
    base_model: str = Field(description="the base the model was fine-tuned from (hub id, directory or `tiny`)")
    adapter: AdapterInfo | None = Field(description="the LoRA adapter, or null for a plain BLIP-2")
    device: str
    dtype: str
    prompt: str = Field(description="text every caption continues (the training prompt)")
    generation_defaults: GenerationOptions = Field(description="options used where a request gives none")
    limits: ServeSettings
    metrics: dict[str, dict[str, float]] = Field(
        description="metrics files saved with the model (metrics.json, eval-SPLIT/metrics.json), by relative path"
    )


def _options_model(settings: ServeSettings) -> type[BaseModel]:
    """The request's generation options, with this server's limits (so the OpenAPI document shows them)."""
    return create_model(
        "CaptionOptions",
        __config__=ConfigDict(extra="forbid"),
        num_beams=(int | None, Field(None, ge=1, le=settings.max_num_beams, description="beam width; 1 is greedy")),
        min_new_tokens=(int | None, Field(None, ge=0, le=settings.max_new_tokens, description="shortest caption")),
        max_new_tokens=(int | None, Field(None, ge=1, le=settings.max_new_tokens, description="longest caption")),
        repetition_penalty=(
            float | None,
            Field(None, ge=1.0, le=MAX_REPETITION_PENALTY, allow_inf_nan=False, description="1.0 is no penalty"),
        ),
    )


def _json_request_model(options: type[BaseModel], settings: ServeSettings) -> type[BaseModel]:
    images = Field(
        min_length=1,
        description=f"1 to {settings.max_images} images, each base64 (a `data:image/...;base64,` prefix is allowed); "
        "URLs are refused, never fetched",
    )
    return create_model("CaptionJsonRequest", __base__=options, images=(list[str], images))


def _request_body(options: type[BaseModel], json_request: type[BaseModel], settings: ServeSettings) -> dict[str, Any]:
    """The OpenAPI requestBody of POST /v1/captions: one route, two content types."""
    images = {
        "type": "array",
        "items": {"type": "string", "format": "binary"},
        "description": f"1 to {settings.max_images} image files (repeat the field)",
    }
    multipart = {
        "type": "object",
        "required": ["images"],
        "properties": {"images": images, **options.model_json_schema()["properties"]},
    }
    content = {
        "multipart/form-data": {"schema": multipart},
        "application/json": {"schema": json_request.model_json_schema()},
    }
    return {"requestBody": {"required": True, "content": content}}


# ------------------------------------------------------------------------------------------------------- errors ---
class ApiError(Exception):
    """An answer other than 200: status, a code and a message a user can act on."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers


def _error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    body = ErrorResponse(error=ErrorDetail(code=code, message=message))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def _install_error_handlers(app: FastAPI) -> None:
    async def api_error(_: Request, exc: Exception) -> JSONResponse:
        err = cast(ApiError, exc)
        return _error_response(err.status, err.code, err.message, err.headers)

    async def http_error(_: Request, exc: Exception) -> JSONResponse:
        err = cast(HTTPException, exc)
        return _error_response(err.status_code, f"http_{err.status_code}", str(err.detail), dict(err.headers or {}))

    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.error("unexpected error", exc_info=exc)
        return _error_response(500, "internal_error", "internal server error; the server log has the details")

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(Exception, unexpected)


def _validation_message(err: ValidationError) -> str:
    """`num_beams: Input should be less than or equal to 10; ...` without pydantic's URLs."""
    return "; ".join(f"{'.'.join(str(part) for part in e['loc']) or 'body'}: {e['msg']}" for e in err.errors())


# ---------------------------------------------------------------------------------------------------- admission ---
class Admission:
    """Counts the images admitted (one slot per request before its images are counted); used on the event loop
    thread only, so it needs no lock."""

    def __init__(self, capacity: int, retry_after_s: int) -> None:
        self.capacity, self.retry_after_s, self.pending = capacity, retry_after_s, 0

    @contextmanager
    def slot(self) -> Iterator[Callable[[int], None]]:
        """Takes one slot for the request; yields `take(n)` for n more; gives them all back at the end."""
        taken = 0

        def take(count: int) -> None:
            nonlocal taken
            if self.pending + count > self.capacity:
                raise ApiError(
                    503,
                    "busy",
                    f"the server is at capacity ({self.capacity} images queued or being captioned); retry after "
                    f"{self.retry_after_s} s",
                    {"Retry-After": str(self.retry_after_s)},
                )
            self.pending += count
            taken += count

        take(1)
        try:
            yield take
        finally:
            self.pending -= taken


# ------------------------------------------------------------------------------------------------- the batcher ---
GenerateFn = Callable[[list[Image.Image], GenerateConfig], list[str]]


@dataclass
class JobResult:
    """A request's captions and what the batcher measured for it."""

    captions: list[str]
    queue_s: float
    generate_s: float
    batch_images: int


@dataclass
class _Job:
    images: list[Image.Image]
    options: GenerateConfig
    future: Future[JobResult]
    queued_at: float


def _options_key(options: GenerateConfig) -> tuple[int, int, int, float]:
    return options.num_beams, options.min_new_tokens, options.max_new_tokens, options.repetition_penalty


class MicroBatcher:
    """One worker thread that captions queued requests in batches.

    The worker takes the first queued request, then more until `max_batch` images are gathered or `max_wait_s` has
    passed since the first; requests with identical options are captioned by one `generate` call (several when they
    hold more than `max_batch` images). Under load the queue refills while a batch runs, so batches fill at once.
    A failed generate call fails only its requests.
    """

    def __init__(self, generate: GenerateFn, max_batch: int, max_wait_s: float) -> None:
        self.generate, self.max_batch, self.max_wait_s = generate, max_batch, max_wait_s
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._accepting = False

    @property
    def alive(self) -> bool:
        return self._accepting and self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="captune-generate", daemon=True)
        self._thread.start()
        self._accepting = True

    def submit(self, images: list[Image.Image], options: GenerateConfig) -> Future[JobResult]:
        """Queues one request's images; its future gets the captions in order."""
        if not self.alive:
            raise ApiError(503, "unavailable", "the generation worker is not running (the server is starting or "
                           "stopping); retry in a moment", {"Retry-After": "1"})  # fmt: skip
        future: Future[JobResult] = Future()
        self._queue.put(_Job(images, options, future, time.monotonic()))
        return future

    def close(self) -> None:
        """Captions what is queued, then stops the worker."""
        self._accepting = False
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()

    def _run(self) -> None:
        stop = False
        while not stop:
            jobs, stop = self._gather()
            groups: dict[tuple[int, int, int, float], list[_Job]] = {}
            for job in jobs:
                if job.future.set_running_or_notify_cancel():
                    groups.setdefault(_options_key(job.options), []).append(job)
            for group in groups.values():
                self._caption(group)

    def _gather(self) -> tuple[list[_Job], bool]:
        """The next batch of jobs, and whether the stop marker came."""
        first = self._queue.get()
        if first is None:
            return [], True
        jobs, count = [first], len(first.images)
        deadline = time.monotonic() + self.max_wait_s
        while count < self.max_batch:
            try:
                job = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if job is None:
                return jobs, True
            jobs.append(job)
            count += len(job.images)
        return jobs, False

    def _caption(self, group: list[_Job]) -> None:
        images = [image for job in group for image in job.images]
        chunks = [images[start : start + self.max_batch] for start in range(0, len(images), self.max_batch)]
        started = time.monotonic()
        try:
            captions = [caption for chunk in chunks for caption in self.generate(chunk, group[0].options)]
        except Exception as exc:  # a failed batch fails its requests, never the worker
            log.exception("generate failed for %d image(s)", len(images))
            for job in group:
                job.future.set_exception(exc)
            return
        elapsed = time.monotonic() - started
        offset = 0
        for job in group:
            count = len(job.images)
            batch = len(chunks[offset // self.max_batch])
            job.future.set_result(JobResult(captions[offset : offset + count], started - job.queued_at, elapsed, batch))
            offset += count


# ------------------------------------------------------------------------------------------------------- images ---
@dataclass
class Upload:
    """One image of a request, as received."""

    name: str
    """The upload's file name, or `image N` for JSON, as error messages name it."""
    data: bytes
    filename: str | None


class _NamedBytes(io.BytesIO):
    """An upload that `load_rgb` opens like a file (Pillow reads file objects); its messages format the path with
    str(), which gives the upload's name."""

    def __init__(self, data: bytes, name: str) -> None:
        super().__init__(data)
        self.label = name

    def __str__(self) -> str:
        return self.label


def decode_upload(upload: Upload, max_pixels: int, min_size: tuple[int, int] | None = None) -> Image.Image:
    """Decodes one uploaded image with `load_rgb`'s checks (and its `min_size`), after refusing from its header what
    is too large.

    Raises:
        ApiError: 415 not an image, 413 more than `max_pixels` pixels (before decoding), 422 damaged or unusable.
    """
    try:
        with Image.open(io.BytesIO(upload.data)) as probe:
            width, height = probe.size
    except UnidentifiedImageError:
        raise ApiError(415, "not_an_image", f"{upload.name}: not an image Pillow can read; send JPEG, PNG, WebP, "
                       "GIF, BMP or TIFF") from None  # fmt: skip
    except Image.DecompressionBombError as exc:
        raise ApiError(413, "image_too_large", f"{upload.name}: decompression bomb: {exc}") from None
    except _DAMAGED_HEADER:
        width = height = 0  # load_rgb below fails on it with the reason
    if width * height > max_pixels:
        raise ApiError(
            413,
            "image_too_large",
            f"{upload.name}: {width}x{height} = {width * height} pixels exceeds this server's limit of {max_pixels} "
            "(--max-image-pixels); send a smaller image",
        )
    try:
        # load_rgb takes a path; a named file object goes through the same checks (see the report of issue 8).
        return load_rgb(cast(Path, _NamedBytes(upload.data, upload.name)), min_size)
    except ImageError as err:
        raise ApiError(422, "bad_image", str(err)) from None


def _image_bytes(text: str, index: int) -> bytes:
    """The bytes of one base64 image of a JSON request; URLs are refused, never fetched."""
    text = text.strip()
    if text.lower().startswith(("http:", "https:", "ftp:", "file:", "//")):
        raise ApiError(422, "url_not_fetched", f"images.{index}: this server never fetches URLs; send the image "
                       "bytes base64-encoded")  # fmt: skip
    if text.startswith("data:"):
        header, _, text = text.partition(",")
        if not header.endswith(";base64"):
            raise ApiError(
                422, "invalid_base64", f"images.{index}: a data URL must be base64 (data:image/png;base64,...)"
            )
    try:
        return base64.b64decode(text, validate=True)
    except ValueError as exc:  # binascii.Error, or characters outside ASCII
        raise ApiError(422, "invalid_base64", f"images.{index}: not valid base64 ({exc})") from None


# ------------------------------------------------------------------------------------------------ request body ---
def _limited(request: Request, limit: int, timeout_s: float) -> Request:
    """The same request whose body reading fails with 413 once more than `limit` bytes have come, and with 408 once
    `timeout_s` have passed (the body read as a whole, so that a byte now and then does not keep it going)."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise _too_large(limit)
    received, deadline = 0, time.monotonic() + timeout_s

    async def receive() -> Message:
        nonlocal received
        try:
            with anyio.fail_after(deadline - time.monotonic()):
                message = await request.receive()
        except TimeoutError:
            raise ApiError(408, "body_timeout", f"the request body did not all come within {timeout_s:g} s "
                           "(--body-timeout-s); send it at once", {"Connection": "close"}) from None  # fmt: skip
        received += len(message.get("body", b""))
        if received > limit:
            raise _too_large(limit)
        return message

    return Request(request.scope, receive)


def _too_large(limit: int) -> ApiError:
    return ApiError(413, "upload_too_large", f"the request body exceeds this server's limit of {limit} bytes "
                    f"({limit / 2**20:.1f} MiB, --max-upload-bytes); send fewer or smaller images")  # fmt: skip


class _WholeMultiPartParser(MultiPartParser):
    """Starlette's parser, noting whether the closing delimiter came: without it a body cut off in transit would
    give the parts before the cut as if they were all (python-multipart's `finalize` does not check)."""

    ended = False

    def on_end(self) -> None:
        self.ended = True


async def _read_form(request: Request) -> FormData:
    """The multipart form, or 400 for a malformed or cut-off body."""
    try:
        async with aclosing(request.stream()) as stream:
            parser = _WholeMultiPartParser(request.headers, stream)
            form = await parser.parse()
    except MultiPartException as exc:
        raise ApiError(400, "invalid_multipart", f"malformed multipart body: {exc.message}") from None
    if not parser.ended:
        await form.close()
        raise ApiError(400, "invalid_multipart", "the multipart body ends before its closing boundary: it was cut "
                       "off (or its Content-Length is short); send the whole body")  # fmt: skip
    return form


async def _read_multipart(request: Request) -> tuple[list[Upload], dict[str, Any]]:
    form = await _read_form(request)
    try:
        uploads: list[Upload] = []
        options: dict[str, Any] = {}
        for key, value in form.multi_items():
            if key == "images":
                if not isinstance(value, UploadFile):
                    raise ApiError(422, "invalid_request", "images: must be file parts (curl -F images=@photo.jpg)")
                name = (value.filename or f"image {len(uploads)}")[:200]
                uploads.append(Upload(name, await value.read(), value.filename))
            elif key in options:
                raise ApiError(422, "invalid_options", f"{key}: given more than once")
            else:
                options[key] = value if isinstance(value, str) else None
        return uploads, options
    finally:
        await form.close()


async def _read_json(request: Request, json_request: type[BaseModel]) -> tuple[list[Upload], dict[str, Any]]:
    try:
        payload = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(422, "invalid_json", f"the body is not valid JSON: {exc}") from None
    except RecursionError:  # the parser recurses per level: ~1,000 levels exhaust Python's stack limit
        raise ApiError(422, "invalid_json", "the body's JSON is nested too deeply to read; a request is one flat "
                       'object ({"images": [base64, ...], "num_beams": 3, ...})') from None  # fmt: skip
    try:
        # Strict: JSON says what a value is, so `true` or "3" for an integer is a mistake, not a 1 or a 3.
        parsed = json_request.model_validate(payload, strict=True)
    except ValidationError as err:
        raise ApiError(422, "invalid_request", _validation_message(err)) from None
    values = parsed.model_dump()
    images = values.pop("images")
    return [Upload(f"image {i}", _image_bytes(text, i), None) for i, text in enumerate(images)], values


# -------------------------------------------------------------------------------------------------------- model ---
def _saved_metrics(model_dir: Path) -> dict[str, dict[str, float]]:
    """metrics.json (training's best/) and eval-*/metrics.json (`captune eval`) beside the model, by relative path."""
    found: dict[str, dict[str, float]] = {}
    for path in [model_dir / "metrics.json", *sorted(model_dir.glob("eval-*/metrics.json"))]:
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            log.warning("%s: not valid JSON (%s); /v1/model leaves it out", path, err)
            continue
        if not isinstance(data, dict) or not all(isinstance(v, int | float) for v in data.values()):
            log.warning("%s: not a flat object of metric values; /v1/model leaves it out", path)
            continue
        found[str(path.relative_to(model_dir))] = {name: float(value) for name, value in data.items()}
    return found


def _adapter_info(model: Any) -> AdapterInfo | None:
    peft_config = getattr(model, "peft_config", None)
    if not peft_config:
        return None
    adapter = next(iter(peft_config.values()))
    targets = adapter.target_modules
    return AdapterInfo(
        type=str(getattr(adapter.peft_type, "value", adapter.peft_type)),
        r=getattr(adapter, "r", None),
        alpha=getattr(adapter, "lora_alpha", None),
        target_modules=sorted(targets) if isinstance(targets, set | list) else targets,
    )


def _model_info(model_dir: Path, loaded: LoadedModel, config: Config, settings: ServeSettings) -> ModelInfo:
    parameter = next(loaded.model.parameters())
    base = config.model.name if (model_dir / META_FILE).is_file() else loaded.base_name
    return ModelInfo(
        model_dir=str(model_dir),
        base_model=base,
        adapter=_adapter_info(loaded.model),
        device=str(parameter.device),
        dtype=str(parameter.dtype).removeprefix("torch."),
        prompt=config.data.prompt,
        generation_defaults=GenerationOptions(**_options_dict(config.generate)),
        limits=settings,
        metrics=_saved_metrics(model_dir),
    )


def _options_dict(options: GenerateConfig) -> dict[str, Any]:
    return {name: getattr(options, name) for name in OPTION_NAMES}


def _resolve_options(defaults: GenerateConfig, given: dict[str, Any], options_model: type[BaseModel]) -> GenerateConfig:
    """The model's defaults with the request's options on top, validated against the server's limits."""
    try:
        values = options_model.model_validate(given).model_dump()
    except ValidationError as err:
        raise ApiError(422, "invalid_options", _validation_message(err)) from None
    options = replace(defaults, **{name: value for name, value in values.items() if value is not None})
    if options.min_new_tokens > options.max_new_tokens:
        raise ApiError(
            422,
            "invalid_options",
            f"min_new_tokens {options.min_new_tokens} is above max_new_tokens {options.max_new_tokens} (the model's "
            f"defaults are {defaults.min_new_tokens}-{defaults.max_new_tokens}); give both or a consistent one",
        )
    return options


def _check_defaults(defaults: GenerateConfig, options_model: type[BaseModel], model_dir: Path) -> None:
    """A model whose own generation settings break the server's limits is refused at start, not per request."""
    try:
        options_model.model_validate(_options_dict(defaults))
    except ValidationError as err:
        raise CaptuneError(
            f"{model_dir}: the model's generation defaults break this server's limits ({_validation_message(err)}); "
            "raise --max-num-beams or --max-new-tokens"
        ) from None


async def _read_request(
    request: Request, settings: ServeSettings, json_request: type[BaseModel]
) -> tuple[list[Upload], dict[str, Any]]:
    """The uploads and the raw options of a multipart or JSON request, its body limited to `max_upload_bytes`."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    limited = _limited(request, settings.max_upload_bytes, settings.body_timeout_s)
    if content_type == "multipart/form-data":
        return await _read_multipart(limited)
    if content_type == "application/json":
        return await _read_json(limited, json_request)
    raise ApiError(415, "unsupported_media_type", f"content type {content_type or '(none)'!r}: send "
                   "multipart/form-data (field `images`) or application/json")  # fmt: skip


# ---------------------------------------------------------------------------------------------------------- app ---
_ERROR_STATUSES = {
    400: "malformed or cut-off multipart body",
    408: "the body did not all come within --body-timeout-s (the headers: --header-timeout-s)",
    413: "body over --max-upload-bytes, or an image over --max-image-pixels (refused from its header)",
    415: "a part that is not an image, or a body that is neither multipart/form-data nor JSON",
    422: "invalid options, JSON or base64; damaged image; no images or more than --max-images; a URL",
    500: "the generate call failed",
    503: "at capacity (--max-queue), over --max-connections or --max-connections-per-client, or stopping; see "
    "Retry-After",
}


@dataclass
class _Server:
    """What the routes share: the model's config, the limits, the request schemas, admission and the batcher."""

    model_dir: Path
    config: Config
    settings: ServeSettings
    options_model: type[BaseModel]
    json_request: type[BaseModel]
    info: ModelInfo
    batcher: MicroBatcher
    admission: Admission
    page: str
    decode_size: tuple[int, int] | None = None
    """`load_rgb`'s min_size for uploads (large JPEGs decode at a reduced scale the image processor still resizes)."""
    decode_limiter: anyio.CapacityLimiter | None = None
    """Made by `lifespan`, on the server's event loop."""

    @asynccontextmanager
    async def lifespan(self, _: FastAPI) -> AsyncIterator[None]:
        self.decode_limiter = anyio.CapacityLimiter(DECODE_THREADS)
        self.batcher.start()
        if self.settings.warm_up and self.config.generate.static_cache:
            await self._warm_up()
        log.info("captioning with %s on %s; limits %s", self.model_dir, self.info.device, asdict(self.settings))
        try:
            yield
        finally:
            await run_in_threadpool(self.batcher.close)

    async def _warm_up(self) -> None:
        """Captions a blank image at every static-cache batch size, on the generation worker (compiled CUDA graphs
        belong to the thread that records them), before the server takes requests."""
        sizes = static_batch_sizes(self.settings.max_batch)
        log.info("warming up: compiling generation for batch sizes %s (--warm-up)", sizes)
        blank = Image.new("RGB", (64, 64))  # resized like any upload
        for size in sizes:
            started = time.monotonic()
            await asyncio.wrap_future(self.batcher.submit([blank] * size, self.config.generate))
            log.info("warm-up: batch %d ready in %.1f s", size, time.monotonic() - started)

    async def captions(self, request: Request) -> CaptionResponse:
        """Captions 1 to `max_images` images: multipart uploads (field `images`) or JSON `{"images": [base64]}`,
        with optional `num_beams`, `min_new_tokens`, `max_new_tokens`, `repetition_penalty`."""
        arrived, limits = time.monotonic(), self.settings
        with self.admission.slot() as take:
            uploads, given = await _read_request(request, limits, self.json_request)
            if not uploads:
                raise ApiError(422, "no_images", "no images: send at least one (multipart field `images`, or JSON "
                               "`images`: [base64])")  # fmt: skip
            if len(uploads) > limits.max_images:
                raise ApiError(422, "too_many_images", f"{len(uploads)} images in one request; this server takes at "
                               f"most {limits.max_images} (--max-images)")  # fmt: skip
            options = _resolve_options(self.config.generate, given, self.options_model)
            take(len(uploads) - 1)
            images = await anyio.to_thread.run_sync(
                lambda: [decode_upload(u, limits.max_image_pixels, self.decode_size) for u in uploads],
                limiter=self.decode_limiter,
            )
            decoded = time.monotonic()
            try:
                result = await asyncio.wrap_future(self.batcher.submit(images, options))
            except Exception as exc:  # the generate call failed; the log has its traceback
                raise ApiError(500, "generation_failed", f"captioning failed ({type(exc).__name__}); the server log "
                               "has the details") from None  # fmt: skip
        captions = zip(uploads, result.captions, strict=True)
        return CaptionResponse(
            captions=[ImageCaption(index=i, filename=u.filename, caption=c) for i, (u, c) in enumerate(captions)],
            options=GenerationOptions(**_options_dict(options)),
            timing=Timing(
                decode_ms=1000 * (decoded - arrived),
                queue_ms=1000 * result.queue_s,
                generate_ms=1000 * result.generate_s,
                total_ms=1000 * (time.monotonic() - arrived),
                batch_images=result.batch_images,
            ),
        )

    async def health(self) -> Health | JSONResponse:
        """`ok` while the generation worker runs, else 503."""
        state = Health(status="ok" if self.batcher.alive else "unavailable", pending_images=self.admission.pending,
                       max_queue=self.settings.max_queue)  # fmt: skip
        return state if self.batcher.alive else JSONResponse(state.model_dump(), status_code=503)

    async def model(self) -> ModelInfo:
        """The model, its adapter, generation defaults, this server's limits and the metrics saved with it."""
        return self.info

    async def index(self) -> HTMLResponse:
        return HTMLResponse(self.page, headers={"Content-Security-Policy": _PAGE_CSP})


def static_batch_sizes(max_batch: int) -> list[int]:
    """Every batch size a static-cache server compiles for: the powers of two below `max_batch`, and `max_batch`."""
    return sorted({filled_size(count, max_batch, powers_of_two=True) for count in range(1, max_batch + 1)})


def create_app(model_dir: str | Path, settings: ServeSettings | None = None) -> FastAPI:
    """Loads the model once and returns the caption server's app; its lifespan starts and stops the batcher.

    Args:
        model_dir: What `captune caption --model-dir` takes: RUN/best, RUN/final, a checkpoint, or a plain BLIP-2.
        settings: Limits and batching; the defaults of `ServeSettings` when None.

    Raises:
        CaptuneError: invalid settings, or a model that cannot be loaded.
    """
    settings = settings or ServeSettings()
    check_settings(settings)
    model_dir = Path(model_dir).expanduser()
    config = saved_config(model_dir)
    options_model = _options_model(settings)
    _check_defaults(config.generate, options_model, model_dir)
    loaded = load_model_dir(model_dir, device=settings.device, merge=settings.merge_adapter)
    # The path for every request, decided once (a server is an open-ended run); its batches are the micro-batcher's.
    facts = facts_of(loaded.model, config.generate)
    decided = choose(replace(config.generate, batch_size=settings.max_batch), facts, None)
    log_choice(decided)
    config.generate = decided.options

    def generate(images: list[Image.Image], options: GenerateConfig) -> list[str]:
        count = len(images)
        if options.static_cache:  # a compiled step per batch size: fill up to a power of two (few compilations)
            images = filled(images, filled_size(count, settings.max_batch, powers_of_two=True))
        return generate_captions(loaded.model, loaded.processor, images, options, config.data.prompt)[:count]

    server = _Server(
        model_dir=model_dir,
        config=config,
        settings=settings,
        options_model=options_model,
        json_request=_json_request_model(options_model, settings),
        info=_model_info(model_dir, loaded, config, settings),
        batcher=MicroBatcher(generate, settings.max_batch, settings.max_wait_ms / 1000),
        admission=Admission(settings.max_queue, settings.retry_after_s),
        page=(resources.files("captune") / "static" / "serve.html").read_text(encoding="utf-8"),
        decode_size=decode_size(loaded.processor.image_processor),
    )
    # Swagger UI and ReDoc load their scripts from a CDN: off, so that nothing the server sends reaches outside.
    app = FastAPI(title="captune caption server", summary="Captions images with a fine-tuned BLIP-2", version="1",
                  lifespan=server.lifespan, docs_url=None, redoc_url=None)  # fmt: skip
    _install_error_handlers(app)
    errors: dict[int | str, dict[str, Any]] = {
        status: {"model": ErrorResponse, "description": why} for status, why in _ERROR_STATUSES.items()
    }
    app.add_api_route("/v1/captions", server.captions, methods=["POST"], response_model=CaptionResponse,
                      summary="Caption images", responses=errors,
                      openapi_extra=_request_body(options_model, server.json_request, settings))  # fmt: skip
    app.add_api_route("/health", server.health, response_model=Health, responses={503: {"model": Health}})
    app.add_api_route("/v1/model", server.model, response_model=ModelInfo, summary="Model information")
    app.add_api_route("/", server.index, response_class=HTMLResponse, include_in_schema=False)
    return app


# -------------------------------------------------------------------------------------------------- connections ---
def _raw_error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> bytes:
    """A whole error answer in the API's JSON shape, for the protocol to write where no request (or no app) is
    there to answer: the connection is closed after it."""
    body = ErrorResponse(error=ErrorDetail(code=code, message=message)).model_dump_json().encode()
    fields = {"content-type": "application/json", "content-length": str(len(body)), "connection": "close"}
    lines = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}"]
    lines += [f"{name}: {value}" for name, value in (fields | (headers or {})).items()]
    return "\r\n".join(lines).encode() + b"\r\n\r\n" + body


class GuardedH11Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with the limits it leaves out, so that no client can hold the server's
    connections (`guarded_protocol` makes one class per server, with its settings and per-client counts):

    - connection limits, checked as a connection opens, in all (`max_connections`) and per client IP
      (`max_connections_per_client`): beyond them 503 and closed at once. uvicorn's `limit_concurrency` refuses only
      once a request's headers have come, in plain text, and counts no client.
    - the idle timeout (`idle_timeout_s`) from the moment a connection opens: uvicorn starts its keep-alive timer
      only after an answer, so a connection that never sends a byte stayed open for good.
    - a header timeout (`header_timeout_s`): from the first byte of a request to the end of its headers, 408 and
      closed beyond. The body's timeout is the app's (`_limited`), which answers in the same JSON shape.
    - a request h11 cannot parse gets uvicorn's 400 in the API's JSON shape instead of plain text.
    """

    limits: ClassVar[ServeSettings]
    clients: ClassVar[Counter[str]]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.timeout_keep_alive = self.limits.idle_timeout_s  # type: ignore[assignment]  # uvicorn's is whole seconds
        self._header_timer: asyncio.TimerHandle | None = None
        self._header_cycle: object = None

    @property
    def _host(self) -> str:
        return self.client[0] if self.client else ""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.clients[self._host] += 1
        refusal = self._refusal()
        if refusal:
            log.warning("refused a connection from %s: %s", self._host, refusal)
            retry = {"retry-after": str(self.limits.retry_after_s)}
            transport.write(_raw_error(503, "too_many_connections", refusal, retry))
            transport.close()
            return
        self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive, self.timeout_keep_alive_handler)

    def _refusal(self) -> str | None:
        limits, retry = self.limits, f"retry after {self.limits.retry_after_s} s"
        if len(self.connections) > limits.max_connections:
            return f"the server is at its limit of {limits.max_connections} connections (--max-connections); {retry}"
        if self.clients[self._host] > limits.max_connections_per_client:
            return (f"the server is at its limit of {limits.max_connections_per_client} connections from {self._host} "
                    f"(--max-connections-per-client); close one of yours, or {retry}")  # fmt: skip
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.clients[self._host] -= 1
        if not self.clients[self._host]:
            del self.clients[self._host]
        self._stop_header_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        cycle = self.cycle
        if self._header_timer is None and (cycle is None or cycle.response_complete):  # a request's first bytes
            self._header_cycle = cycle
            self._header_timer = self.loop.call_later(self.limits.header_timeout_s, self._header_timed_out)
        super().data_received(data)
        if self.cycle is not cycle:  # its headers came
            self._stop_header_timer()

    def _stop_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timed_out(self) -> None:
        self._header_timer = None
        if self.cycle is not self._header_cycle or self.transport.is_closing():
            return  # the headers came (read from a pipelined buffer), or the connection went
        if self.conn.our_state is h11.IDLE:  # else an answer was sent and the rest of its body is being dropped
            message = (f"the request's headers did not all come within {self.limits.header_timeout_s:g} s "
                       "(--header-timeout-s); send them at once")  # fmt: skip
            self.transport.write(_raw_error(408, "header_timeout", message))
        self.transport.close()

    def send_400_response(self, msg: str) -> None:
        message = f"not a valid HTTP/1.1 request ({msg.rstrip('.')}), or its headers are over 16 KiB"
        self.transport.write(_raw_error(400, "invalid_http", message))
        self.transport.close()


def guarded_protocol(settings: ServeSettings) -> type[GuardedH11Protocol]:
    """The protocol class of one server: its limits, and its own count of connections per client."""
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {"limits": settings, "clients": Counter()})


def listen(host: str, port: int) -> socket.socket:
    """A listening socket on host:port, made before the model loads so that a bad or busy address fails at once
    (uvicorn would bind only after the model is loaded, and answer a port out of range with a traceback). One
    address, as uvicorn binds its own with `--workers`: IPv6 when the host has a colon.

    Raises:
        CaptuneError: a port outside 1-65535, a host that does not resolve, or an address that cannot be bound.
    """
    if not 1 <= port <= 65535:
        raise CaptuneError(f"--port {port}: not a TCP port; give one from 1 to 65535")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family)
    except OSError as err:  # socket.gaierror for a host that does not resolve
        raise CaptuneError(f"cannot listen on --host {host} --port {port}: {err.strerror or err}; give a free port "
                           "and an address of this machine") from None  # fmt: skip


def uvicorn_server(app: FastAPI, settings: ServeSettings, log_level: str = "info") -> uvicorn.Server:
    """uvicorn serving `app` with `GuardedH11Protocol` (the settings' timeouts and connection limits), to run on a
    socket from `listen`."""
    config = uvicorn.Config(app, http=guarded_protocol(settings), log_level=log_level,
                            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)  # fmt: skip
    return uvicorn.Server(config)


def run_server(model_dir: str | Path, host: str = "127.0.0.1", port: int = 8000,
               settings: ServeSettings | None = None) -> None:  # fmt: skip
    """Serves `create_app(model_dir, settings)` with uvicorn until SIGTERM or Ctrl-C, then lets the requests in
    flight finish (up to `GRACEFUL_SHUTDOWN_S`) and returns."""
    settings = settings or ServeSettings()
    check_settings(settings)
    listening = listen(host, port)
    server = uvicorn_server(create_app(model_dir, settings), settings)
    log.info("page http://%s:%d/ ; API POST /v1/captions ; OpenAPI /openapi.json", host, port)
    # uvicorn shuts down gracefully on the signal, then raises it again for the handler it found: a no-op for SIGTERM
    # and a caught KeyboardInterrupt for Ctrl-C make that a normal return.
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        server.run(sockets=[listening])
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
