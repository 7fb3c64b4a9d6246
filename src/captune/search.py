"""Image-text search over a vector index (`captune.vector_index`): embed images or captions in bulk with a retrieval
model (`captune.retrieval`), then search them by text or by image. The CLI's `index` and `search`, the web app and
the REST API all call this module.

An **images** index holds one FAISS vector per image, the L2-normalised mean of its query embeddings (candidate
generation), and keeps the image's full query embeddings (float16) beside it. Text -> image takes `candidates` rows
from FAISS and re-scores them exactly, as the model does: the best of the image's query-text cosines
(`retrieval.similarity`); image -> image is the cosine of the pooled vectors. A **captions** index holds one vector
per caption (its text embedding) and the caption itself; image -> text searches FAISS with each of the image's query
vectors and scores the union exactly by the best query; text -> text is the cosine of the text embeddings.

The manifest records the model (its path or id and a fingerprint of its weights) and the kind; searching with
another model is refused, since its embeddings live in another space.
"""

from __future__ import annotations

import copy
import csv
import hashlib
import io
import json
import sys
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader
from transformers import Blip2ForImageTextRetrieval

from captune.data import freeze_inherited_objects
from captune.data.images import PixelFiles, PixelItem, decode_size, load_rgb, rebatched, worker_share
from captune.errors import CaptuneError
from captune.files import progress_bar, read_utf8, write_atomically
from captune.retrieval import RetrievalModel, image_embeddings, image_side, matching_logits, text_embeddings
from captune.vector_index import BuildOptions, VectorIndex, recall_against_exact

KINDS = ("images", "captions")
SKIPPED_FILE = "skipped.tsv"
"""In the index folder: the inputs the last `index_images` run could not embed, `path<TAB>reason` a line."""
APPROXIMATE_ABOVE = 1_000_000
"""Default size above which an approximate index is built: at 1M 256-d vectors exact search took 17.5 ms a query
on 16 CPU cores (benchmarks/results/search-scale-cpu16-1000k.json) while HNSW's recall@10 there was 0.14-0.79."""
MAX_TEXT_TOKENS = 64
RECALL_SAMPLE = 1000


@dataclass(frozen=True)
class Hit:
    """One search result: the stored key (an image's path, a caption's id) and its score (higher is better)."""

    key: str
    score: float


@dataclass
class IndexSummary:
    """What an `index_images` or `index_captions` run did."""

    output: Path
    kind: str
    indexed: int
    """Items embedded and stored by this run."""
    already: int
    """Items skipped because the index already held them (a resumed run)."""
    skipped: list[tuple[str, str]] = field(default_factory=list)
    """(input, reason) of each input that could not be embedded: counted, listed, never silently dropped."""
    count: int = 0
    """Vectors in the index after the run."""
    index_kind: str = "flat"
    """The FAISS index built: flat (exact), hnsw or ivf."""
    recall_at_10: float | None = None
    """An approximate index's recall@10 against exact search on a sample of the stored vectors."""

    def line(self) -> str:
        """The summary line `captune index` prints."""
        what = "image(s)" if self.kind == "images" else "caption(s)"
        text = f"indexed {self.indexed} {what}"
        text += f" ({self.already} already in the index)" if self.already else ""
        if self.skipped:
            where = f"listed in {self.output / SKIPPED_FILE}" if self.kind == "images" else "listed above"
            text += f"; {len(self.skipped)} input(s) skipped ({where})"
        text += f"; {self.output}: {self.count} vectors, {self.index_kind} index"
        if self.recall_at_10 is not None:
            text += f", recall@10 against exact {self.recall_at_10:.3f}"
        return text


def model_fingerprint(model: torch.nn.Module) -> str:
    """A digest of a model's weights: every tensor's name, shape, dtype and its first and last 256 values (exact
    float32 copies, so the same on any device); two models differ here unless they are the same weights."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().flatten()
        values = torch.cat([flat[:256], flat[-256:]]).float().cpu().numpy()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(values.tobytes())
    return digest.hexdigest()[:16]


def _device_and_autocast(model: torch.nn.Module) -> tuple[torch.device, torch.autocast | nullcontext]:
    """The model's device, and bf16 autocast on a GPU (the fast path; the weights, and so the fingerprint, stay)."""
    device = next(model.parameters()).device
    if device.type == "cuda":
        return device, torch.autocast("cuda", dtype=torch.bfloat16)
    return device, nullcontext()


