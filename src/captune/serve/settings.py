"""The server's settings: `ServeSettings` (one field per flag of `captune serve`), `check_settings`, and the limits
no flag sets."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from PIL import Image

from captune.errors import CaptuneError

MAX_REPETITION_PENALTY = 5.0
"""Highest `repetition_penalty` a request may ask for (1.0 is none)."""
MAX_QUESTION_CHARS = 500
"""Longest question a `/v1/answers` request may ask, in characters (VQAv2's longest are about 100): a question is
tokens of the prompt every step attends to, so it is bounded as the images are."""
MAX_QUERY_CHARS = 500
"""Longest text query `/v1/search` takes, in characters (the retrieval model reads its first 64 tokens)."""
MAX_SEARCH_TOP = 100
"""Most results a `/v1/search` request may ask for (`top`)."""
MAX_SEARCH_RERANK = 32
"""Most results a `/v1/search` request may have re-scored by the matching head (`rerank`): each is one more pass
of the vision encoder over an indexed image."""
GRACEFUL_SHUTDOWN_S = 60
"""How long `run_server` lets requests in flight finish after SIGTERM or Ctrl-C before cancelling them."""
DECODE_THREADS = min(8, os.cpu_count() or 1)
"""Images decoded at once; more threads than cores decode no faster and each holds a malloc arena of its own."""


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
