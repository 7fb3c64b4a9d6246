"""The text side of a captioning batch, as `Blip2Processor(images=..., text=prompt)` builds it."""

from __future__ import annotations

import torch
from transformers import Blip2Processor

from captune.model import Blip2Like


def is_encoder_decoder(model: Blip2Like) -> bool:
    return bool(getattr(model.config, "text_config", model.config).is_encoder_decoder)


def text_inputs(model: Blip2Like, processor: Blip2Processor, rows: int, prompt: str = "") -> dict[str, torch.Tensor]:
    """`input_ids` and `attention_mask` of `rows` images on the model's device, as `Blip2Processor(images=...,
    text=prompt)` builds them: the image tokens, then the tokenized prompt (left-padded for decoder-only models)."""
    tokenizer = processor.tokenizer
    tokenizer.padding_side = "right" if is_encoder_decoder(model) else "left"
    text = tokenizer([prompt] * rows, padding=True)
    image_tokens = tokenizer(processor.image_token.content * processor.num_query_tokens, add_special_tokens=False)
    device = next(model.parameters()).device
    # non_blocking: copied from pageable memory through a staging buffer at once, without waiting for the GPU's queue
    return {
        key: torch.tensor([image_tokens[key] + row for row in text[key]]).to(device, non_blocking=True)
        for key in ("input_ids", "attention_mask")
    }