def _bulk_runner(model: Blip2ForImageTextRetrieval, device: torch.device) -> Blip2ForImageTextRetrieval:
    """What embeds images in bulk: on a GPU, a bf16 copy of a float32 model (the caller's model and its fingerprint
    stay as they are), run without autocast. Its matrix products are autocast's (bf16); the layer norms and residual
    sums run in bf16 too, with no casts between: the vision side ~11% faster than under autocast on an H200, where a
    profile of autocast over bf16 weights found 18% of the GPU's time in float32 layer norms and their casts
    (benchmarks/LOG.md). Elsewhere, the model."""
    if device.type != "cuda" or next(model.parameters()).dtype != torch.float32:
        return model
    return copy.deepcopy(model).to(torch.bfloat16)  # type: ignore[arg-type]  # transformers' stubs of .to


def _as_list(items: list[PixelItem]) -> list[PixelItem]:
    return items


def _joined(chunks: list[list[PixelItem]]) -> list[PixelItem]:
    return [item for chunk in chunks for item in chunk]


def _embedded_batches(
    paths: list[Path], loaded: RetrievalModel, batch_size: int, workers: int
) -> Iterator[tuple[list[int], np.ndarray, list[tuple[int, str]]]]:
    """Per batch of image files: the positions embedded, their query embeddings (float32, n x queries x dim) and
    (position, error) of each file that could not be read. Workers decode the next batches meanwhile, and each
    batch's embeddings are copied off the GPU while the next batch runs: a batch is handed on after the next one is
    queued, so the GPU does not idle while its caller writes chunks. Each worker decodes a share of a batch
    (`worker_share`), so the first batch is ready after 1 / workers of the time one worker would take."""
    device, autocast = _device_and_autocast(loaded.model)
    model = _bulk_runner(loaded.model, device)
    dtype = next(model.parameters()).dtype
    if dtype == torch.bfloat16:  # autocast over bf16 weights would only run the layer norms in float32, with casts
        autocast = nullcontext()
    loader = DataLoader(PixelFiles(paths, loaded.image_processor), batch_size=worker_share(batch_size, workers),
                        num_workers=workers, collate_fn=_as_list, prefetch_factor=2 if workers else None,
                        pin_memory=device.type == "cuda", worker_init_fn=freeze_inherited_objects)  # fmt: skip
    waiting: tuple[list[int], torch.Tensor | None, list[tuple[int, str]], Any] | None = None
    for batch in rebatched(loader, batch_size, _joined):
        good = [(position, pixels) for position, pixels, _ in batch if pixels is not None]
        errors = [(position, error or "unreadable") for position, pixels, error in batch if pixels is None]
        queries: torch.Tensor | None = None
        done = None
        if good:
            # Each image to the device from the loader's pinned memory, stacked there (as `caption_paths`).
            pixels = torch.stack([p.to(device, non_blocking=True) for _, p in good]).to(dtype)
            with torch.inference_mode(), autocast:
                embedded = image_embeddings(model, pixels).float()
            if device.type == "cuda":  # copied into pinned memory when the GPU gets there; read after the next batch
                queries = torch.empty(embedded.shape, dtype=embedded.dtype, pin_memory=True)
                queries.copy_(embedded, non_blocking=True)
                done = torch.cuda.Event()
                done.record()
            else:
                queries = embedded
        if waiting is not None:
            yield _finished(*waiting)
        waiting = ([position for position, _ in good], queries, errors, done)
    if waiting is not None:
        yield _finished(*waiting)


def _finished(
    positions: list[int], queries: torch.Tensor | None, errors: list[tuple[int, str]], done: Any
) -> tuple[list[int], np.ndarray, list[tuple[int, str]]]:
    """A batch of `_embedded_batches` once its copy off the GPU (`done`) has finished."""
    if done is not None:
        done.synchronize()
    array = queries.numpy() if queries is not None else np.zeros((0, 0, 0), dtype=np.float32)
    return positions, array, errors


