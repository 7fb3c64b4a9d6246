"""captune's static-cache loops: the language model over static KV caches (`decoder`), greedy and beam search over it
(`loops`), and the kernels of its decode steps (`attention`, `linears`), compiled with CUDA graphs on a GPU."""

from __future__ import annotations

import torch
from transformers import Blip2Processor

from captune.config import GenerateConfig
from captune.generation.inputs import is_encoder_decoder, text_inputs
from captune.generation.static import decoder
from captune.generation.static.attention import static_attention
from captune.generation.static.decoder import StaticCaches
from captune.generation.static.loops import static_beam, static_greedy
from captune.model import Blip2Like, blip_of

HELD_CACHE_ROWS = 8
"""The most rows (images x beams) whose static caches a `generate_from_pixels` call without `caches` (a single
caption, a server's request) keeps on the model for the next one (~20 MB a row for OPT-2.7B and 30 new tokens):
allocating them anew took ~2.4 ms of a single caption's host time on an H100 while the GPU waited, and the compiled
steps' CUDA graphs read them at the addresses they were recorded with. (Like those graphs, they are per model: one
model does not caption from several threads at once; `captune serve` calls it from one.)"""


def uses_static_loops(model: Blip2Like, options: GenerateConfig) -> bool:
    """captune's own static-cache loops (`static_greedy`, `static_beam`) cover decoder-only models without a
    repetition penalty; a penalty and Flan-T5 go through `generate` (with its static cache)."""
    return options.repetition_penalty == 1.0 and not is_encoder_decoder(model)


def static_tokens(
    model: Blip2Like,
    processor: Blip2Processor,
    pixel_values: torch.Tensor,
    options: GenerateConfig,
    prompt: str = "",
    caches: StaticCaches | None = None,
    image_features: torch.Tensor | None = None,
) -> torch.Tensor:
    """The new tokens of captune's static loops for a batch of preprocessed images on the model's device, in its
    dtype (`static_greedy`, or `static_beam` for beam search); `caches` and `image_features` as
    `captune.generation.core.generate_from_pixels` takes them."""
    blip = blip_of(model)
    device = pixel_values.device
    if caches is None and len(pixel_values) * options.num_beams <= HELD_CACHE_ROWS:
        caches = vars(blip).setdefault("_captune_caches", {})  # the next small call reuses them
    small = len(pixel_values) <= decoder.COMPILED_IMAGE_SIDE_UP_TO
    if image_features is None and small and decoder.compiles(blip, device):
        # first, so that the GPU works while the host sets up the rest; a copy: the graph's output is reused
        image_features = decoder.compiled_image_side(blip)(pixel_values).clone()
    input_ids = text_inputs(model, processor, len(pixel_values), prompt)["input_ids"]
    loop = static_greedy if options.num_beams == 1 else static_beam
    with static_attention(model):
        return loop(model, input_ids, pixel_values, options, caches, image_features)
