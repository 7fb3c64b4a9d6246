"""The text side of a generation batch, as `Blip2Processor(images=..., text=prompt)` builds it."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import Blip2Processor

from captune.model import Blip2Like


def is_encoder_decoder(model: Blip2Like) -> bool:
    return bool(getattr(model.config, "text_config", model.config).is_encoder_decoder)


Prompt = str | Sequence[str]
"""The text a batch's generation starts from: one prompt for every row, or one per row (a question each)."""


def row_prompts(prompt: Prompt, rows: int) -> list[str]:
    """`prompt` as one text per row: a single prompt repeated, or the per-row prompts (checked to be `rows`)."""
    if isinstance(prompt, str):
        return [prompt] * rows
    if len(prompt) != rows:
        raise ValueError(f"{len(prompt)} prompts for {rows} rows; give one prompt, or one per row")
    return list(prompt)


def text_inputs(
    model: Blip2Like, processor: Blip2Processor, rows: int, prompt: Prompt = "", length: int | None = None
) -> dict[str, torch.Tensor]:
    """`input_ids` and `attention_mask` of `rows` images on the model's device, as `Blip2Processor(images=...,
    text=prompt)` builds them: the image tokens, then the tokenized prompt (one for every row, or one per row),
    left-padded for decoder-only models (so that every row's prompt ends where generation starts), right-padded for
    encoder-decoders; to `length` tokens at least when given (`prompt_tokens` of a run's prompts: its batches then
    have one shape)."""
    tokenizer = processor.tokenizer
    tokenizer.padding_side = "right" if is_encoder_decoder(model) else "left"
    padding = {"padding": True} if length is None else {"padding": "max_length", "max_length": length}
    text = tokenizer(row_prompts(prompt, rows), **padding)
    image_tokens = tokenizer(processor.image_token.content * processor.num_query_tokens, add_special_tokens=False)
    device = next(model.parameters()).device
    # non_blocking: copied from pageable memory through a staging buffer at once, without waiting for the GPU's queue
    return {
        key: torch.tensor([image_tokens[key] + row for row in text[key]]).to(device, non_blocking=True)
        for key in ("input_ids", "attention_mask")
    }


def prompt_tokens(processor: Blip2Processor, prompts: Sequence[str]) -> int:
    """The most tokens any of `prompts` takes (image tokens not counted): the length `text_inputs` pads every batch
    of a run to, so that the static loops see one cache shape for the whole run (a new shape means new caches, a
    new CUDA graph recording and, for a compiled step, a new compile)."""
    distinct = list(dict.fromkeys(prompts))
    return max((len(ids) for ids in processor.tokenizer(distinct)["input_ids"]), default=0)