def _pooled(queries: np.ndarray) -> np.ndarray:
    """Each image's candidate-generation vector: the normalised mean of its query embeddings (n x dim)."""
    mean = queries.mean(axis=1)
    return mean / np.linalg.norm(mean, axis=1, keepdims=True)


def index_images(
    paths: Sequence[Path],
    loaded: RetrievalModel,
    output: Path,
    *,
    model_id: str,
    batch_size: int = 64,
    workers: int = 0,
    chunk_size: int = 1024,
    build: BuildOptions | None = None,
    progress: bool = True,
    skipped: Sequence[tuple[str, str]] = (),
) -> IndexSummary:
    """Embeds image files into the index folder `output` (created, or resumed: images it holds are skipped), writing
    a chunk each `chunk_size` images, then builds the FAISS index. Unreadable files are skipped, counted, logged
    and listed in `output/skipped.tsv`.

    Args:
        paths: Image files; stored under their resolved path, which is the key a resume matches.
        loaded: The retrieval model, on the device it runs on (on a GPU a bf16 copy of it embeds: `_bulk_runner`).
        output: The index folder.
        model_id: What `SearchIndex.open` loads the model from later (a model directory or hub id).
        batch_size: Images a forward pass.
        workers: DataLoader processes decoding images meanwhile (0: in this process).
        chunk_size: Images a chunk file: what a kill can lose at most.
        build: How to build the FAISS index (default: exact up to `APPROXIMATE_ABOVE`, then HNSW).
        progress: A progress bar on stderr.
        skipped: (input, reason) of inputs the caller already found unusable (a path that names nothing): counted
            and listed with the unreadable files.

    Raises:
        CaptuneError: no image could be embedded and the index is empty; the folder holds another model's index.
    """
    _check_sizes(batch_size, chunk_size, workers)
    dimension = int(loaded.model.config.image_text_hidden_size)
    index = VectorIndex.create(output, dimension, model_id, "images", model_fingerprint(loaded.model))
    keys = list(dict.fromkeys(str(Path(p).expanduser().resolve()) for p in paths))
    todo = index.missing(keys)
    summary = IndexSummary(output, "images", 0, len(keys) - len(todo), list(skipped))
    pending: list[tuple[str, np.ndarray]] = []
    bar = progress_bar(len(todo), "indexing", progress)
    for positions, queries, errors in _embedded_batches([Path(k) for k in todo], loaded, batch_size, workers):
        for position, error in errors:
            bar.write(f"skipped: {error}", file=sys.stderr)
            summary.skipped.append((todo[position], error))
        pending += [(todo[p], q) for p, q in zip(positions, queries, strict=True)]
        while len(pending) >= chunk_size:
            summary.indexed += _store(index, pending[:chunk_size])
            pending = pending[chunk_size:]
        bar.update(len(positions) + len(errors))
    if pending:
        summary.indexed += _store(index, pending)
    bar.close()
    lines = "".join(f"{path}\t{reason}\n" for path, reason in summary.skipped)
    write_atomically(output / SKIPPED_FILE, lines)
    return _finish(index, summary, build)


def _store(index: VectorIndex, rows: list[tuple[str, np.ndarray]]) -> int:
    queries = np.stack([q for _, q in rows])
    index.add(_pooled(queries), [key for key, _ in rows], queries=queries)
    return len(rows)


def _check_sizes(batch_size: int, chunk_size: int, workers: int) -> None:
    for name, value, least in (("batch size", batch_size, 1), ("chunk size", chunk_size, 1), ("workers", workers, 0)):
        if value < least:
            raise CaptuneError(f"{name} {value}: give at least {least}")


def _finish(index: VectorIndex, summary: IndexSummary, build: BuildOptions | None) -> IndexSummary:
    """Builds the FAISS index (unless one over these vectors with these options is there) and measures an
    approximate one's recall@10 against exact search on up to `RECALL_SAMPLE` stored vectors."""
    if index.count == 0:
        raise CaptuneError(f"{index.folder}: nothing could be indexed ({len(summary.skipped)} input(s) skipped); "
                           "check the inputs listed above")  # fmt: skip
    build = build or BuildOptions(approximate_above=APPROXIMATE_ABOVE)
    manifest = index.manifest
    built = manifest.get("built_count") == index.count and (index.folder / "faiss.index").exists()
    if not (built and {k: manifest["build"].get(k) for k in vars(build)} == vars(build)):
        index.build(build)
    summary.count, summary.index_kind = index.count, str(index.manifest["index_kind"])
    if summary.index_kind != "flat":
        rng = np.random.default_rng(0)
        rows = np.sort(rng.choice(index.count, size=min(index.count, RECALL_SAMPLE), replace=False))
        summary.recall_at_10 = recall_against_exact(index, index.vectors(rows), 10)
    return summary


