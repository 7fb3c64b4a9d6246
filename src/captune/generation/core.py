"""The one captioning path that `captune caption`, evaluation, validation and the server use: a batch of images to
captions through transformers' `generate`, or through captune's static loops (`captune.generation.static`) when
`generate.static_cache` is on and they cover the model. `generate_from_pixels` is the one place that picks
(`takes_static_loops`); `filled_size` is how far a batch is filled up for the static cache's compiled steps."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
from PIL import Image
from transformers import Blip2Processor

from captune.config import GenerateConfig
from captune.data.images import device_pixels
from captune.generation.inputs import Prompt, is_encoder_decoder, row_prompts, text_inputs
from captune.generation.static import StaticCaches, static_tokens, uses_static_loops
from captune.model import Blip2Like, attention_kernels, evaluating

T = TypeVar("T")


@dataclass
class CaptionResult:
    """The caption of one input image, or why there is none."""

    image: str
    caption: str | None
    error: str | None = None


@torch.no_grad()
def generate_captions(
    model: Blip2Like,
    processor: Blip2Processor,
    images: Sequence[Image.Image],
    options: GenerateConfig,
    prompt: Prompt = "",
) -> list[str]:
    """Captions one batch of RGB images (preprocessed here, rescaled and normalised on the model's device:
    `device_pixels`; `caption_paths` preprocesses in worker processes)."""
    pixel_values = device_pixels(processor.image_processor, images, next(model.parameters()).device)
    return generate_from_pixels(model, processor, pixel_values, options, prompt)


@torch.no_grad()
def generate_from_pixels(
    model: Blip2Like,
    processor: Blip2Processor,
    pixel_values: torch.Tensor,
    options: GenerateConfig,
    prompt: Prompt = "",
    caches: StaticCaches | None = None,
    image_features: torch.Tensor | None = None,
    prompt_length: int | None = None,
) -> list[str]:
    """Captions one batch of preprocessed images (the image processor's `pixel_values`). `caches`: static KV caches
    to reuse from an earlier batch of the same run (see StaticCaches); `image_features`: the batch's projected
    Q-Former output when already computed (captune's static loops then skip the image side); `prompt_length`: the
    static loops pad per-row prompts to this many tokens at least (`inputs.prompt_tokens` of the run's prompts, so
    that its batches share one cache shape; `generate` pads to the batch's longest).

    The text input is what `Blip2Processor(images=..., text=prompt)` builds: the image tokens, then the tokenized
    prompt, one for every image or one per image (a question each: `captune.generation.inputs.Prompt`). Decoder-only
    models get left padding, so every row's prompt ends right where generation starts (the static loops mask the
    pads and position each row as `generate` does: the same tokens). The prompt is fed to the model and stripped
    from the output, which holds only the new tokens.
    """
    device = next(model.parameters()).device
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    pixel_values = pixel_values.to(device, dtype, non_blocking=True)
    with evaluating(model), attention_kernels(options.cudnn_attention):
        if takes_static_loops(model, options):
            output = static_tokens(model, processor, pixel_values, options, prompt, caches, image_features,
                                   prompt_length)  # fmt: skip
        else:
            output = _generated_tokens(model, processor, pixel_values, options, prompt)
    texts = processor.tokenizer.batch_decode(output, skip_special_tokens=True)
    return [_clean(t, p) for t, p in zip(texts, row_prompts(prompt, len(texts)), strict=True)]


def takes_static_loops(model: Blip2Like, options: GenerateConfig) -> bool:
    """Whether captioning with these options runs captune's static loops: `generate.static_cache` is on and they
    cover the model and options (`uses_static_loops`); otherwise transformers' `generate` (with its own static cache
    when `generate.static_cache` is on). `generate_from_pixels` and `caption_paths` (for its pipeline around the
    loops) both ask here."""
    return bool(options.static_cache) and uses_static_loops(model, options)


def filled_size(count: int, batch_size: int, powers_of_two: bool) -> int:
    """The rows a batch of `count` images (at most `batch_size`) is filled up to with a static cache, by copies of
    its last image whose captions are dropped (`filled`): the compiled steps are recorded once per batch size, so a
    run keeps to few sizes.

    Args:
        count: The batch's images.
        batch_size: The most images a batch holds (`generate.batch_size`; a server's `--max-batch`).
        powers_of_two: True: the next power of two, at most `batch_size` (`captune serve`, whose batches hold what
            the queue held: a few sizes to compile serve every count, and a small batch is not computed at the size
            of the largest). False: `batch_size` itself (`caption_paths`, whose batches are full but the last and
            those with unreadable files: one size).
    """
    if powers_of_two:
        return min(1 << (count - 1).bit_length(), batch_size)
    return batch_size


def filled(items: list[T], size: int) -> list[T]:
    """`items` followed by copies of its last item up to `size` in all (`items` as they are when there are as many)."""
    return items + items[-1:] * (size - len(items))


def _generated_tokens(
    model: Blip2Like, processor: Blip2Processor, pixel_values: torch.Tensor, options: GenerateConfig, prompt: Prompt
) -> torch.Tensor:
    """The new tokens of transformers' `generate` (with its static cache when `generate.static_cache` is on)."""
    inputs = text_inputs(model, processor, len(pixel_values), prompt)
    output = model.generate(
        **inputs,
        pixel_values=pixel_values,
        num_beams=options.num_beams,
        min_new_tokens=options.min_new_tokens,
        max_new_tokens=options.max_new_tokens,
        repetition_penalty=options.repetition_penalty,
        do_sample=False,
        **({"cache_implementation": "static"} if options.static_cache else {}),
    )
    return output if is_encoder_decoder(model) else output[:, inputs["input_ids"].shape[1] :]


def _clean(text: str, prompt: str) -> str:
    """Collapses whitespace and drops a repeat of the prompt at the start, as whole words only: prompt `a` must not
    eat the `a` of `at the top`."""
    text, prompt = " ".join(text.split()), " ".join(prompt.split())
    if prompt and (text == prompt or text.startswith(prompt + " ")):
        text = text[len(prompt) :].strip()
    return text
