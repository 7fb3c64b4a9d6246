"""The server's app: `create_app` loads the model (and a VQA model, and an index to search), decides the generation
path once and routes `POST /v1/captions`, `POST /v1/answers`, `POST /v1/search` (with `GET /v1/search/image` and
`GET /v1/index`), `GET /health`, `GET /v1/model`, the run's report and the web app (Gradio, `captune.serve.web`, when
installed) to one `_Server`; beside it the model information (`GET /v1/model`), a request's options resolved over the
model's defaults, and its question checked."""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import os
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from PIL import Image
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool

from captune.config import Config, GenerateConfig
from captune.data.images import decode_size, device_pixels
from captune.errors import CaptuneError
from captune.generation.choice import choose, facts_of, log_choice
from captune.generation.core import filled, filled_size, generate_captions, generate_from_pixels
from captune.generation.inputs import is_encoder_decoder, prompt_tokens
from captune.model import LoadedModel
from captune.model_dir import META_FILE, load_model_dir, saved_config
from captune.report import REPORT_NAME
from captune.serve.batcher import Admission, JobResult, MicroBatcher
from captune.serve.errors import ApiError, _install_error_handlers, _validation_message
from captune.serve.schemas import (
    OPTION_NAMES,
    AdapterInfo,
    AnswerResponse,
    CaptionResponse,
    ErrorResponse,
    GenerationOptions,
    Health,
    ImageCaption,
    IndexInfo,
    ModelInfo,
    SearchResponse,
    SearchTiming,
    Timing,
    _answer_json_request_model,
    _answer_request_body,
    _json_request_model,
    _options_model,
    _request_body,
    _search_json_request_model,
    _search_options_model,
    _search_request_body,
)
from captune.serve.search import Searcher, open_searcher, search_query
from captune.serve.settings import DECODE_THREADS, MAX_QUESTION_CHARS, ServeSettings, check_settings
from captune.serve.uploads import Upload, _read_request, decode_upload

log = logging.getLogger(__name__)

_PROMPT_TOKENS_STEP = 16
"""With a static cache, a batch of questions is padded to a multiple of this many prompt tokens: a few cache shapes
(each one recorded, and compiled, on first use) for every question length, not one per length."""


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
    fine_tuned = (model_dir / META_FILE).is_file()
    base = config.model.name if fine_tuned else loaded.base_name
    return ModelInfo(
        model_dir=str(model_dir),
        base_model=base,
        adapter=_adapter_info(loaded.model),
        device=str(parameter.device),
        dtype=str(parameter.dtype).removeprefix("torch."),
        tasks=_tasks(config) if fine_tuned else ["caption", "vqa"],
        fine_tuned=fine_tuned,
        training_mode=config.train.mode if fine_tuned else None,
        prompt=config.data.prompt,
        question_template=config.data.question_template,
        generation_defaults=GenerationOptions(**_options_dict(config.generate)),
        limits=settings,
        metrics=_saved_metrics(model_dir),
        vqa_model=None,
    )


def _tasks(config: Config) -> list[str]:
    """What a run was trained for: captions, or answers as well (BLIP-2 captions from its pretraining; LoRA on top
    of it leaves that in place)."""
    return ["caption", "vqa"] if config.data.task == "vqa" else ["caption"]


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


def _question(given: dict[str, Any]) -> str:
    """The request's question (taken out of `given`, so that the options remain), stripped.

    Raises:
        ApiError: 422 no question, one that is not text or is empty, or one over `MAX_QUESTION_CHARS`.
    """
    if "question" not in given:
        raise ApiError(422, "no_question", "no question: send the field `question` (multipart) or JSON `question`, "
                       "the text to answer about the image")  # fmt: skip
    value = given.pop("question")
    if not isinstance(value, str):
        raise ApiError(422, "invalid_question", "question: must be a text field, not a file")
    question = value.strip()
    if not question:
        raise ApiError(422, "invalid_question", "question: empty; ask something about the image")
    if len(question) > MAX_QUESTION_CHARS:
        raise ApiError(422, "invalid_question", f"question: {len(question)} characters; this server takes at most "
                       f"{MAX_QUESTION_CHARS}")  # fmt: skip
    return question


