"""Batched captioning: the one generation path that `captune caption`, evaluation and validation all use."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from transformers import Blip2Processor

from captune.config import GenerateConfig
from captune.data.images import load_rgb
from captune.errors import CaptuneError
from captune.model import Blip2Like


@dataclass
class CaptionResult:
    """The caption of one input image, or why there is none."""

    image: str
    caption: str | None
    error: str | None = None


def _is_encoder_decoder(model: Blip2Like) -> bool:
    return bool(getattr(model.config, "text_config", model.config).is_encoder_decoder)


@torch.no_grad()
def generate_captions(
    model: Blip2Like,
    processor: Blip2Processor,
    images: Sequence[Image.Image],
    options: GenerateConfig,
    prompt: str = "",
) -> list[str]:
    """Captions one batch of RGB images.

    Decoder-only models get left padding, so every row's prompt ends right where generation starts. The prompt is
    fed to the model and stripped from the output, which holds only the new tokens.
    """
    device = next(model.parameters()).device
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    processor.tokenizer.padding_side = "right" if _is_encoder_decoder(model) else "left"
    inputs = processor(images=list(images), text=[prompt] * len(images), padding=True, return_tensors="pt")
    inputs = inputs.to(device)
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    was_training = model.training
    model.eval()
    output = model.generate(
        **inputs,
        num_beams=options.num_beams,
        min_new_tokens=options.min_new_tokens,
        max_new_tokens=options.max_new_tokens,
        repetition_penalty=options.repetition_penalty,
        do_sample=False,
    )
    model.train(was_training)
    if not _is_encoder_decoder(model):
        output = output[:, inputs["input_ids"].shape[1] :]
    texts = processor.tokenizer.batch_decode(output, skip_special_tokens=True)
    return [_clean(t, prompt) for t in texts]


def _clean(text: str, prompt: str) -> str:
    """Collapses whitespace and drops a repeat of the prompt at the start, as whole words only: prompt `a` must not
    eat the `a` of `at the top`."""
    text, prompt = " ".join(text.split()), " ".join(prompt.split())
    if prompt and (text == prompt or text.startswith(prompt + " ")):
        text = text[len(prompt) :].strip()
    return text


def caption_paths(
    model: Blip2Like,
    processor: Blip2Processor,
    paths: Iterable[Path],
    options: GenerateConfig,
    prompt: str = "",
) -> Iterator[CaptionResult]:
    """Captions image files in batches, in input order; an unreadable file yields a result with its error."""
    batch: list[tuple[Path, Image.Image]] = []
    pending: list[CaptionResult] = []

    def flush() -> Iterator[CaptionResult]:
        captions = generate_captions(model, processor, [im for _, im in batch], options, prompt) if batch else []
        done = dict(zip([str(p) for p, _ in batch], captions, strict=True))
        for result in pending:
            if result.error is None:
                result.caption = done[result.image]
            yield result
        batch.clear()
        pending.clear()

    for path in paths:
        try:
            batch.append((path, load_rgb(path)))
            pending.append(CaptionResult(str(path), None))
        except CaptuneError as err:
            pending.append(CaptionResult(str(path), None, str(err)))
        if len(batch) >= options.batch_size:
            yield from flush()
    yield from flush()


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
