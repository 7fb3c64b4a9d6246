"""The one-query attention of captune's static loops, registered with transformers' attention interface for the
language model's decode steps."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from captune.generation.static.fast_path import fast_path
from captune.generation.static.linears import fused_qkv, gemv_linears
from captune.model import Blip2Like, blip_of

STATIC_ATTENTION = "captune_static_cache"
"""The attention implementation the language model runs under in captune's static loops (registered with
transformers' AttentionInterface): the prefill is SDPA's; a one-token step is `one_query_attention`'s."""


OneQueryAttend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None", float], torch.Tensor]
"""The core of a one-query attention: (query (rows, heads, 1, dim), key and value (rows, heads, slots, dim), the
mask as SDPA gets it or None, the scale) -> the output, (rows, 1, heads, dim)."""


def one_query(attend: OneQueryAttend) -> Callable[..., tuple[torch.Tensor, None]]:
    """A transformers attention function that runs `attend` for a one-token step (key and value heads repeated for
    grouped-query models) and transformers' SDPA function for any other shape or in training."""

    def attention(
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        dropout: float = 0.0,
        scaling: float | None = None,
        is_causal: bool | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:
        from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

        if query.shape[2] != 1 or module.training:
            return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                          scaling=scaling, is_causal=is_causal, **kwargs)  # fmt: skip
        groups = getattr(module, "num_key_value_groups", 1)
        scale = query.shape[-1] ** -0.5 if scaling is None else scaling
        return attend(query, repeat_kv(key, groups), repeat_kv(value, groups), attention_mask, scale), None

    return attention


def _batched_products(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """One query per row over a masked static cache as two batched matrix products in the cache's dtype and a
    float32 softmax, which the compiler fuses around.

    PyTorch's own kernels do this case badly: flash attention takes no mask, and the memory-efficient, cuDNN and math
    kernels took 254, 200 and ~380 us per layer and step at batch 256 on an H100 (the math one first copies the whole
    cache to float32), 60-70 % of the decode step."""
    scores = torch.matmul(query, key.transpose(2, 3)).float() * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, -float("inf")) if mask.dtype == torch.bool else scores + mask
    weights = scores.softmax(dim=-1).to(value.dtype)
    return torch.matmul(weights, value).transpose(1, 2).contiguous()


def _reductions(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """One query per row over a masked static cache as float32 reductions over the cache in its dtype, which the
    compiler makes into a few fused kernels (two GEMVs, a softmax and copies launched apart otherwise): at batch 1
    a decode step took 2.60 ms against 2.70 with `_batched_products` on an H200; at batch 512 it was slower."""
    scores = (query.float() * key.float()).sum(-1) * scale  # (rows, heads, slots)
    if mask is not None:  # (rows, 1, 1, slots)
        mask = mask[:, :, 0]
        scores = scores.masked_fill(~mask, -float("inf")) if mask.dtype == torch.bool else scores + mask
    out = (scores.softmax(dim=-1)[..., None] * value.float()).sum(2)  # (rows, heads, dim)
    return out.to(value.dtype)[:, None].contiguous()


def _by_rows(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None, scale: float, up_to: int
) -> torch.Tensor:
    """`_reductions` for up to `up_to` rows (`StaticOptions.reductions_up_to`) when compiled (launches matter there,
    and only the compiler fuses them), `_batched_products` above and in eager runs (a quantized model's)."""
    fused = torch.compiler.is_compiling() and query.shape[0] <= up_to
    attend = _reductions if fused else _batched_products
    return attend(query, key, value, mask, scale)


@functools.cache
def one_query_attention(reductions_up_to: int) -> Callable[..., tuple[torch.Tensor, None]]:
    """The attention of captune's static loops: `_by_rows` for a one-token step, with `_reductions` up to
    `reductions_up_to` rows. One function per value (the same object at every call: the compiled step's guards see
    the function they were recorded with)."""

    def by_rows(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: Any, scale: float) -> torch.Tensor:
        return _by_rows(query, key, value, mask, scale, reductions_up_to)

    return one_query(by_rows)


@contextmanager
def static_attention(model: Blip2Like) -> Iterator[None]:
    """Within it, a language model on SDPA attention runs `one_query_attention` (STATIC_ATTENTION) with the model's
    `StaticOptions`; any other implementation is left as it is."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    config = blip_of(model).language_model.config
    implementation = config._attn_implementation
    if implementation != "sdpa":
        yield
        return
    settings = fast_path(model).options
    AttentionInterface.register(STATIC_ATTENTION, one_query_attention(settings.reductions_up_to))
    AttentionMaskInterface.register(STATIC_ATTENTION, sdpa_mask)  # the masks SDPA gets: boolean, (rows, 1, q, kv)
    config._attn_implementation = STATIC_ATTENTION
    try:
        with fused_qkv(model), gemv_linears(model):
            yield
    finally:
        config._attn_implementation = implementation
