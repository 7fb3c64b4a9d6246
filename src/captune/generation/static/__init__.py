"""captune's static-cache loops: the language model over static KV caches (`decoder`), greedy and beam search over it
(`loops`), and the kernels of its decode steps (`attention`, `linears`), compiled with CUDA graphs on a GPU. Their
settings are `StaticOptions`; what they keep for a model between calls is its `FastPath` (`fast_path(model)`)."""

from __future__ import annotations

import torch
from transformers import Blip2Processor

from captune.config import GenerateConfig
from captune.generation.inputs import Prompt, is_encoder_decoder, text_inputs
from captune.generation.static import decoder
from captune.generation.static.attention import static_attention
from captune.generation.static.fast_path import FastPath, StaticCaches, fast_path
from captune.generation.static.loops import static_beam, static_greedy
from captune.generation.static.options import StaticOptions
from captune.model import Blip2Like, blip_of

__all__ = ["FastPath", "StaticCaches", "StaticOptions", "fast_path", "static_tokens", "uses_static_loops"]


def uses_static_loops(model: Blip2Like, options: GenerateConfig) -> bool:
    """captune's own static-cache loops (`static_greedy`, `static_beam`) cover decoder-only models without a
    repetition penalty; a penalty and Flan-T5 go through `generate` (with its static cache)."""
    return options.repetition_penalty == 1.0 and not is_encoder_decoder(model)


def static_tokens(
    model: Blip2Like,
    processor: Blip2Processor,
    pixel_values: torch.Tensor,
    options: GenerateConfig,
    prompt: Prompt = "",
    caches: StaticCaches | None = None,
    image_features: torch.Tensor | None = None,
    prompt_length: int | None = None,
) -> torch.Tensor:
    """The new tokens of captune's static loops for a batch of preprocessed images on the model's device, in its
    dtype (`static_greedy`, or `static_beam` for beam search); `prompt`, `caches`, `image_features` and
    `prompt_length` as `captune.generation.core.generate_from_pixels` takes them. Per-row prompts are left-padded
    (`text_inputs`) and their attention mask goes to the loops; one prompt for every row needs none."""
    blip = blip_of(model)
    path = fast_path(blip)
    device = pixel_values.device
    if caches is None and len(pixel_values) * options.num_beams <= path.options.held_cache_rows:
        caches = path.caches  # the next small call reuses them
    small = len(pixel_values) <= path.options.compiled_image_side_up_to
    if image_features is None and small and decoder.compiles(blip, device):
        # first, so that the GPU works while the host sets up the rest; a copy: the graph's output is reused
        image_features = decoder.compiled_image_side(blip)(pixel_values).clone()
    inputs = text_inputs(model, processor, len(pixel_values), prompt, prompt_length)
    mask = None if isinstance(prompt, str) else inputs["attention_mask"]
    loop = static_greedy if options.num_beams == 1 else static_beam
    with static_attention(model):
        return loop(model, inputs["input_ids"], pixel_values, options, caches, image_features, mask)
