"""Reading a request (captions: `images`, answers: one `image` and a question): its body through a counter that
stops at `max_upload_bytes` and within `body_timeout_s` (`_limited`), as multipart (a cut-off body refused) or JSON
with base64 images (URLs refused, never fetched), and each image decoded after its size is checked from its header
(`decode_upload`)."""

from __future__ import annotations

import base64
import io
import json
import time
from contextlib import aclosing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import anyio
from fastapi import Request
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ValidationError
from starlette.datastructures import FormData, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.types import Message

from captune.data.images import ImageError, load_rgb
from captune.serve.errors import ApiError, _validation_message
from captune.serve.settings import ServeSettings

# What Pillow raises for a damaged header; load_rgb opens the image again and names the problem.
_DAMAGED_HEADER = (OSError, SyntaxError, ValueError, EOFError)


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


def _image_bytes(text: str, where: str) -> bytes:
    """The bytes of one base64 image of a JSON request (`where` names it: `images.0`, `image`); URLs are refused,
    never fetched."""
    text = text.strip()
    if text.lower().startswith(("http:", "https:", "ftp:", "file:", "//")):
        raise ApiError(422, "url_not_fetched", f"{where}: this server never fetches URLs; send the image bytes "
                       "base64-encoded")  # fmt: skip
    if text.startswith("data:"):
        header, _, text = text.partition(",")
        if not header.endswith(";base64"):
            raise ApiError(422, "invalid_base64", f"{where}: a data URL must be base64 (data:image/png;base64,...)")
    try:
        return base64.b64decode(text, validate=True)
    except ValueError as exc:  # binascii.Error, or characters outside ASCII
        raise ApiError(422, "invalid_base64", f"{where}: not valid base64 ({exc})") from None


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


async def _read_multipart(request: Request, field: str) -> tuple[list[Upload], dict[str, Any]]:
    """The file parts of `field` as uploads, and every other part's text by name (the options, a question)."""
    form = await _read_form(request)
    try:
        uploads: list[Upload] = []
        options: dict[str, Any] = {}
        for key, value in form.multi_items():
            if key == field:
                if not isinstance(value, UploadFile):
                    raise ApiError(422, "invalid_request", f"{field}: must be file parts (curl -F {field}=@photo.jpg)")
                name = (value.filename or f"image {len(uploads)}")[:200]
                uploads.append(Upload(name, await value.read(), value.filename))
            elif key in options:
                raise ApiError(422, "invalid_options", f"{key}: given more than once")
            else:
                options[key] = value if isinstance(value, str) else None
        return uploads, options
    finally:
        await form.close()


async def _read_json(
    request: Request, json_request: type[BaseModel], field: str
) -> tuple[list[Upload], dict[str, Any]]:
    """The base64 images of `field` (a list, or one image) as uploads, and the other fields by name."""
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
    found = values.pop(field)
    if found is None:  # an optional image left out (a text search)
        return [], values
    if isinstance(found, str):  # one image (answers, an image search): named by its field
        return [Upload(field, _image_bytes(found, field), None)], values
    return [Upload(f"image {i}", _image_bytes(text, f"{field}.{i}"), None) for i, text in enumerate(found)], values


async def _read_request(
    request: Request, settings: ServeSettings, json_request: type[BaseModel], field: str = "images"
) -> tuple[list[Upload], dict[str, Any]]:
    """The uploads (of the image `field`) and the raw other fields of a multipart or JSON request, its body limited
    to `max_upload_bytes`."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    limited = _limited(request, settings.max_upload_bytes, settings.body_timeout_s)
    if content_type == "multipart/form-data":
        return await _read_multipart(limited, field)
    if content_type == "application/json":
        return await _read_json(limited, json_request, field)
    raise ApiError(415, "unsupported_media_type", f"content type {content_type or '(none)'!r}: send "
                   f"multipart/form-data (field `{field}`) or application/json")  # fmt: skip