def _timing(arrived: float, decoded: float, result: JobResult) -> Timing:
    return Timing(
        decode_ms=1000 * (decoded - arrived),
        queue_ms=1000 * result.queue_s,
        generate_ms=1000 * result.generate_s,
        total_ms=1000 * (time.monotonic() - arrived),
        batch_images=result.batch_images,
    )


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
    404: "the model or index the route needs is not loaded (--model-dir, --vqa-model-dir, --index); /v1/search/image: "
    "a key that is not an image of the index",
    408: "the body did not all come within --body-timeout-s (the headers: --header-timeout-s)",
    413: "body over --max-upload-bytes, or an image over --max-image-pixels (refused from its header)",
    415: "a part that is not an image, or a body that is neither multipart/form-data nor JSON",
    422: "invalid options, JSON or base64; damaged image; no images or more than --max-images (answers: not one "
    "image, or no question or an empty or too long one; search: not one of a text and an image, top or rerank out of "
    "range); a URL",
    500: "the generate call failed",
    503: "at capacity (--max-queue), over --max-connections or --max-connections-per-client, or stopping; see "
    "Retry-After",
}


@dataclass
class _Model:
    """One loaded model and its generation worker: the caption model, and the VQA model when one is given."""

    model_dir: Path
    config: Config
    """The run's config, its `generate` the path decided for the server."""
    info: ModelInfo
    batcher: MicroBatcher
    processor: Any
    """A copy of the model's processor that counts a question's tokens on the event loop (its own tokenizer: the
    worker's changes its padding as it encodes, and a fast tokenizer refuses two threads at once)."""
    max_positions: int | None
    """Positions of the decoder-only LM (image tokens, prompt and answer must fit); None for an encoder-decoder."""
    decode_size: tuple[int, int] | None
    """`load_rgb`'s min_size for uploads (large JPEGs decode at a reduced scale the image processor still resizes)."""


