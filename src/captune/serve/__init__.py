"""The caption (answer and search) server behind `captune serve`: a REST API and a web app over the one captioning
path.

    captune serve --model-dir runs/blip2-opt-2.7b-flickr8k/best --port 8000

`create_app` loads the model once and returns a FastAPI app:

- `POST /v1/captions`: images as multipart uploads (field `images`, repeated) or JSON with base64 images, plus the
  generation options; answers the captions with timings. URLs are refused, never fetched.
- `POST /v1/answers`: one image (multipart field `image`, or JSON `image` in base64) and a `question`, with the same
  options and limits; answers `{"answer": ..., "question", "filename", "options", "timing"}`. The prompt is the run's
  `data.question_template` with the question in it; questions are batched together (a prompt per row, left-padded),
  apart from captions.
- `POST /v1/search` (with `--index`): a text or one image, `top` and `rerank`; answers the index's hits
  (`captune.search.SearchIndex`, on a search worker of its own), each image hit with the URL of its thumbnail,
  `GET /v1/search/image?key=...`, served for the index's own keys only; `GET /v1/index` describes the index.
- `GET /health`, `GET /v1/model` (base model, adapter, the tasks it was trained for, generation defaults, limits,
  metrics saved beside the model),
  `GET /openapi.json`, and the web app at `/` (`web.py`, Gradio).

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
   `generate_captions` call (questions: one call per group too, a prompt per row), so throughput rises with load.

Every error is JSON, `{"error": {"code": ..., "message": ...}}`, with a message that names the image, field or limit.

The modules, each importing only those above it:

- `settings.py`: `ServeSettings` (one field per flag), `check_settings`, the limits no flag sets.
- `schemas.py`: the request and response models; the options model built from the settings.
- `errors.py`: `ApiError`, the JSON error answers and their handlers.
- `uploads.py`: reading a request (steps 2-3): `Upload`, `decode_upload`, the bounded body, multipart and JSON.
- `batcher.py`: `Admission` (step 1) and `MicroBatcher` (step 4).
- `search.py`: `Searcher` (the index, its worker, the thumbnails of its images), `open_searcher`, `search_query`.
- `app.py`: `create_app`, the routes' `_Server`, the model information, a request's options.
- `protocol.py`: `GuardedH11Protocol` (step 0), `listen`, `uvicorn_server`, `run_server`.
"""

from captune.serve.app import create_app, static_batch_sizes
from captune.serve.batcher import Admission, JobResult, MicroBatcher
from captune.serve.errors import ApiError
from captune.serve.protocol import GuardedH11Protocol, listen, run_server, uvicorn_server
from captune.serve.schemas import OPTION_NAMES
from captune.serve.settings import ServeSettings, check_settings
from captune.serve.uploads import Upload, decode_upload

__all__ = [
    "OPTION_NAMES",
    "Admission",
    "ApiError",
    "GuardedH11Protocol",
    "JobResult",
    "MicroBatcher",
    "ServeSettings",
    "Upload",
    "check_settings",
    "create_app",
    "decode_upload",
    "listen",
    "run_server",
    "static_batch_sizes",
    "uvicorn_server",
]
