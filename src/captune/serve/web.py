"""The web app: a Gradio app over the server's models, mounted at `/` beside the REST API (`captune serve`) or alone
(`captune app`), with tabs Caption, Ask, Search and Model.

Every tab goes through the API's own path (`_Server.caption`, `_Server.answer`, `_Server.search`): the same admission
count, limits, image checks and micro-batched model worker (search: the search worker), so a caption here is the
API's caption for the same image and a search the API's hits. Errors are the API's sentences (`ApiError.message`)
shown by Gradio as a notice, never a traceback. A tab whose model or index is not loaded says how to start the server
with it.

Offline by construction: Gradio's analytics and version check off, no share tunnel, server-side rendering and the
MCP server off, no run history (it offers a Hugging Face bucket), and uploads kept in captune's own temporary
directory (`GRADIO_TEMP_DIR`), files older than `_KEEP_UPLOADS_S` deleted as the app runs and the whole directory
when it stops.
"""

from __future__ import annotations

import base64
import csv
import functools
import html
import io
import json
import logging
import shutil
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import anyio
import gradio as gr
from fastapi import FastAPI
from PIL import Image

from captune.config import GenerateConfig
from captune.serve.app import _Server, report_path
from captune.serve.errors import ApiError
from captune.serve.schemas import OPTION_NAMES, IndexInfo, ModelInfo, Timing
from captune.serve.search import Searcher
from captune.serve.settings import MAX_REPETITION_PENALTY, MAX_SEARCH_RERANK, MAX_SEARCH_TOP
from captune.serve.uploads import Upload, _too_large

log = logging.getLogger(__name__)

THUMBNAIL_PX = 96
"""Longest side of a thumbnail in the Caption tab's table."""
_KEEP_UPLOADS_S = 900
"""Uploads and downloads older than this are deleted (checked every `_KEEP_UPLOADS_S / 3` seconds): long enough to
caption the same upload again with other options."""
_P = ParamSpec("_P")
_R = TypeVar("_R")


# ------------------------------------------------------------------------------------------------------ helpers ---
def _in_sentences(doing: str) -> Callable[[Callable[_P, Awaitable[_R]]], Callable[_P, Awaitable[_R]]]:
    """A handler whose errors reach the page as sentences: the API's message for an `ApiError`, else what failed
    (the log has the traceback)."""

    def decorate(handler: Callable[_P, Awaitable[_R]]) -> Callable[_P, Awaitable[_R]]:
        @functools.wraps(handler)
        async def wrapped(*args: _P.args, **kwargs: _P.kwargs) -> _R:
            try:
                return await handler(*args, **kwargs)
            except ApiError as err:
                raise gr.Error(err.message, duration=None, title="Not done", print_exception=False) from None
            except gr.Error:
                raise
            except Exception as exc:
                log.exception("%s failed", doing)
                raise gr.Error(f"{doing} failed ({type(exc).__name__}); the server log has the details",
                               duration=None, title="Not done", print_exception=False) from None  # fmt: skip

        return wrapped

    return decorate


def _uploads(paths: list[str], max_bytes: int) -> list[Upload]:
    """The files Gradio received, as the API's uploads (named by their file names), bounded in all by the API's
    body limit."""
    files = [Path(path) for path in paths]
    if sum(file.stat().st_size for file in files) > max_bytes:
        raise _too_large(max_bytes)
    return [Upload(file.name, file.read_bytes(), file.name) for file in files]


def _given(values: tuple[float | None, ...]) -> dict[str, Any]:
    """The options fields the user filled in, by name (an emptied field is the model's default)."""
    return {name: value for name, value in zip(OPTION_NAMES, values, strict=True) if value is not None}


def _timing_line(timing: Timing, images: int) -> str:
    return (f"{images} image(s) in {timing.total_ms:.0f} ms (generation {timing.generate_ms:.0f} ms, "
            f"{timing.batch_images} image(s) in the batch)")  # fmt: skip


def _thumbnail(upload: Upload) -> str:
    """An inline JPEG thumbnail (a data URL: nothing more to fetch), as the HTML of a table cell."""
    with Image.open(io.BytesIO(upload.data)) as image:
        image.draft("RGB", (THUMBNAIL_PX, THUMBNAIL_PX))  # a large JPEG decodes at a reduced scale
        small = image.convert("RGB")
    small.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
    buffer = io.BytesIO()
    small.save(buffer, "JPEG", quality=85)
    data = base64.b64encode(buffer.getvalue()).decode()
    return f'<img src="data:image/jpeg;base64,{data}" alt="{html.escape(upload.name)}">'