# --- captions ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CaptionFile:
    """A caption file read: (key, caption) pairs, and the lines left out (blank) by line number."""

    captions: list[tuple[str, str]]
    blank_lines: list[int]


def read_captions(path: Path) -> CaptionFile:
    """A caption file: `.jsonl` (a `caption` field, an optional `id`), `.csv` (a `caption` column, an optional `id`)
    or text, one caption a line. Keys are the ids, else the line numbers (1-based; a CSV's header is line 1).

    Raises:
        CaptuneError: a missing file, a line without a caption, a repeated id; naming the file and line.
    """
    if not path.is_file():
        raise CaptuneError(f"--captions {path}: no such file; give a text, JSONL or CSV file of captions")
    text = read_utf8(path)
    rows: list[tuple[int, str | None, object]] = []  # (line, id, caption)
    if path.suffix.lower() == ".jsonl":
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    record = json.loads(line)
                    rows.append((number, record.get("id"), record["caption"]))
                except (json.JSONDecodeError, KeyError, AttributeError):
                    raise CaptuneError(f'{path}:{number}: not a JSON object with a "caption"') from None
    elif path.suffix.lower() == ".csv":
        reader = csv.DictReader(io.StringIO(text))
        if "caption" not in (reader.fieldnames or []):
            raise CaptuneError(f"{path}: no `caption` column (columns: {reader.fieldnames}); name the column caption")
        rows = [(reader.line_num, row.get("id"), row["caption"]) for row in reader]
    else:
        rows = [(number, None, line) for number, line in enumerate(text.splitlines(), 1)]
    captions, blank, seen = [], [], set()
    for number, key, caption in rows:
        if not isinstance(caption, str) or not caption.strip():
            if path.suffix.lower() in (".jsonl", ".csv"):
                raise CaptuneError(f"{path}:{number}: the caption is empty or not text; give one or remove the line")
            blank.append(number)
            continue
        key = str(key) if key not in (None, "") else str(number)
        if key in seen:
            raise CaptuneError(f"{path}:{number}: id {key!r} is repeated; give each caption its own id")
        seen.add(key)
        captions.append((key, caption.strip()))
    return CaptionFile(captions, blank)


def _text_vectors(loaded: RetrievalModel, texts: list[str]) -> np.ndarray:
    """(texts, dim) text embeddings, float32."""
    device, autocast = _device_and_autocast(loaded.model)
    tokens = loaded.tokenizer(texts, padding=True, truncation=True, max_length=MAX_TEXT_TOKENS, return_tensors="pt")
    with torch.inference_mode(), autocast:
        embeds = text_embeddings(loaded.model, tokens.input_ids.to(device), tokens.attention_mask.to(device))
    return embeds.float().cpu().numpy()


def index_captions(
    captions: Sequence[tuple[str, str]],
    loaded: RetrievalModel,
    output: Path,
    *,
    model_id: str,
    batch_size: int = 256,
    chunk_size: int = 4096,
    build: BuildOptions | None = None,
    progress: bool = True,
) -> IndexSummary:
    """Embeds (key, caption) pairs into the index folder `output` (created, or resumed: keys it holds are skipped),
    a chunk each `chunk_size` captions, then builds the FAISS index; as `index_images` otherwise."""
    _check_sizes(batch_size, chunk_size, 0)
    dimension = int(loaded.model.config.image_text_hidden_size)
    index = VectorIndex.create(output, dimension, model_id, "captions", model_fingerprint(loaded.model))
    text_of = dict(captions)
    todo = index.missing(list(text_of))
    summary = IndexSummary(output, "captions", 0, len(text_of) - len(todo))
    bar = progress_bar(len(todo), "indexing", progress)
    bar.unit = "caption"
    for start in range(0, len(todo), chunk_size):
        keys = todo[start : start + chunk_size]
        texts = [text_of[k] for k in keys]
        vectors = np.concatenate([_text_vectors(loaded, texts[s : s + batch_size])
                                  for s in range(0, len(texts), batch_size)])  # fmt: skip
        index.add(vectors, keys, texts=texts)
        summary.indexed += len(keys)
        bar.update(len(keys))
    bar.close()
    return _finish(index, summary, build)