@dataclass
class _Server:
    """What the routes and the web app share: the models, the limits, the request schemas, admission (one count of
    images for the API and the app) and the batchers."""

    settings: ServeSettings
    options_model: type[BaseModel]
    json_request: type[BaseModel]
    answer_request: type[BaseModel]
    """The JSON request of /v1/answers."""
    search_options: type[BaseModel]
    """The fields of /v1/search beside its image (text, top, rerank)."""
    search_request: type[BaseModel]
    """The JSON request of /v1/search."""
    captioner: _Model | None
    """The caption model; None for a server of an index alone."""
    answerer: _Model | None
    """The model of /v1/answers: the VQA model when one is given, else the caption model."""
    searcher: Searcher | None
    """The index of /v1/search (--index), or None."""
    admission: Admission
    decode_limiter: anyio.CapacityLimiter | None = None
    """Made by `lifespan`, on the server's event loop."""

    @property
    def models(self) -> list[_Model]:
        models = [self.captioner] if self.captioner is not None else []
        return models + [self.answerer] if self.answerer is not None and self.answerer is not self.captioner else models

    @property
    def can_answer(self) -> bool:
        """A VQA model is loaded: `--vqa-model-dir`, a `task: vqa` run or a plain BLIP-2 (zero-shot)."""
        answerer = self.answerer
        return answerer is not None and (answerer is not self.captioner or "vqa" in answerer.info.tasks)

    @asynccontextmanager
    async def lifespan(self, _: FastAPI) -> AsyncIterator[None]:
        self.decode_limiter = anyio.CapacityLimiter(DECODE_THREADS)
        for model in self.models:
            model.batcher.start()
            if self.settings.warm_up and model.config.generate.static_cache:
                await self._warm_up(model)
            log.info("serving %s on %s", model.model_dir, model.info.device)
        if self.searcher is not None:
            self.searcher.start()
            log.info("searching %s (%d %s) with %s", self.searcher.info.folder, self.searcher.info.count,
                     self.searcher.info.kind, self.searcher.info.retrieval_model)  # fmt: skip
        log.info("limits %s", asdict(self.settings))
        try:
            yield
        finally:
            for model in self.models:
                await run_in_threadpool(model.batcher.close)
            if self.searcher is not None:
                await run_in_threadpool(self.searcher.close)

    async def _warm_up(self, model: _Model) -> None:
        """Captions a blank image at every static-cache batch size, on the generation worker (compiled CUDA graphs
        belong to the thread that records them), before the server takes requests."""
        sizes = static_batch_sizes(self.settings.max_batch)
        log.info("warming up: compiling generation for batch sizes %s (--warm-up)", sizes)
        blank = Image.new("RGB", (64, 64))  # resized like any upload
        for size in sizes:
            started = time.monotonic()
            await asyncio.wrap_future(model.batcher.submit([blank] * size, model.config.generate))
            log.info("warm-up: batch %d ready in %.1f s", size, time.monotonic() - started)

    async def captions(self, request: Request) -> CaptionResponse:
        """Captions 1 to `max_images` images: multipart uploads (field `images`) or JSON `{"images": [base64]}`,
        with optional `num_beams`, `min_new_tokens`, `max_new_tokens`, `repetition_penalty`."""
        arrived = time.monotonic()
        with self.admission.slot() as take:
            uploads, given = await _read_request(request, self.settings, self.json_request)
            return await self.caption(uploads, given, take, arrived)

    async def caption(
        self, uploads: list[Upload], given: dict[str, Any], take: Callable[[int], None], arrived: float
    ) -> CaptionResponse:
        """Captions a request's uploads with its raw options `given` (the API's and the web app's path), within an
        admission slot (`take`)."""
        limits = self.settings
        if not uploads:
            raise ApiError(422, "no_images", "no images: send at least one (multipart field `images`, or JSON "
                           "`images`: [base64])")  # fmt: skip
        if len(uploads) > limits.max_images:
            raise ApiError(422, "too_many_images", f"{len(uploads)} images in one request; this server takes at "
                           f"most {limits.max_images} (--max-images)")  # fmt: skip
        model = _needed(self.captioner, "no caption model is loaded; start the server with --model-dir (a run's "
                        "best/, or a plain BLIP-2) to caption")  # fmt: skip
        options = _resolve_options(model.config.generate, given, self.options_model)
        result, decoded = await self._generate(model, uploads, options, None, take, "captioning")
        captions = zip(uploads, result.captions, strict=True)
        return CaptionResponse(
            captions=[ImageCaption(index=i, filename=u.filename, caption=c) for i, (u, c) in enumerate(captions)],
            options=GenerationOptions(**_options_dict(options)),
            timing=_timing(arrived, decoded, result),
        )

    async def answers(self, request: Request) -> AnswerResponse:
        """Answers a question about one image: multipart (file field `image`, text field `question`) or JSON
        `{"image": base64, "question": ...}`, with the options of /v1/captions; the prompt is the run's
        `data.question_template` with the question in it, and the request is batched with others' questions."""
        arrived = time.monotonic()
        with self.admission.slot() as take:
            uploads, given = await _read_request(request, self.settings, self.answer_request, "image")
            return await self.answer(uploads, given, take, arrived)

    async def answer(
        self, uploads: list[Upload], given: dict[str, Any], take: Callable[[int], None], arrived: float
    ) -> AnswerResponse:
        """Answers `given["question"]` about one upload with the other raw options of `given`, within an admission
        slot (`take`)."""
        if len(uploads) != 1:
            raise ApiError(422, "too_many_images" if uploads else "no_images", f"{len(uploads)} images: a "
                           "question is about one image; send it once (multipart field `image`, or JSON `image`: "
                           "base64), and ask about other images in requests of their own")  # fmt: skip
        model = _needed(self.answerer, "no model to answer with is loaded; start the server with --vqa-model-dir (a "
                        "task: vqa run, or a plain BLIP-2) or --model-dir")  # fmt: skip
        question = _question(given)
        options = _resolve_options(model.config.generate, given, self.options_model)
        prompt = model.config.data.question_template.format(question)
        _check_fits(model, prompt, options)
        result, decoded = await self._generate(model, uploads, options, [prompt], take, "answering")
        return AnswerResponse(answer=result.captions[0], question=question, filename=uploads[0].filename,
                              options=GenerationOptions(**_options_dict(options)),
                              timing=_timing(arrived, decoded, result))  # fmt: skip

    async def _generate(
        self,
        model: _Model,
        uploads: list[Upload],
        options: GenerateConfig,
        prompts: list[str] | None,
        take: Callable[[int], None],
        doing: str,
    ) -> tuple[JobResult, float]:
        """Admits the uploads' other images (the request holds one slot), decodes them off the event loop and queues
        them for the model's batcher (with a prompt each, or None for captions); the result, and when decoding
        ended."""
        limits = self.settings
        take(len(uploads) - 1)
        images = await anyio.to_thread.run_sync(
            lambda: [decode_upload(u, limits.max_image_pixels, model.decode_size) for u in uploads],
            limiter=self.decode_limiter,
        )
        decoded = time.monotonic()
        try:
            return await asyncio.wrap_future(model.batcher.submit(images, options, prompts)), decoded
        except ApiError:
            raise
        except Exception as exc:  # the generate call failed; the log has its traceback
            raise ApiError(500, "generation_failed", f"{doing} failed ({type(exc).__name__}); the server log has "
                           "the details") from None  # fmt: skip

    async def searches(self, request: Request) -> SearchResponse:
        """The index's best matches for a text (multipart field or JSON `text`) or an image (multipart file field
        `image`, or JSON `image` in base64), with `top` and `rerank`."""
        arrived = time.monotonic()
        with self.admission.slot() as take:
            uploads, given = await _read_request(request, self.settings, self.search_request, "image")
            return await self.search(uploads, given, take, arrived)

    async def search(
        self, uploads: list[Upload], given: dict[str, Any], take: Callable[[int], None], arrived: float
    ) -> SearchResponse:
        """Searches the index for `given["text"]` or the one upload, with the other raw fields of `given` (`top`,
        `rerank`), within an admission slot (`take`; the request's slot holds its image)."""
        searcher = _needed(self.searcher, "no index is loaded; start the server with --index INDEX (a folder "
                           "`captune index` made) to search")  # fmt: skip
        if len(uploads) > 1:
            raise ApiError(422, "too_many_images", f"{len(uploads)} images: a search takes one image query; send "
                           "it once (multipart field `image`, or JSON `image`: base64)")  # fmt: skip
        query = search_query(given, bool(uploads), self.search_options)  # checked before the image is decoded
        if uploads:
            upload = uploads[0]
            query.image = await anyio.to_thread.run_sync(
                lambda: decode_upload(upload, self.settings.max_image_pixels, searcher.decode_size),
                limiter=self.decode_limiter,
            )
        decoded = time.monotonic()
        try:
            hits = await asyncio.wrap_future(searcher.submit(query))
        except ApiError:
            raise
        except CaptuneError as err:  # a query the index cannot answer (rerank of an image among images)
            raise ApiError(422, "invalid_query", str(err)) from None
        except Exception as exc:  # the log has its traceback
            log.error("search failed", exc_info=exc)
            raise ApiError(500, "search_failed", f"the search failed ({type(exc).__name__}); the server log has the "
                           "details") from None  # fmt: skip
        done = time.monotonic()
        timing = SearchTiming(decode_ms=1000 * (decoded - arrived), search_ms=1000 * (done - decoded),
                              total_ms=1000 * (done - arrived))  # fmt: skip
        return SearchResponse(kind=searcher.info.kind, text=query.text, top=query.top, rerank=query.rerank,
                              filename=uploads[0].filename if uploads else None, hits=hits,
                              timing=timing)  # fmt: skip

    async def search_image(self, key: str) -> Response:
        """The JPEG thumbnail of an image the index holds (`key`, as a hit names it); any other path gets 404."""
        searcher = _needed(self.searcher, "no index is loaded; start the server with --index INDEX")
        with self.admission.slot():
            data = await anyio.to_thread.run_sync(searcher.thumbnail, key, limiter=self.decode_limiter)
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})

    async def index(self) -> IndexInfo:
        """The index the server searches: its folder, kind, size and retrieval model."""
        return _needed(self.searcher, "no index is loaded; start the server with --index INDEX").info

    async def health(self) -> Health | JSONResponse:
        """`ok` while the generation workers run, else 503."""
        alive = all(model.batcher.alive for model in self.models)
        state = Health(status="ok" if alive else "unavailable", pending_images=self.admission.pending,
                       max_queue=self.settings.max_queue)  # fmt: skip
        return state if alive else JSONResponse(state.model_dump(), status_code=503)

    async def model(self) -> ModelInfo:
        """The model, its adapter, generation defaults, this server's limits and the metrics saved with it."""
        return _needed(self.captioner, "no caption model is loaded (--model-dir); GET /v1/index describes the index "
                       "searched").info  # fmt: skip

    async def report(self) -> FileResponse:
        """The run's report.html (`captune report`), when the model directory is a run's best/ or final/."""
        model_dir = _needed(self.captioner, "no caption model is loaded, so no run report").model_dir
        path = report_path(model_dir)
        if path is None:
            raise ApiError(404, "no_report", f"{model_dir.parent / REPORT_NAME}: not found; "
                           f"`captune report {model_dir.parent}` writes it")  # fmt: skip
        return FileResponse(path, media_type="text/html")