def _write_downloads(folder: Path, rows: list[dict[str, str]]) -> tuple[Path, Path]:
    """The captions as CSV and as JSONL (the rows of `captune caption --format jsonl`), in a folder of their own."""
    folder.mkdir(parents=True)
    csv_path, jsonl_path = folder / "captions.csv", folder / "captions.jsonl"
    with csv_path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["image", "caption"])
        writer.writeheader()
        writer.writerows(rows)
    jsonl_path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return csv_path, jsonl_path


def _option_inputs(defaults: GenerateConfig, server: _Server, tab: str) -> list[gr.Number]:
    """The four generation options, filled with the model's defaults; the server checks their ranges (the API's
    messages), so a field takes any number."""
    limits = server.settings
    infos = {"num_beams": f"1-{limits.max_num_beams}; 1 is greedy", "min_new_tokens": f"0-{limits.max_new_tokens}",
             "max_new_tokens": f"1-{limits.max_new_tokens}",
             "repetition_penalty": f"1.0-{MAX_REPETITION_PENALTY:g}; 1.0 is none"}  # fmt: skip
    with gr.Accordion("Generation options (the model's defaults)", open=False), gr.Row():
        return [
            gr.Number(
                getattr(defaults, name),
                label=name,
                info=infos[name],
                elem_id=f"{tab}-{name}",
                precision=None if name == "repetition_penalty" else 0,
            )
            for name in OPTION_NAMES
        ]


# --------------------------------------------------------------------------------------------------------- tabs ---
def _caption_tab(server: _Server, downloads: Path) -> None:
    limits = server.settings
    if server.captioner is None:
        gr.Markdown("No caption model is loaded. Start the server with `--model-dir` (a run's best/, or a plain "
                    "BLIP-2) to caption.", elem_id="caption-note")  # fmt: skip
        return
    files = gr.File(label=f"Images (1 to {limits.max_images}; drop them here or click to choose)",
                    file_count="multiple", elem_id="caption-files")  # fmt: skip
    options = _option_inputs(server.captioner.config.generate, server, "caption")
    button = gr.Button("Caption", variant="primary", elem_id="caption-button")
    table = gr.Dataframe(headers=["image", "file", "caption"], datatype=["html", "str", "str"], type="array",
                         label="Captions", interactive=False, wrap=True, elem_id="caption-table")  # fmt: skip
    timing = gr.Markdown(elem_id="caption-timing")
    with gr.Row():
        csv_button = gr.DownloadButton("Download CSV", visible=False, elem_id="caption-csv")
        jsonl_button = gr.DownloadButton("Download JSONL", visible=False, elem_id="caption-jsonl")

    @_in_sentences("captioning")
    async def caption(paths: list[str] | None, *values: float | None) -> tuple[Any, ...]:
        arrived = time.monotonic()
        with server.admission.slot() as take:
            uploads = _uploads(paths or [], limits.max_upload_bytes)
            response = await server.caption(uploads, _given(values), take, arrived)
        rows = [{"image": u.name, "caption": c.caption} for u, c in zip(uploads, response.captions, strict=True)]
        csv_path, jsonl_path = _write_downloads(downloads / f"{time.time_ns()}", rows)
        cells = [[_thumbnail(u), row["image"], row["caption"]] for u, row in zip(uploads, rows, strict=True)]
        return (cells, _timing_line(response.timing, len(uploads)), gr.DownloadButton(value=csv_path, visible=True),
                gr.DownloadButton(value=jsonl_path, visible=True))  # fmt: skip

    button.click(caption, [files, *options], [table, timing, csv_button, jsonl_button], api_name="caption",
                 concurrency_limit=None)  # fmt: skip


