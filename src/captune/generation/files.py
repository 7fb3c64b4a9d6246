"""Captioning image files in bulk: worker processes decode and preprocess the next batches while the model captions
this one, unreadable files become results with their error, and the static loops get batches of one size with the
image side of the next batch computed on a second CUDA stream."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from transformers import Blip2Processor

from captune.config import GenerateConfig
from captune.data import freeze_inherited_objects
from captune.data.images import PixelFiles, PixelItem, rebatched, worker_share
from captune.generation.choice import choose, facts_of, log_choice
from captune.generation.compile_cache import record_compiled
from captune.generation.core import CaptionResult, filled, filled_size, generate_from_pixels, takes_static_loops
from captune.generation.inputs import Prompt, prompt_tokens, row_prompts
from captune.generation.static import StaticCaches
from captune.model import Blip2Like, attention_kernels, blip_of


def _as_batch(items: list[PixelItem]) -> list[PixelItem]:
    """Keeps a batch as its list of items: stacking waits until the failed images are left out."""
    return items


def caption_paths(
    model: Blip2Like,
    processor: Blip2Processor,
    paths: Iterable[Path],
    options: GenerateConfig,
    prompt: Prompt = "",
    num_workers: int = 0,
) -> Iterator[CaptionResult]:
    """Captions image files in batches of `options.batch_size`, in input order; an unreadable file yields a result
    with its error and the others are captioned. A batch size or static cache left None is decided for the run by
    `captune.generation.choice` (and logged in one line).

    `prompt`: one for every image, or one per path (a question each: the paths may then repeat, and consecutive
    paths that are one file are decoded once and their image side computed once; the choice counts questions).

    With `num_workers` > 0, worker processes decode and preprocess the next batches while the model captions this
    one, so the GPU does not wait for JPEG decoding. Each worker makes a share of a batch (batch_size / num_workers
    images; up to 2 shares ahead, i.e. about 2 batches in flight), not a whole batch: all workers make the first
    batch together, so it is ready after 1 / num_workers of the time one worker would take.
    """
    files = list(paths)
    prompts = prompt if isinstance(prompt, str) else row_prompts(prompt, len(files))
    device = next(model.parameters()).device
    # What the options leave to captune (the path, the batch size) is decided here, once per run.
    unit = "images" if isinstance(prompt, str) else "questions"
    decided = choose(options, facts_of(model, options), len(files), unit)
    log_choice(decided)
    options = decided.options
    assert options.batch_size is not None
    images, firsts = _distinct_runs(files)
    share = worker_share(options.batch_size, num_workers)
    loader = DataLoader(
        PixelFiles(images, processor.image_processor),
        batch_size=share,
        num_workers=num_workers,
        collate_fn=_as_batch,
        prefetch_factor=2 if num_workers else None,
        pin_memory=device.type == "cuda",
        worker_init_fn=freeze_inherited_objects,
    )
    rows = (_rows(chunk, firsts, len(files)) for chunk in loader)
    # A compiled static-cache step is compiled once per batch size: a short batch (the last one, or one with
    # unreadable files) is filled up with copies of its last image, whose captions are dropped (`filled_size`).
    batches = rebatched(rows, options.batch_size, lambda chunks: [item for chunk in chunks for item in chunk])
    if takes_static_loops(model, options):
        length = None if isinstance(prompts, str) else prompt_tokens(processor, prompts)  # one shape for the run
        yield from _static_captions(model, processor, files, batches, options, prompts, length)
        if device.type == "cuda":
            record_compiled(model, options, options.batch_size)
        return
    for batch in batches:
        good, pixels, which = _good_pixels(batch, device)
        captions = []
        if good:
            rows_prompt = _batch_prompt(prompts, good, len(good))
            captions = generate_from_pixels(model, processor, _per_row(pixels, which), options, rows_prompt)
        yield from _results(files, batch, good, captions)


def _distinct_runs(files: list[Path]) -> tuple[list[Path], list[int]]:
    """The files with each run of consecutive equal paths once, and the position of each run's first item."""
    images: list[Path] = []
    firsts: list[int] = []
    for position, path in enumerate(files):
        if not images or path != images[-1]:
            images.append(path)
            firsts.append(position)
    return images, firsts


def _rows(chunk: list[PixelItem], firsts: list[int], count: int) -> list[PixelItem]:
    """A loaded chunk of distinct images as the items they stand for, each positioned among all `count` items; the
    items of one image share its pixel tensor (`_good_pixels` computes each once)."""
    rows: list[PixelItem] = []
    for run, pixels, error in chunk:
        stop = firsts[run + 1] if run + 1 < len(firsts) else count
        rows += [(position, pixels, error) for position in range(firsts[run], stop)]
    return rows


def _good_pixels(
    batch: list[PixelItem], device: torch.device, fill_to: int | None = None
) -> tuple[list[tuple[int, torch.Tensor]], Any, torch.Tensor | None]:
    """The readable items of a batch, their pixels stacked on `device` (filled up for a static cache's batch size
    `fill_to` when given: `filled_size`), or None when there are none, and None or, where items share an image,
    each (filled) item's row among the stacked distinct images. Each image goes to the GPU from the loader's pinned
    memory without waiting, and is stacked there: stacking on the host would first copy the batch (154 MB at 256
    images) into unpinned memory."""
    good = [(index, pixels) for index, pixels, _ in batch if pixels is not None]
    if not good:
        return good, None, None
    row_of: dict[int, int] = {}  # a pixel tensor (by identity: the items of one image share it) -> its row
    for _, p in good:
        row_of.setdefault(id(p), len(row_of))
    which: list[int] | None = [row_of[id(p)] for _, p in good] if len(row_of) < len(good) else None
    distinct = list({id(p): p for _, p in good}.values()) if which is not None else [p for _, p in good]
    pixels = [p.to(device, non_blocking=True) for p in distinct]
    if fill_to is not None:
        size = filled_size(len(good), fill_to, powers_of_two=False)
        if which is None:  # every item its own image (captions): the filled rows copy the last one
            pixels = filled(pixels, size)
        else:
            which = filled(which, size)
    rows = None if which is None else torch.tensor(which).to(device, non_blocking=True)
    return good, torch.stack(pixels), rows


