"""The server's request and response models, which FastAPI validates and the OpenAPI document shows; the request's
options model and the JSON requests (captions: `images`, answers: `image` and `question`) are built per server, with
its limits (`_options_model`)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, create_model

from captune.serve.settings import (
    MAX_QUERY_CHARS,
    MAX_QUESTION_CHARS,
    MAX_REPETITION_PENALTY,
    MAX_SEARCH_RERANK,
    MAX_SEARCH_TOP,
    ServeSettings,
)

OPTION_NAMES = ("num_beams", "min_new_tokens", "max_new_tokens", "repetition_penalty")


class GenerationOptions(BaseModel):
    """The generation options a caption or answer was made with (the model's defaults where the request gave none)."""

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
    generate_ms: float = Field(description="the generate call(s) that captioned (or answered about) these images")
    total_ms: float = Field(description="from the request's arrival to its answer")
    batch_images: int = Field(description="images in the generate call, other requests' included")


class CaptionResponse(BaseModel):
    captions: list[ImageCaption]
    options: GenerationOptions
    timing: Timing


class AnswerResponse(BaseModel):
    answer: str
    question: str = Field(description="the question as answered (stripped)")
    filename: str | None = Field(description="the upload's file name (multipart), else null")
    options: GenerationOptions
    timing: Timing


class SearchHit(BaseModel):
    key: str = Field(description="an images index: the image's path as indexed; a captions index: the caption's id")
    score: float = Field(description="higher is a better match (cosine; with `rerank`, plus the match probability)")
    caption: str | None = Field(description="a captions index: the caption; else null")
    image_url: str | None = Field(description="an images index: the image's thumbnail on this server; else null")


class SearchTiming(BaseModel):
    decode_ms: float = Field(description="reading and decoding the query image (0 for a text query)")
    search_ms: float = Field(description="waiting for the search worker and searching")
    total_ms: float = Field(description="from the request's arrival to its answer")


class SearchResponse(BaseModel):
    kind: str = Field(description="what the index holds: `images` or `captions`")
    text: str | None = Field(description="the text query, or null for an image query")
    filename: str | None = Field(description="the query image's file name (multipart), else null")
    top: int
    rerank: int
    hits: list[SearchHit] = Field(description="best first")
    timing: SearchTiming


class IndexInfo(BaseModel):
    folder: str = Field(description="the index folder (`captune index --output`)")
    kind: str = Field(description="`images` or `captions`")
    count: int = Field(description="vectors in the index")
    index_kind: str = Field(description="the FAISS index: flat (exact), hnsw or ivf")
    model_id: str = Field(description="the retrieval model the index records")
    retrieval_model: str = Field(description="where the server loaded it from (--retrieval-model-dir, else model_id)")


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
    tasks: list[str] = Field(
        description='what the model was trained to do: `["caption"]` for a caption run; `["caption", "vqa"]` for a '
        "VQA run (fine-tuned to answer, on BLIP-2's captioning pretraining) and for a plain BLIP-2 (both zero-shot: "
        "`fine_tuned` is false)"
    )
    fine_tuned: bool = Field(description="whether the model is a captune run (false: a plain BLIP-2, zero-shot)")
    training_mode: str | None = Field(description="the run's `train.mode` (lora-lm, ...), null for a plain BLIP-2")
    prompt: str = Field(description="text every caption continues (the training prompt)")
    question_template: str = Field(description="the prompt of `/v1/answers`, `{}` the question (the run's)")
    generation_defaults: GenerationOptions = Field(description="options used where a request gives none")
    limits: ServeSettings
    metrics: dict[str, dict[str, float]] = Field(
        description="metrics files saved with the model (metrics.json, eval-SPLIT/metrics.json), by relative path"
    )
    vqa_model: ModelInfo | None = Field(
        None, description="the model that answers `/v1/answers` when the server has one of its own (--vqa-model-dir)"
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


_QUESTION = Field(min_length=1, max_length=MAX_QUESTION_CHARS, description=f"the question about the image, 1 to "
                  f"{MAX_QUESTION_CHARS} characters")  # fmt: skip


def _answer_json_request_model(options: type[BaseModel]) -> type[BaseModel]:
    image = Field(description="one image, base64 (a `data:image/...;base64,` prefix is allowed); URLs are refused")
    return create_model("AnswerJsonRequest", __base__=options, image=(str, image), question=(str, _QUESTION))


def _search_options_model() -> type[BaseModel]:
    """A search's fields beside its image: the text query, `top` and `rerank`."""
    text = Field(None, max_length=MAX_QUERY_CHARS, description="a text query (leave out for an image query)")
    rerank = Field(0, ge=0, le=MAX_SEARCH_RERANK, description="re-score the best K with the matching head (text "
                   "queries, and image queries of a captions index); 0: none")  # fmt: skip
    return create_model(
        "SearchOptions",
        __config__=ConfigDict(extra="forbid"),
        text=(str | None, text),
        top=(int, Field(10, ge=1, le=MAX_SEARCH_TOP, description="results to answer")),
        rerank=(int, rerank),
    )


def _search_json_request_model(options: type[BaseModel]) -> type[BaseModel]:
    image = Field(None, description="an image query, base64 (a `data:image/...;base64,` prefix is allowed); URLs are "
                  "refused")  # fmt: skip
    return create_model("SearchJsonRequest", __base__=options, image=(str | None, image))


def _search_request_body(options: type[BaseModel], json_request: type[BaseModel]) -> dict[str, Any]:
    """The OpenAPI requestBody of POST /v1/search: a text or an image file with `top` and `rerank`, or the JSON
    request."""
    properties = {"image": {"type": "string", "format": "binary", "description": "an image query (or `text`)"},
                  **options.model_json_schema()["properties"]}  # fmt: skip
    content = {
        "multipart/form-data": {"schema": {"type": "object", "properties": properties}},
        "application/json": {"schema": json_request.model_json_schema()},
    }
    return {"requestBody": {"required": True, "content": content}}


def _request_body(options: type[BaseModel], json_request: type[BaseModel], settings: ServeSettings) -> dict[str, Any]:
    """The OpenAPI requestBody of POST /v1/captions: one route, two content types."""
    images = {
        "type": "array",
        "items": {"type": "string", "format": "binary"},
        "description": f"1 to {settings.max_images} image files (repeat the field)",
    }
    return _body({"images": images}, options, json_request)


def _answer_request_body(options: type[BaseModel], json_request: type[BaseModel]) -> dict[str, Any]:
    """The OpenAPI requestBody of POST /v1/answers: an image file and a question, or the JSON request."""
    fields = {
        "image": {"type": "string", "format": "binary", "description": "one image file"},
        "question": json_request.model_json_schema()["properties"]["question"],
    }
    return _body(fields, options, json_request)


def _body(fields: dict[str, Any], options: type[BaseModel], json_request: type[BaseModel]) -> dict[str, Any]:
    """A requestBody of multipart `fields` (all required) with the options, or the JSON request."""
    multipart = {
        "type": "object",
        "required": list(fields),
        "properties": {**fields, **options.model_json_schema()["properties"]},
    }
    content = {
        "multipart/form-data": {"schema": multipart},
        "application/json": {"schema": json_request.model_json_schema()},
    }
    return {"requestBody": {"required": True, "content": content}}