def _ask_tab(server: _Server) -> None:
    if server.answerer is None:
        gr.Markdown("No VQA model is loaded. Start the server with `--vqa-model-dir` (a `task: vqa` run, or a plain "
                    "BLIP-2) to ask questions.", elem_id="ask-note")  # fmt: skip
        return
    if not server.can_answer:
        gr.Markdown(f"No VQA model is loaded: `{server.answerer.model_dir}` was trained for captions only. Start "
                    "the server with `--vqa-model-dir` (a `task: vqa` run, or a plain BLIP-2) to ask questions.",
                    elem_id="ask-note")  # fmt: skip
    image = gr.File(label="Image", file_count="single", elem_id="ask-file")
    question = gr.Textbox(label="Question", placeholder="what is the man holding?", elem_id="ask-question")
    options = _option_inputs(server.answerer.config.generate, server, "ask")
    button = gr.Button("Ask", variant="primary", elem_id="ask-button")
    answer = gr.Textbox(label="Answer", interactive=False, elem_id="ask-answer")
    timing = gr.Markdown(elem_id="ask-timing")

    @_in_sentences("answering")
    async def ask(path: str | None, text: str, *values: float | None) -> tuple[str, str]:
        if not server.can_answer:
            raise ApiError(404, "no_vqa_model", "no VQA model is loaded; start the server with --vqa-model-dir")
        arrived = time.monotonic()
        with server.admission.slot() as take:
            uploads = _uploads([path] if path else [], server.settings.max_upload_bytes)
            response = await server.answer(uploads, {"question": text, **_given(values)}, take, arrived)
        return response.answer, _timing_line(response.timing, 1)

    button.click(ask, [image, question, *options], [answer, timing], api_name="ask", concurrency_limit=None)


def _search_tab(server: _Server) -> None:
    searcher = server.searcher
    if searcher is None:
        gr.Markdown("No index is loaded. Make one with `captune index IMAGES --model-dir RETRIEVAL --output INDEX` "
                    "(or `--captions FILE`), then start the server with `--index INDEX` to search it here and at "
                    "`/v1/search`.", elem_id="search-note")  # fmt: skip
        return
    info = searcher.info
    gr.Markdown(f"Searching `{info.folder}`: {info.count} {info.kind}, with `{info.retrieval_model}`. Give a text "
                "or an image.", elem_id="search-about")  # fmt: skip
    with gr.Row():
        text = gr.Textbox(label="Text query", placeholder="a red square on the left", elem_id="search-text")
        image = gr.File(label="or an image query", file_count="single", elem_id="search-file")
    with gr.Row():
        top = gr.Number(10, label="top", info=f"results, 1-{MAX_SEARCH_TOP}", precision=0, elem_id="search-top")
        rerank = gr.Number(0, label="rerank", info=f"re-score the best K with the matching head, 0-"
                           f"{MAX_SEARCH_RERANK}; 0 is none", precision=0, elem_id="search-rerank")  # fmt: skip
    button = gr.Button("Search", variant="primary", elem_id="search-button")
    images = searcher.info.kind == "images"
    gallery = gr.Gallery(label="Nearest images", columns=5, object_fit="contain", visible=images,
                         elem_id="search-gallery")  # fmt: skip
    table = gr.Dataframe(headers=["score", "id", "caption"], datatype=["number", "str", "str"], type="array",
                         label="Nearest captions", interactive=False, wrap=True, visible=not images,
                         elem_id="search-table")  # fmt: skip
    timing = gr.Markdown(elem_id="search-timing")

    @_in_sentences("searching")
    async def search(query: str, path: str | None, *values: float | None) -> tuple[Any, Any, str]:
        arrived = time.monotonic()
        # An emptied field is the API's default, as a field left out of a request.
        given: dict[str, Any] = {n: v for n, v in zip(("top", "rerank"), values, strict=True) if v is not None}
        if query:
            given["text"] = query
        with server.admission.slot() as take:
            uploads = _uploads([path] if path else [], server.settings.max_upload_bytes)
            response = await server.search(uploads, given, take, arrived)
        line = f"{len(response.hits)} result(s) in {response.timing.total_ms:.0f} ms"
        if images:
            thumbnails = await anyio.to_thread.run_sync(_gallery, searcher, [h.key for h in response.hits])
            labels = [f"{h.score:.4f} {Path(h.key).name}" for h in response.hits]
            return list(zip(thumbnails, labels, strict=True)), [], line
        return [], [[h.score, h.key, h.caption] for h in response.hits], line

    button.click(search, [text, image, top, rerank], [gallery, table, timing], api_name="search",
                 concurrency_limit=None)  # fmt: skip


def _gallery(searcher: Searcher, keys: list[str]) -> list[Image.Image]:
    """The hits' thumbnails, as `GET /v1/search/image` serves them."""
    return [Image.open(io.BytesIO(searcher.thumbnail(key))) for key in keys]