# --- search ------------------------------------------------------------------------------------------------------


class SearchIndex:
    """An index folder opened with the model that made it: search it by text or by image."""

    def __init__(self, index: VectorIndex, loaded: RetrievalModel) -> None:
        if index.kind not in KINDS:
            raise CaptuneError(f"{index.folder}: an index of {index.kind!r}, not of images or captions; make it with "
                               "`captune index`")  # fmt: skip
        recorded = index.manifest.get("model_fingerprint")
        found = model_fingerprint(loaded.model)
        if recorded != found:
            raise CaptuneError(f"{index.folder}: made with the model {index.manifest['model_id']!r} (fingerprint "
                               f"{recorded}), but this model's fingerprint is {found}: its embeddings are not "
                               f"comparable; search with that model or index again with this one")  # fmt: skip
        self.index, self.loaded = index, loaded
        self.kind = index.kind
        self._row_of: dict[str, int] | None = None

    @classmethod
    def open(
        cls,
        index_dir: str | Path,
        model: RetrievalModel | None = None,
        model_dir: str | None = None,
        device: str = "auto",
    ) -> SearchIndex:
        """An index folder and its model: `model` when given, else loaded from `model_dir` (default: the one the
        manifest records) onto `device`.

        Raises:
            CaptuneError: not an index of images or captions, or the model is not the one that made it.
        """
        from captune.retrieval import load_retrieval

        index = VectorIndex.open(index_dir)
        if model is None:
            recorded = str(index.manifest["model_id"])
            if model_dir is None and Path(recorded).is_absolute() and not Path(recorded).exists():
                raise CaptuneError(f"{index.folder}: made with the model {recorded}, which is not there any more; "
                                   "give its new place (captune search --model-dir, captune serve or app "
                                   "--retrieval-model-dir)")  # fmt: skip
            model = load_retrieval(model_dir or recorded, device)
        return cls(index, model)

    def caption(self, key: str) -> str:
        """A captions index's stored caption of `key`."""
        if self._row_of is None:
            self._row_of = {k: row for row, k in enumerate(self.index.keys)}
        if key not in self._row_of:
            raise CaptuneError(f"{self.index.folder}: no caption {key!r} in the index")
        return self.index.texts()[self._row_of[key]]

    def search_text(self, text: str, top: int = 10, candidates: int | None = None, rerank: int = 0) -> list[Hit]:
        """The `top` images (or captions) best matching `text`.

        Args:
            text: The query.
            top: Results to return.
            candidates: Images taken from FAISS and re-scored exactly (default max(10 * top, 100)).
            rerank: Re-score the best `rerank` images with the matching head (their files are read again).
        """
        _check_query(top, candidates, rerank)
        if not text.strip():
            raise CaptuneError("the text query is empty; give words to search for")
        vector = _text_vectors(self.loaded, [text])[0]
        if self.kind == "captions":  # text -> text: cosine of the text embeddings
            return self._hits(self.index.search_rows(vector, top))
        scores, rows = self.index.search_rows(vector, candidates or max(10 * top, 100))
        found = rows[0][rows[0] >= 0]
        exact = (self.index.queries(found) @ vector).max(axis=1)  # the model's similarity: the best query
        hits = _ranked(self.index.keys, found, exact, max(top, rerank))
        if rerank:
            hits = self._reranked(hits[:rerank], [text] * rerank, None) + hits[rerank:]
        return hits[:top]

    def search_image(
        self, image: str | Path | Image.Image, top: int = 10, candidates: int | None = None, rerank: int = 0
    ) -> list[Hit]:
        """The `top` images most like `image` (cosine of the pooled query embeddings), or, in a captions index, the
        `top` captions best matching it (the best of its query-caption cosines, exact over FAISS's candidates;
        `rerank`: the best `rerank` re-scored with the matching head)."""
        _check_query(top, candidates, rerank)
        pixels = self._pixels(image)
        device, autocast = _device_and_autocast(self.loaded.model)
        with torch.inference_mode(), autocast:
            queries = image_embeddings(self.loaded.model, pixels[None].to(device)).float().cpu().numpy()[0]
        if self.kind == "images":
            if rerank:
                raise CaptuneError("--rerank scores image-text pairs; an image query against an images index has "
                                   "none: leave --rerank out")  # fmt: skip
            return self._hits(self.index.search_rows(_pooled(queries[None]), top))
        # Every caption in the true top `top` is in the top `top` of its best query: exact for a flat index.
        per_query = top if self.index.manifest["index_kind"] == "flat" else (candidates or max(10 * top, 100))
        _, rows = self.index.search_rows(queries, max(per_query, rerank))
        found = np.unique(rows[rows >= 0])
        exact = (self.index.vectors(found) @ queries.T).max(axis=1)
        hits = _ranked(self.index.keys, found, exact, max(top, rerank))
        if rerank:
            texts = [self.caption(h.key) for h in hits[:rerank]]
            hits = self._reranked(hits[:rerank], texts, pixels) + hits[rerank:]
        return hits[:top]

    def _pixels(self, image: str | Path | Image.Image) -> torch.Tensor:
        """(3, H, W) pixels of a query image: a file through `load_rgb` (which names it when it cannot be read)."""
        processor = self.loaded.image_processor
        rgb = load_rgb(Path(image), decode_size(processor)) if isinstance(image, str | Path) else image.convert("RGB")
        return processor(rgb, return_tensors="pt")["pixel_values"][0]

    def _hits(self, found: tuple[np.ndarray, np.ndarray]) -> list[Hit]:
        scores, rows = found
        return [Hit(self.index.keys[r], float(s)) for s, r in zip(scores[0], rows[0], strict=True) if r >= 0]

    def _reranked(self, hits: list[Hit], texts: list[str], query_pixels: torch.Tensor | None) -> list[Hit]:
        """`hits` re-scored by the matching head's probability of a match plus the contrastive score (as LAVIS's
        BLIP-2 and `captune eval --task retrieval`), each pair (hit's image or the query image, its text)."""
        model: Blip2ForImageTextRetrieval = self.loaded.model
        device, autocast = _device_and_autocast(model)
        if query_pixels is None:  # the hits are images: read their files again for the vision encoder
            processor = self.loaded.image_processor
            pixels = torch.stack([processor(load_rgb(Path(h.key), decode_size(processor)), return_tensors="pt")
                                  ["pixel_values"][0] for h in hits])  # fmt: skip
        else:
            pixels = query_pixels[None]
        tokens = self.loaded.tokenizer(texts, padding=True, truncation=True, max_length=MAX_TEXT_TOKENS,
                                       return_tensors="pt").to(device)  # fmt: skip
        with torch.inference_mode(), autocast:
            vision = image_side(model, pixels.to(device)).expand(len(hits), -1, -1)
            logits = matching_logits(model, vision, tokens.input_ids, tokens.attention_mask)
        match = logits.float().softmax(dim=-1)[:, 1].cpu().tolist()
        scored = [Hit(h.key, h.score + m) for h, m in zip(hits, match, strict=True)]
        return sorted(scored, key=lambda h: -h.score)


def _check_query(top: int, candidates: int | None, rerank: int) -> None:
    if top < 1:
        raise CaptuneError(f"--top {top}: ask for at least one result")
    if candidates is not None and candidates < top:
        raise CaptuneError(f"--candidates {candidates}: give at least --top ({top})")
    if rerank < 0:
        raise CaptuneError(f"--rerank {rerank}: give how many of the best results to re-score, or 0 for none")


def _ranked(keys: list[str], rows: np.ndarray, scores: np.ndarray, top: int) -> list[Hit]:
    """The `top` rows by score, descending (ties: the lower row first)."""
    order = np.lexsort((rows, -scores))[:top]
    return [Hit(keys[int(rows[i])], float(scores[i])) for i in order]