_T = TypeVar("_T")


def _needed(part: _T | None, message: str) -> _T:
    """What a route needs (a model, the index), or 404 with `message` saying how to start the server with it."""
    if part is None:
        raise ApiError(404, "not_loaded", message)
    return part


def report_path(model_dir: Path) -> Path | None:
    """The report of the run a model directory belongs to (RUN/best -> RUN/report.html), or None."""
    path = model_dir.parent / REPORT_NAME
    return path if (model_dir / META_FILE).is_file() and path.is_file() else None


def _check_fits(model: _Model, prompt: str, options: GenerateConfig) -> None:
    """A question whose prompt, image tokens and longest answer exceed the LM's positions gets 422, not a 500."""
    if model.max_positions is None:
        return
    image = model.processor.num_query_tokens
    tokens = prompt_tokens(model.processor, [prompt])
    if image + tokens + options.max_new_tokens > model.max_positions:
        raise ApiError(422, "question_too_long", f"question: {tokens} prompt tokens (with the template), "
                       f"{image} image tokens and up to {options.max_new_tokens} answer tokens (max_new_tokens) "
                       f"exceed this model's {model.max_positions} positions; ask a shorter question")  # fmt: skip


def _counting_copy(processor: Any) -> Any:
    counting = copy.copy(processor)
    counting.tokenizer = copy.deepcopy(processor.tokenizer)
    return counting