def _index_markdown(info: IndexInfo) -> str:
    return (f"### Index: `{info.folder}`\n- **holds**: {info.count} {info.kind} ({info.index_kind} index)\n"
            f"- **retrieval model**: `{info.model_id}`, loaded from `{info.retrieval_model}`")  # fmt: skip


def _model_markdown(info: ModelInfo, role: str) -> str:
    adapter = info.adapter
    lines = [
        f"### {role}: `{info.model_dir}`",
        f"- **base model**: `{info.base_model}`",
        "- **adapter**: "
        + (f"{adapter.type}, r {adapter.r}, alpha {adapter.alpha}, on {adapter.target_modules}" if adapter else "none"),
        f"- **training mode**: {info.training_mode or 'none (a plain BLIP-2, zero-shot)'}",
        f"- **tasks**: {', '.join(info.tasks)}{'' if info.fine_tuned else ' (zero-shot)'}",
        f"- **device**: {info.device}, {info.dtype}",
        f"- **prompt**: `{info.prompt}`; **question template**: `{info.question_template}`",
        "- **generation defaults**: "
        + ", ".join(f"{name} {value}" for name, value in info.generation_defaults.model_dump().items()),
    ]
    for path, metrics in info.metrics.items():
        lines.append(f"- **{path}**: " + ", ".join(f"{name} {value:.4g}" for name, value in metrics.items()))
    if not info.metrics:
        lines.append("- **metrics**: none saved with the model (`captune eval` writes eval-SPLIT/metrics.json)")
    return "\n".join(lines)


def _model_tab(server: _Server) -> None:
    parts = []
    if server.captioner is not None:
        info = server.captioner.info
        parts.append(_model_markdown(info, "Caption model"))
        if info.vqa_model is not None:
            parts.append(_model_markdown(info.vqa_model, "VQA model"))
        report = report_path(server.captioner.model_dir)
        parts.append("The run's report: [report.html](/v1/report)" if report else "No run report beside the model "
                     "(`captune report RUN` writes RUN/report.html).")  # fmt: skip
    elif server.answerer is not None:
        parts.append(_model_markdown(server.answerer.info, "VQA model"))
    if server.searcher is not None:
        parts.append(_index_markdown(server.searcher.info))
    text = "\n\n".join(parts)
    limits = server.settings
    text += (f"\n\nLimits: {limits.max_images} images and {limits.max_upload_bytes / 2**20:.1f} MiB a request, "
             f"{limits.max_image_pixels:,} pixels an image; batches of up to {limits.max_batch} images.")  # fmt: skip
    gr.Markdown(text, elem_id="model-info")


# ---------------------------------------------------------------------------------------------------------- app ---
def build_blocks(server: _Server, temp_dir: Path) -> gr.Blocks:
    """The app's tabs over `server`; downloads are written under `temp_dir`."""
    with gr.Blocks(title="captune", analytics_enabled=False,
                   delete_cache=(_KEEP_UPLOADS_S // 3, _KEEP_UPLOADS_S)) as blocks:  # fmt: skip
        gr.Markdown("# captune\nCaptions, answers and search from fine-tuned BLIP-2s; the same models and limits as "
                    "the REST API (`/v1/captions`, `/v1/answers`, `/v1/search`).")  # fmt: skip
        with gr.Tab("Caption", id="caption"):
            _caption_tab(server, temp_dir / "downloads")
        with gr.Tab("Ask", id="ask"):
            _ask_tab(server)
        with gr.Tab("Search", id="search"):
            _search_tab(server)
        with gr.Tab("Model", id="model"):
            _model_tab(server)
    return blocks


def mount_web_app(app: FastAPI, server: _Server, temp_dir: Path) -> None:
    """Mounts the Gradio app at `/` of `app` (after its routes), offline, its uploads in `temp_dir` (the
    `GRADIO_TEMP_DIR` set before gradio was imported), which is removed when the app stops."""
    blocks = build_blocks(server, temp_dir)
    gr.mount_gradio_app(app, blocks, path="/", footer_links=["api", "settings"], run_history=False,
                        max_file_size=server.settings.max_upload_bytes, show_error=True, ssr_mode=False,
                        mcp_server=False, pwa=False, enable_monitoring=False)  # fmt: skip
    with_gradio = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(parent: FastAPI) -> AsyncIterator[Any]:
        try:
            async with with_gradio(parent) as state:
                yield state
        finally:
            shutil.rmtree(temp_dir, ignore_errors=True)

    app.router.lifespan_context = lifespan