def _per_row(pixels: torch.Tensor, which: torch.Tensor | None) -> torch.Tensor:
    """Each row's pixels (or features) from those of the distinct images (`_good_pixels`)."""
    return pixels if which is None else pixels[which]


def _batch_prompt(prompt: Prompt, good: list[tuple[int, torch.Tensor]], size: int) -> Prompt:
    """The prompt of a batch's readable items: the run's one prompt, or each item's, filled up to `size` rows."""
    if isinstance(prompt, str):
        return prompt
    return filled([prompt[index] for index, _ in good], size)


def _results(
    files: list[Path], batch: list[PixelItem], good: list[tuple[int, torch.Tensor]], captions: list[str]
) -> Iterator[CaptionResult]:
    done = {index: caption for (index, _), caption in zip(good, captions, strict=True)}
    for index, _, error in batch:
        yield CaptionResult(str(files[index]), done.get(index), error)


def _static_captions(
    model: Blip2Like,
    processor: Blip2Processor,
    files: list[Path],
    batches: Iterable[list[PixelItem]],
    options: GenerateConfig,
    prompt: Prompt,
    prompt_length: int | None,
) -> Iterator[CaptionResult]:
    """`caption_paths` through captune's static loops: batches filled up to one size (one compilation: a short batch,
    the last one or one with unreadable files, gets copies of its last image, whose captions are dropped), per-row
    prompts padded to `prompt_length` (one cache shape), one set of static caches for the whole run, and each
    batch's image side (ViT-g, Q-Former, projection) computed once per distinct image on a second CUDA stream while
    the previous batch decodes: the image side is large GEMMs, a decode step small ones that leave most of the GPU
    idle."""
    blip = blip_of(model)
    device = next(model.parameters()).device
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    main = torch.cuda.current_stream(device) if device.type == "cuda" else None
    side = torch.cuda.Stream(device) if device.type == "cuda" else None
    caches: StaticCaches = {}
    was_training = model.training
    model.eval()  # the image side runs here, outside generate_from_pixels
    pending: tuple | None = None
    try:
        for batch in batches:
            with torch.cuda.stream(side) if side is not None else nullcontext():
                good, pixels, which = _good_pixels(batch, device, options.batch_size or len(batch))
                features, rows_prompt = None, _batch_prompt(prompt, good, options.batch_size or len(batch))
                if good:
                    pixels = pixels.to(dtype)  # here, on this stream: generate_from_pixels then has nothing to convert
                    with torch.no_grad(), attention_kernels(options.cudnn_attention):
                        features = blip.get_image_features(pixel_values=pixels, return_dict=True).pooler_output
                    pixels, features = _per_row(pixels, which), _per_row(features, which)
                ready = side.record_event() if side is not None else None
            if pending is not None:
                yield from _static_batch(model, processor, files, options, caches, main, *pending)
            pending = (batch, good, pixels, features, rows_prompt, prompt_length, ready)
        if pending is not None:
            yield from _static_batch(model, processor, files, options, caches, main, *pending)
    finally:
        model.train(was_training)


def _static_batch(
    model: Blip2Like,
    processor: Blip2Processor,
    files: list[Path],
    options: GenerateConfig,
    caches: StaticCaches,
    main: Any,
    batch: list[PixelItem],
    good: list[tuple[int, torch.Tensor]],
    pixels: torch.Tensor | None,
    features: torch.Tensor | None,
    prompt: Prompt,
    prompt_length: int | None,
    ready: Any,
) -> Iterator[CaptionResult]:
    """Decodes one batch whose image features were made on the side stream (the main stream waits for them)."""
    captions: list[str] = []
    if good:
        assert pixels is not None and features is not None
        if main is not None:
            main.wait_event(ready)
            for made_there in (pixels, features):  # used here: not to be reused by the side stream meanwhile
                made_there.record_stream(main)
        captions = generate_from_pixels(model, processor, pixels, options, prompt, caches, features,
                                        prompt_length=prompt_length)[: len(good)]  # fmt: skip
    yield from _results(files, batch, good, captions)


def expand_inputs(inputs: Sequence[str]) -> tuple[list[Path], list[CaptionResult]]:
    """Turns files, folders and globs into image paths (sorted within a folder or glob).

    Returns:
        The image paths, and a failed result for each input that names nothing.
    """
    from glob import glob

    from captune.data.images import IMAGE_SUFFIXES

    paths: list[Path] = []
    failures: list[CaptionResult] = []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                failures.append(CaptionResult(item, None, f"{item}: folder holds no image files"))
            paths.extend(found)
        elif path.exists():
            paths.append(path)
        elif any(c in item for c in "*?["):
            matched = sorted(Path(p) for p in glob(str(path), recursive=True) if Path(p).is_file())
            if not matched:
                failures.append(CaptionResult(item, None, f"{item}: the pattern matches no file"))
            paths.extend(matched)
        else:
            failures.append(CaptionResult(item, None, f"{item}: no such file or folder"))
    # An image named twice (a folder and a glob over it) is captioned once, at its first place.
    first: dict[Path, Path] = {}
    for p in paths:
        first.setdefault(p.resolve(), p)
    return list(first.values()), failures
