"""The caption server's app: `create_app` loads the model, decides the generation path once and routes
`POST /v1/captions`, `GET /health`, `GET /v1/model` and the page to one `_Server`; beside it the model information
(`GET /v1/model`) and a request's options resolved over the model's defaults."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse
from PIL import Image
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool

from captune.config import Config, GenerateConfig
from captune.data.images import decode_size
from captune.errors import CaptuneError
from captune.generation.choice import choose, facts_of, log_choice
from captune.generation.core import filled, filled_size, generate_captions
from captune.model import LoadedModel
from captune.model_dir import META_FILE, load_model_dir, saved_config
from captune.serve.batcher import Admission, MicroBatcher
from captune.serve.errors import ApiError, _install_error_handlers, _validation_message
from captune.serve.schemas import (
    OPTION_NAMES,
    AdapterInfo,
    CaptionResponse,
    ErrorResponse,
    GenerationOptions,
    Health,
    ImageCaption,
    ModelInfo,
    Timing,
    _json_request_model,
    _options_model,
    _request_body,
)
from captune.serve.settings import DECODE_THREADS, ServeSettings, check_settings
from captune.serve.uploads import _read_request, decode_upload

log = logging.getLogger(__name__)

_PAGE_CSP = "default-src 'self'; img-src 'self' blob:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"


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