def static_batch_sizes(max_batch: int) -> list[int]:
    """Every batch size a static-cache server compiles for: the powers of two below `max_batch`, and `max_batch`."""
    return sorted({filled_size(count, max_batch, powers_of_two=True) for count in range(1, max_batch + 1)})


def _load(model_dir: Path, settings: ServeSettings, options_model: type[BaseModel]) -> _Model:
    """Loads one model, decides its generation path once (a server is an open-ended run; its batches are the
    micro-batcher's) and makes its batcher."""
    config = saved_config(model_dir)
    _check_defaults(config.generate, options_model, model_dir)
    loaded = load_model_dir(model_dir, device=settings.device, merge=settings.merge_adapter)
    facts = facts_of(loaded.model, config.generate)
    decided = choose(replace(config.generate, batch_size=settings.max_batch), facts, None)
    log_choice(decided)
    config.generate = decided.options

    def generate(images: list[Image.Image], options: GenerateConfig, prompts: list[str] | None = None) -> list[str]:
        count = len(images)
        if options.static_cache:  # a compiled step per batch size: fill up to a power of two (few compilations)
            size = filled_size(count, settings.max_batch, powers_of_two=True)
            images, prompts = filled(images, size), None if prompts is None else filled(prompts, size)
        if prompts is None:
            return generate_captions(loaded.model, loaded.processor, images, options, config.data.prompt)[:count]
        # Questions: one prompt a row; with a static cache padded to a few lengths, as the batches to a few sizes.
        step = _PROMPT_TOKENS_STEP
        length = -(-prompt_tokens(loaded.processor, prompts) // step) * step if options.static_cache else None
        pixels = device_pixels(loaded.processor.image_processor, images, next(loaded.model.parameters()).device)
        return generate_from_pixels(loaded.model, loaded.processor, pixels, options, prompts,
                                    prompt_length=length)[:count]  # fmt: skip

    return _Model(
        model_dir=model_dir,
        config=config,
        info=_model_info(model_dir, loaded, config, settings),
        batcher=MicroBatcher(generate, settings.max_batch, settings.max_wait_ms / 1000),
        processor=_counting_copy(loaded.processor),
        max_positions=None
        if is_encoder_decoder(loaded.model)
        else loaded.model.config.text_config.max_position_embeddings,
        decode_size=decode_size(loaded.processor.image_processor),
    )


def _add_api_routes(app: FastAPI, server: _Server) -> None:
    errors: dict[int | str, dict[str, Any]] = {
        status: {"model": ErrorResponse, "description": why} for status, why in _ERROR_STATUSES.items()
    }
    options_model, settings = server.options_model, server.settings
    app.add_api_route("/v1/captions", server.captions, methods=["POST"], response_model=CaptionResponse,
                      summary="Caption images", responses=errors,
                      openapi_extra=_request_body(options_model, server.json_request, settings))  # fmt: skip
    app.add_api_route("/v1/answers", server.answers, methods=["POST"], response_model=AnswerResponse,
                      summary="Answer a question about an image", responses=errors,
                      openapi_extra=_answer_request_body(options_model, server.answer_request))  # fmt: skip
    app.add_api_route("/v1/search", server.searches, methods=["POST"], response_model=SearchResponse,
                      summary="Search the index by text or by image", responses=errors,
                      openapi_extra=_search_request_body(server.search_options, server.search_request))  # fmt: skip
    app.add_api_route("/v1/search/image", server.search_image, response_class=Response, responses=errors,
                      summary="The thumbnail of an indexed image")  # fmt: skip
    app.add_api_route("/v1/index", server.index, response_model=IndexInfo, summary="The index searched")
    app.add_api_route("/v1/model", server.model, response_model=ModelInfo, summary="Model information")


def _add_web_app(app: FastAPI, server: _Server) -> None:
    """The Gradio app at `/`; without gradio installed, `/` answers how to install it and the API works on."""
    temp_dir = Path(tempfile.mkdtemp(prefix="captune-app-"))
    # Gradio reads these as it is imported and builds the app: its folder for uploads and its own files (captune's,
    # removed when the app stops), and no telemetry (its analytics and version check, Hugging Face's).
    os.environ.update(GRADIO_TEMP_DIR=str(temp_dir), GRADIO_ANALYTICS_ENABLED="False", HF_HUB_DISABLE_TELEMETRY="1")
    try:
        from captune.serve.web import mount_web_app
    except ImportError as err:
        temp_dir.rmdir()
        if err.name is None or err.name.split(".")[0] not in ("gradio", "gradio_client"):
            raise
        log.warning("the web app is off: %s is not installed (pip install 'captune[app]'); the API works", err.name)

        async def no_web_app() -> None:
            raise ApiError(404, "no_web_app", "the web app needs gradio: pip install 'captune[app]' and restart; the "
                           "REST API is at /v1/captions, /v1/answers and /v1/model (see /openapi.json)")  # fmt: skip

        app.add_api_route("/", no_web_app, include_in_schema=False)
        return
    mount_web_app(app, server, temp_dir)


def create_app(
    model_dir: str | Path | None,
    settings: ServeSettings | None = None,
    *,
    vqa_model_dir: str | Path | None = None,
    index_dir: str | Path | None = None,
    retrieval_model_dir: str | None = None,
    api: bool = True,
    web: bool = True,
) -> FastAPI:
    """Loads the model(s) and the index once and returns the server's app; its lifespan starts and stops the
    batchers and the search worker.

    Args:
        model_dir: What `captune caption --model-dir` takes: RUN/best, RUN/final, a checkpoint, or a plain BLIP-2;
            None for a server that only searches `index_dir` (or only answers, with `vqa_model_dir`).
        settings: Limits and batching; the defaults of `ServeSettings` when None.
        vqa_model_dir: A model that answers questions (`/v1/answers`, the app's Ask tab); None: the caption model
            answers them.
        index_dir: An index `captune index` made, for `/v1/search` and the app's Search tab; None: no search.
        retrieval_model_dir: The index's retrieval model; None: the one its manifest records.
        api: Route the REST API (`/v1/captions`, `/v1/answers`, `/v1/search`, `/v1/model`); False for `captune app`.
        web: Mount the web app (Gradio) at `/`, when gradio is installed.

    Raises:
        CaptuneError: invalid settings, no model and no index, or a model or index that cannot be loaded.
    """
    settings = settings or ServeSettings()
    check_settings(settings)
    if model_dir is None and vqa_model_dir is None and index_dir is None:
        raise CaptuneError("nothing to serve: give --model-dir (a caption model), --vqa-model-dir or --index (an "
                           "index `captune index` made), or several")  # fmt: skip
    options_model = _options_model(settings)
    captioner = None if model_dir is None else _load(Path(model_dir).expanduser(), settings, options_model)
    answerer = captioner if vqa_model_dir is None else _load(Path(vqa_model_dir).expanduser(), settings, options_model)
    if captioner is not None:
        captioner.info.vqa_model = None if answerer is captioner or answerer is None else answerer.info
    searcher = None if index_dir is None else open_searcher(Path(index_dir).expanduser(), retrieval_model_dir,
                                                            settings.device)  # fmt: skip
    search_options = _search_options_model()
    server = _Server(
        settings=settings,
        options_model=options_model,
        json_request=_json_request_model(options_model, settings),
        answer_request=_answer_json_request_model(options_model),
        search_options=search_options,
        search_request=_search_json_request_model(search_options),
        captioner=captioner,
        answerer=answerer,
        searcher=searcher,
        admission=Admission(settings.max_queue, settings.retry_after_s),
    )
    # Swagger UI and ReDoc load their scripts from a CDN: off, so that nothing the server sends reaches outside.
    app = FastAPI(title="captune caption server", summary="Captions images and answers questions about them with a "
                  "fine-tuned BLIP-2", version="1", lifespan=server.lifespan, docs_url=None,
                  redoc_url=None)  # fmt: skip
    _install_error_handlers(app)
    if api:
        _add_api_routes(app, server)
    app.add_api_route("/health", server.health, response_model=Health, responses={503: {"model": Health}})
    app.add_api_route("/v1/report", server.report, response_class=FileResponse, summary="The run's report")
    if web:
        _add_web_app(app, server)  # last: mounted at `/`, it takes every path the routes above leave
    return app
