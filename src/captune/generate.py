"""Batched captioning: the one generation path that `captune caption`, evaluation and validation all use."""

from __future__ import annotations

import functools
import inspect
import types
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset
from transformers import Blip2Processor

from captune.config import GenerateConfig
from captune.data import freeze_inherited_objects
from captune.data.images import device_pixels, processed_pixels
from captune.errors import CaptuneError
from captune.model import Blip2Like
from captune.step import attention_kernels


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
    prompt: str = "",
    caches: StaticCaches | None = None,
    image_features: torch.Tensor | None = None,
) -> list[str]:
    """Captions one batch of preprocessed images (the image processor's `pixel_values`). `caches`: static KV caches
    to reuse from an earlier batch of the same run (see StaticCaches); `image_features`: the batch's projected
    Q-Former output when already computed (captune's static loops then skip the image side).

    The text input is what `Blip2Processor(images=..., text=prompt)` builds: the image tokens, then the tokenized
    prompt. Decoder-only models get left padding, so every row's prompt ends right where generation starts. The
    prompt is fed to the model and stripped from the output, which holds only the new tokens.
    """
    from captune.step import blip_of

    device = next(model.parameters()).device
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    tokenizer = processor.tokenizer
    was_training = model.training
    if was_training:  # (a walk over ~1,300 modules of the real model: a millisecond of a single caption)
        model.eval()
    pixel_values = pixel_values.to(device, dtype, non_blocking=True)
    own = options.static_cache and _own_loop_applies(model, options)
    blip = blip_of(model) if own else None  # (the static loops' model; `generate` takes any)
    if own and caches is None and len(pixel_values) * options.num_beams <= HELD_CACHE_ROWS:
        caches = vars(blip).setdefault("_captune_caches", {})  # the next small call reuses them
    with attention_kernels(options.cudnn_attention):
        small = len(pixel_values) <= COMPILED_IMAGE_SIDE_UP_TO
        if own and image_features is None and small and _compiles(blip, device):
            # first, so that the GPU works while the host sets up the rest; a copy: the graph's output is reused
            image_features = _compiled_image_side(blip)(pixel_values).clone()
        inputs = text_inputs(model, processor, len(pixel_values), prompt)
        if own:
            own_loop = static_greedy if options.num_beams == 1 else static_beam
            with static_attention(model):
                output = own_loop(model, inputs["input_ids"], pixel_values, options, caches, image_features)
        else:
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
            if not _is_encoder_decoder(model):
                output = output[:, inputs["input_ids"].shape[1] :]
    if was_training:
        model.train()
    texts = tokenizer.batch_decode(output, skip_special_tokens=True)
    return [_clean(t, prompt) for t in texts]


def text_inputs(model: Blip2Like, processor: Blip2Processor, rows: int, prompt: str = "") -> dict[str, torch.Tensor]:
    """`input_ids` and `attention_mask` of `rows` images on the model's device, as `Blip2Processor(images=...,
    text=prompt)` builds them: the image tokens, then the tokenized prompt (left-padded for decoder-only models)."""
    tokenizer = processor.tokenizer
    tokenizer.padding_side = "right" if _is_encoder_decoder(model) else "left"
    text = tokenizer([prompt] * rows, padding=True)
    image_tokens = tokenizer(processor.image_token.content * processor.num_query_tokens, add_special_tokens=False)
    device = next(model.parameters()).device
    # non_blocking: copied from pageable memory through a staging buffer at once, without waiting for the GPU's queue
    return {
        key: torch.tensor([image_tokens[key] + row for row in text[key]]).to(device, non_blocking=True)
        for key in ("input_ids", "attention_mask")
    }


HELD_CACHE_ROWS = 8
"""The most rows (images x beams) whose static caches a `generate_from_pixels` call without `caches` (a single
caption, a server's request) keeps on the model for the next one (~20 MB a row for OPT-2.7B and 30 new tokens):
allocating them anew took ~2.4 ms of a single caption's host time on an H100 while the GPU waited, and the compiled
steps' CUDA graphs read them at the addresses they were recorded with. (Like those graphs, they are per model: one
model does not caption from several threads at once; `captune serve` calls it from one.)"""


def _own_loop_applies(model: Blip2Like, options: GenerateConfig) -> bool:
    """captune's own static-cache loops (`static_greedy`, `static_beam`) cover decoder-only models without a
    repetition penalty; a penalty and Flan-T5 go through `generate` (with its static cache)."""
    return options.repetition_penalty == 1.0 and not _is_encoder_decoder(model)


STATIC_CACHE_PAYS_FROM_GREEDY, STATIC_CACHE_PAYS_FROM_BEAMS = 10_000, 3_000
"""Images from which a run captions faster with `generate.static_cache` despite its compiling warm-up, greedy and
with beam search. From the H100/H200 numbers in benchmarks/README.md: greedy 428 captions/s static (batch 512,
33-57 s warm-up) against ~183 without (batch 256); beam 5 133 (batch 128, ~72 s warm-up) against ~34 (batch 64)."""


def static_cache_advice(images: int, options: GenerateConfig, device_type: str, own_loop: bool) -> str | None:
    """A note for a run of `images` that would be faster with the static cache (None when it is on, the run is too
    short to pay for the warm-up, the device is not a GPU, or the model does not run captune's own loops)."""
    pays_from = STATIC_CACHE_PAYS_FROM_GREEDY if options.num_beams == 1 else STATIC_CACHE_PAYS_FROM_BEAMS
    if options.static_cache or images < pays_from or device_type != "cuda" or not own_loop:
        return None
    return (
        f"note: {images} images: --static-cache (generate.static_cache=true) is faster from about {pays_from} "
        f"images at {'greedy' if options.num_beams == 1 else 'beam search'} after a 30-70 s compiling warm-up "
        f"(on an H100: 428 greedy captions/s at --batch-size 512, 133 with beam 5 at 128; see benchmarks/README.md)"
    )


STATIC_CHECK_EVERY = 8
"""Decode steps between the checks whether generation has ended (each check waits for the GPU)."""


def _check_at(index: int, options: GenerateConfig) -> bool:
    """Whether the static loops look after new token number `index` if generation has ended: every
    STATIC_CHECK_EVERY steps, once a row may have ended (EOS is banned before `min_new_tokens`, so no earlier
    check can stop anything, and each one drains the GPU's queue)."""
    return (index + 1) % STATIC_CHECK_EVERY == 0 and index >= options.min_new_tokens


STATIC_ATTENTION = "captune_static_cache"
"""The attention implementation the language model runs under in captune's static loops (registered with
transformers' AttentionInterface): the prefill is SDPA's; a one-token step is `_one_query_attention`."""


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


REDUCTIONS_UP_TO = 32
"""The most rows whose one-query attention is `_reductions` (more: `_batched_products`)."""


def _by_rows(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """`_reductions` for up to REDUCTIONS_UP_TO rows when compiled (launches matter there, and only the compiler
    fuses them), `_batched_products` above and in eager runs (a quantized model's)."""
    fused = torch.compiler.is_compiling() and query.shape[0] <= REDUCTIONS_UP_TO
    attend = _reductions if fused else _batched_products
    return attend(query, key, value, mask, scale)


_one_query_attention = one_query(_by_rows)
"""The attention of captune's static loops (`_by_rows` for a one-token step)."""


@contextmanager
def static_attention(model: Blip2Like) -> Iterator[None]:
    """Within it, a language model on SDPA attention runs `_one_query_attention` (STATIC_ATTENTION); any other
    implementation is left as it is."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    from captune.step import blip_of

    config = blip_of(model).language_model.config
    implementation = config._attn_implementation
    if implementation != "sdpa":
        yield
        return
    AttentionInterface.register(STATIC_ATTENTION, _one_query_attention)
    AttentionMaskInterface.register(STATIC_ATTENTION, sdpa_mask)  # the masks SDPA gets: boolean, (rows, 1, q, kv)
    config._attn_implementation = STATIC_ATTENTION
    try:
        with fused_qkv(model), gemv_linears(model):
            yield
    finally:
        config._attn_implementation = implementation


def _fused_qkv_forward(self: Any, hidden_states: torch.Tensor, attention_mask: Any = None, **kwargs: Any) -> tuple:
    """OPT's attention forward (as transformers 5.17-5.24 write it) with q, k and v projected by one GEMM over the
    layer's concatenated weights (`fused_qkv`); the rest as transformers does it, over a static cache."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.opt.modeling_opt import eager_attention_forward

    cache = kwargs.pop("cache", None)  # `past_key_values` before transformers 5.24
    cache = kwargs.pop("past_key_values", cache)
    kwargs.pop("output_attentions", None)
    rows, length, width = hidden_states.shape
    qkv = _linear(hidden_states, self.captune_qkv_weight, self.captune_qkv_bias)
    query, key, value = (
        part.reshape(rows, length, self.num_heads, self.head_dim).transpose(1, 2) for part in qkv.split(width, dim=-1)
    )
    query = query * self.scaling  # after the projection, as OPT scales it
    if cache is not None:
        key, value = cache.update(key, value, self.layer_idx)
    attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
    out, weights = attention(self, query, key, value, attention_mask, dropout=0.0 if not self.training else
                             self.dropout, scaling=1.0, **kwargs)  # fmt: skip
    return self.out_proj(out.reshape(rows, length, -1).contiguous()), weights


@contextmanager
def fused_qkv(model: Blip2Like) -> Iterator[None]:
    """Within it (captune's static loops), each OPT attention layer whose q, k and v projections are plain linear
    layers (merged or no adapter, not quantized, not sharded) computes them with one GEMM over their concatenated
    weights: at batch 1 the three 13 MB GEMVs of OPT-2.7B ran at ~1.67 TB/s on an H100, the 39 MB one runs faster (a
    decode step 3.50 -> 3.28 ms, measured). The concatenation is a buffer at a fixed address (the compiled step's CUDA
    graphs read it there) of which the three projections' weights (and biases) become views (`_fuse_as_views`): no
    more memory, nothing copied at each call, and weights changed in place since (training, a merge's `.data +=`)
    are already there."""
    from transformers.models.opt.modeling_opt import OPTAttention

    from captune.step import blip_of

    plain = ("q_proj", "k_proj", "v_proj")
    lm = blip_of(model).language_model
    if "_captune_attention_layers" not in vars(lm):  # found once (a walk over its modules: host time at every call)
        vars(lm)["_captune_attention_layers"] = [m for m in lm.modules() if isinstance(m, OPTAttention)]
    # (submodules and buffers read through the modules' dicts: nn.Module's attribute hooks cost host time at every
    # call)
    layers = [m for m in vars(lm)["_captune_attention_layers"] if all(_plain(m._modules[n]) for n in plain)]
    with torch.no_grad():
        for layer in layers:
            parts = [layer._modules[name]._parameters for name in plain]
            tensors = [p["weight"] for p in parts] + [p.get("bias") for p in parts]
            if _pointers(layer, tensors) != vars(layer).get("_captune_qkv_pointers"):  # (else all viewed already)
                _fuse_as_views(layer, "captune_qkv_weight", tensors[:3])
                _fuse_as_views(layer, "captune_qkv_bias", tensors[3:])
                vars(layer)["_captune_qkv_pointers"] = _pointers(layer, tensors)
    with _forwards(layers, _fused_qkv_forward):
        yield


@contextmanager
def _forwards(modules: list[nn.Module], forward: Callable[..., Any]) -> Iterator[None]:
    """Within it, each module's forward is `forward` bound to it (set in the module's dict: nn.Module's attribute
    hooks cost host time at every call); its class's forward again on leaving."""
    for module in modules:
        vars(module)["forward"] = types.MethodType(forward, module)
    try:
        yield
    finally:
        for module in modules:
            vars(module).pop("forward", None)


GEMV_UP_TO = 1
"""The most rows (tokens in a call) whose linear layers the compiled static loops compute as `_gemv` reductions
(`gemv_linears`), tuned by the compiler's coordinate descent; more rows go to cuBLAS (`F.linear`). 1: a single
caption's decode step. Measured on an H100 (benchmarks/README.md, session 9), a single caption in alternate calls of
one process: 95.4 ms median against 101.7 with cuBLAS, faster at each of the 20 quantiles; its decode step 2.82
against 3.10 ms (session 8). With the compiler's own reduction configurations they were slower than cuBLAS (3.13
against 3.05 ms a step). The cost: the first single caption of a process compiles ~60 s longer (the tuning: 130
against 72 s on an H100), the patched forwards add ~0.2 ms of guard checks to each compiled call, and the tuned step
varies between processes (2.72-2.92 ms in the first process on a machine, 2.88-3.42 in later ones; cuBLAS
3.00-3.10). 0 patches nothing."""


def _gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)` as one float32 reduction over each weight row, in x's dtype. Compiled, it is a
    reduction kernel that reads each weight row once and takes the bias and a following activation along; for one row
    cuBLAS's kernels read OPT-2.7B's weights at 2.2-2.5 TB/s of an H100's 3.35 (the decode step's profile,
    benchmarks/README.md, session 8)."""
    out = (x.unsqueeze(-2).float() * weight.float()).sum(-1)
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`_gemv` for up to GEMV_UP_TO rows while compiling (eager, the reduction would be materialised), else
    `F.linear`."""
    if torch.compiler.is_compiling() and x.numel() <= GEMV_UP_TO * x.shape[-1]:
        return _gemv(x, weight, bias)
    return nn.functional.linear(x, weight, bias)


def _linear_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """nn.Linear's forward by `_linear` (`gemv_linears`)."""
    return _linear(x, self.weight, self.bias)


@contextmanager
def gemv_linears(model: Blip2Like) -> Iterator[None]:
    """Within it (captune's static loops), the language model's plain linear layers (the attention's output
    projection, the feed-forward layers, the LM head; merged or no adapter, not quantized) run `_linear`: a one-token
    decode step's matrix-vector products become the compiler's reductions; the prefill keeps its GEMMs."""
    from captune.step import blip_of

    if GEMV_UP_TO < 1:  # nothing patched: no host time, no guards in the compiled calls
        yield
        return
    lm = blip_of(model).language_model
    if "_captune_linears" not in vars(lm):  # found once (a walk over its modules: host time at every call)
        vars(lm)["_captune_linears"] = [m for m in lm.modules() if type(m) is nn.Linear]  # (added later: F.linear)
    with _forwards([m for m in vars(lm)["_captune_linears"] if type(m) is nn.Linear], _linear_forward):
        yield


def _plain(projection: nn.Module) -> bool:
    """Whether a projection is a plain linear layer (no adapter, not quantized) whose weight is an ordinary tensor with
    memory (not sharded, e.g. an FSDP2 DTensor, nor on the meta device, e.g. offloaded)."""
    weight = projection._parameters.get("weight") if type(projection) is nn.Linear else None
    return weight is not None and type(weight.data) is torch.Tensor and weight.device.type != "meta"


def _pointers(layer: nn.Module, tensors: list[torch.Tensor | None]) -> list[int]:
    """The addresses of the tensors and of the layer's fused buffers: unchanged since `fused_qkv` made the tensors
    views of the buffers, they still are."""
    held = [layer._buffers.get(name) for name in ("captune_qkv_weight", "captune_qkv_bias")]
    return [0 if t is None else t.data_ptr() for t in tensors + held]


def _fuse_as_views(module: nn.Module, name: str, parameters: list[torch.Tensor | None]) -> None:
    """Buffer `name` of `module` (not saved) holds `parameters` concatenated (along their first dimension), and each
    parameter's data is a view of its part of it; a buffer of None when any is None (a projection without bias).
    Parameters already viewing their part are left alone (a few pointer comparisons: the host time of a call); one
    given a new tensor since (`.data = ...`, `.to()`, a safe merge) is copied into its part again, into the held
    buffer where it still fits, so that its address stays. Under no_grad (the caller's)."""
    held = module._buffers.get(name)
    if any(p is None for p in parameters):
        module.register_buffer(name, None, persistent=False)
        return
    values = [p for p in parameters if p is not None]
    sizes = [p.shape[0] for p in values]
    fits = held is not None and (held.shape, held.dtype, held.device) == (
        (sum(sizes), *values[0].shape[1:]),
        values[0].dtype,
        values[0].device,
    )
    if held is None or not fits:  # a new buffer, made from the parameters (nothing to copy into it)
        held = torch.cat([p.detach() for p in values])
        module.register_buffer(name, held, persistent=False)
    for part, parameter in zip(held.split(sizes), values, strict=True):
        if parameter.data_ptr() != part.data_ptr() or parameter.shape != part.shape:
            if fits:
                part.copy_(parameter)
            parameter.data = part


class _StaticDecoder:
    """The language model of a BLIP-2 over a static KV cache, as captune's own loops use it: the prompt rows
    (image features in the prompt's embeddings, each row repeated `copies` times, as `generate` expands a batch for
    beam search) are prefilled once, then `step` feeds one token per row through the language model's compiled call
    (transformers' `get_compiled_call`: CUDA graphs on a GPU) with one constant mask, so every step has the same input
    shapes; causality comes from `cache_position`, which also hides the cache slots not written yet.

    Every row holds the same image tokens and prompt (no padding), as `generate_from_pixels` builds them.
    """

    def __init__(
        self,
        model: Blip2Like,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor,
        new_tokens: int,
        copies: int = 1,
        caches: StaticCaches | None = None,
        image_features: torch.Tensor | None = None,
    ) -> None:
        from transformers import CompileConfig

        from captune.step import blip_of, embedded_inputs

        blip = blip_of(model)
        self.lm = lm = blip.language_model
        config = lm.generation_config
        ids = config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id]
        self.eos = torch.tensor(ids).to(input_ids.device, non_blocking=True)  # (see text_inputs)
        self.pad = config.pad_token_id if config.pad_token_id is not None else ids[0]
        compiled = _compiles(blip, input_ids.device)
        embeds = embedded_inputs(blip, input_ids, pixel_values, image_features)
        images, self.prefix = embeds.shape[:2]
        self.rows = images * copies
        total = self.prefix + new_tokens
        device = embeds.device
        self.mask = torch.ones((self.rows, total), dtype=torch.long, device=device)
        self.positions = torch.arange(total, device=device)
        # transformers 5.24 renamed the cache argument (`past_key_values` still works there, with a warning, until 5.40)
        name = "cache" if "cache" in inspect.signature(lm.forward).parameters else "past_key_values"
        # The prefill runs once per image; with copies (beams) its cache rows are then repeated into the big cache.
        held = {} if caches is None else caches
        prefilled = _static_cache(held, "prefill", (images, total, embeds.dtype, device), lm.config)
        prefill = _prefill_logits
        if compiled and images <= COMPILED_PREFILL_UP_TO:
            prefill = _compiled_prefill()
            _initialize(prefilled, lm.config, images, embeds.dtype, device)  # the graph writes into its tensors
        logits = prefill(lm, embeds, self.mask[:images], self.positions[: self.prefix], name, prefilled)
        # a copy (repeat_interleave always makes one): a CUDA graph's output is overwritten by its next replay
        self.first_logits = logits.repeat_interleave(copies, dim=0)
        if copies == 1:
            self.cache = prefilled
        else:
            self.cache = _static_cache(held, "beams", (self.rows, total, embeds.dtype, device), lm.config)
            _repeat_rows(prefilled, self.cache, copies, self.prefix)
        self.cached = {name: self.cache}
        self.call = lm.get_compiled_call(CompileConfig()) if compiled else lm.__call__
        # A step of `_gemv` rows is compiled with the compiler's coordinate descent tuning: its reductions' own
        # configurations read the weights slower than cuBLAS (benchmarks/README.md, session 8). (Compiling it without
        # the compile caches on disk, so that each process tunes it anew, was measured in session 9 and not kept: a
        # later process on a machine tuned to slower configurations as often as one that took them from the caches.)
        self.tuning: Any = nullcontext()  # (entered at every step; a config patch can be entered again)
        if compiled and self.rows <= GEMV_UP_TO:
            import torch._inductor.config as inductor

            self.tuning = inductor.patch(coordinate_descent_tuning=True)
        self.move = _compiled_reorder() if compiled else _reorder_rows
        self.layers: list[torch.Tensor] = []
        for layer in self.cache.layers:  # StaticLayers, their tensors made by the prefill
            self.layers += [layer.keys, layer.values]  # type: ignore[union-attr,list-item]

    def step(self, tokens: torch.Tensor, index: int) -> torch.Tensor:
        """The next-token logits after feeding `tokens` (one per row) as new token number `index`."""
        at = self.positions[self.prefix + index : self.prefix + index + 1]
        with self.tuning:
            return self.call(input_ids=tokens[:, None], attention_mask=self.mask, use_cache=True, cache_position=at,
                             position_ids=at.expand(self.rows, 1), **self.cached).logits[:, -1]  # fmt: skip

    def reorder(self, sources: torch.Tensor, new_tokens: int) -> None:
        """Row r's cached new tokens become those of row sources[r] (beam search), in place: the compiled step reads
        the cache at fixed addresses. Only the new tokens move: the rows of one image share its prefix."""
        if new_tokens:
            self.move(self.layers, sources, self.prefix, self.prefix + new_tokens)

    def logits_after_ban(
        self, logits: torch.Tensor, index: int, min_new_tokens: int, log: bool = False
    ) -> torch.Tensor:
        """Float32 scores of new token number `index` as `generate` makes them: a copy (never written into a CUDA
        graph's output), log-softmaxed for beam search, EOS banned before `min_new_tokens` (in place with a Python
        value: assigning one by index would copy it to the GPU and wait)."""
        scores = logits.to(torch.float32, copy=True)
        if log:
            scores = torch.nn.functional.log_softmax(scores, dim=-1)
        if index < min_new_tokens:
            scores.index_fill_(1, self.eos, -float("inf"))
        return scores


COMPILED_IMAGE_SIDE_UP_TO = 32
"""The largest batch whose image side the static loops run compiled (`_compiled_image_side`). Measured on an H100:
one image's image side took 32.7 ms eager (launch-bound) and 5.6 ms compiled, the single-image caption 153 ->
137 ms; at batch 512 the compiled one was slower (0.585 s against 0.553 s eager); batches between were not
measured."""


def _compiles(blip: Any, device: torch.device) -> bool:
    """Whether the static loops compile their parts (CUDA graphs): on a GPU, for a model that is not quantized."""
    return device.type == "cuda" and getattr(blip, "hf_quantizer", None) is None


def _compiled_image_side(blip: Any) -> Any:
    """The image side (ViT-g, Q-Former, projection: pixels to projected query features) compiled with CUDA graphs,
    once per model (recorded once per batch size). Eager, it is ~1,000 small kernel launches: 32.7 ms for one image
    on an H100, a quarter of a single caption's latency, where the graph takes 5.6 ms."""
    compiled = getattr(blip, "_captune_image_side", None)
    if compiled is None:

        def image_side(pixels: torch.Tensor) -> torch.Tensor:
            return blip.get_image_features(pixel_values=pixels, return_dict=True).pooler_output

        compiled = torch.compile(image_side, mode="reduce-overhead", fullgraph=True)
        blip._captune_image_side = compiled
    return compiled


def _prefill_logits(lm: Any, embeds: torch.Tensor, mask: torch.Tensor, start: torch.Tensor, name: str,
                    cache: Any) -> torch.Tensor:  # fmt: skip
    """The language model's prefill of the prompt rows `embeds` into the static `cache` (passed as argument `name`):
    the next-token logits, (rows, vocabulary). The LM head runs on the last position only (`generate` runs it on
    every prompt position: 1.7 GB of logits and ~4 TFLOP at batch 512 with the 33-token prompt)."""
    return lm(inputs_embeds=embeds, attention_mask=mask, use_cache=True, cache_position=start,
              position_ids=start.expand(len(embeds), -1), logits_to_keep=1, **{name: cache}).logits[:, -1]  # fmt: skip


COMPILED_PREFILL_UP_TO = 32
"""The largest batch (images) whose prefill the static loops run compiled with CUDA graphs (`_compiled_prefill`).
Eager, the prefill is ~500 kernel launches, which at batch 1 keep the GPU waiting (~10 ms of host time by the
H100 profile against a few ms of GPU work); at large batches its GEMMs are long and launches do not matter."""


@functools.cache
def _compiled_prefill() -> Any:
    """`_prefill_logits` compiled with CUDA graphs (once per process; a function of its own, so that the decode
    step's compiled `forward` never sees the prefill's shapes and stays specialised to one-token steps)."""
    return torch.compile(_prefill_logits, mode="reduce-overhead", fullgraph=True)


def _initialize(cache: Any, config: Any, rows: int, dtype: torch.dtype, device: torch.device) -> None:
    """Allocates a static cache's tensors ahead of a compiled prefill (which may not allocate them itself while it is
    traced, and whose CUDA graph must see them at fixed addresses); nothing for an initialized cache."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    cache.early_initialization(rows, kv_heads, head_dim, dtype, device)


StaticCaches = dict[str, tuple[tuple, Any]]
"""Static KV caches kept from one batch to the next by `caption_paths` (a role, "prefill" or "beams", to its shape
and cache). Reusing a cache keeps its tensors at the same addresses, so the compiled step's CUDA graphs replay as
recorded instead of being recorded again for new ones; the caches live as long as the run that holds them."""


def _static_cache(held: StaticCaches, role: str, shape: tuple, config: Any) -> Any:
    """The cache of `held` for this role and shape (rows, length, dtype, device), emptied, or a new one (which
    replaces one of another shape)."""
    from transformers import StaticCache

    if role in held and held[role][0] == shape:
        cache = held[role][1]
        _reset(cache)
        return cache
    cache = StaticCache(config=config, max_cache_len=shape[1])
    held[role] = (shape, cache)
    return cache


def _reset(cache: Any) -> None:
    """`cache.reset()` (zeros, and each layer's next write at position 0) with one multi-tensor launch for all its
    initialized static layers instead of three small kernels a layer."""
    from transformers.cache_utils import StaticLayer

    tensors: list[torch.Tensor] = []
    for layer in cache.layers:
        if type(layer) is StaticLayer and layer.is_initialized:
            tensors += [layer.keys, layer.values, layer.cumulative_length]  # type: ignore[list-item]
        else:
            layer.reset()
    if tensors:  # (none in a cache never written, e.g. after a call that failed before its prefill)
        torch._foreach_zero_(tensors)


def _repeat_rows(source: Any, target: Any, copies: int, written: int) -> None:
    """Fills `target` with each row of `source` `copies` times (its first `written` positions) and positions it to
    write next at `written`: the prompt is prefilled once per image, not once per beam, as `generate` does it."""
    layers: list[Any] = list(target.layers)  # StaticLayers
    for from_layer, layer in zip(source.layers, layers, strict=True):
        keys = from_layer.keys[:, :, :written].repeat_interleave(copies, dim=0)
        values = from_layer.values[:, :, :written].repeat_interleave(copies, dim=0)
        if not layer.is_initialized:  # (rows, heads, length, dim) zeros at static addresses
            layer.lazy_initialization(keys, values)
        layer.keys[:, :, :written] = keys
        layer.values[:, :, :written] = values
        layer.cumulative_length.fill_(written)  # where the layer writes the next token


def _reorder_rows(tensors: list[torch.Tensor], sources: torch.Tensor, start: int, stop: int) -> None:
    """Positions start:stop of each (rows, heads, length, dim) tensor: row r's become row sources[r]'s, in place."""
    for held in tensors:
        held[:, :, start:stop] = held[sources, :, start:stop]


@functools.cache
def _compiled_reorder() -> Any:
    """`_reorder_rows` compiled (once per process) with dynamic sizes from the start: the eager indexing kernel
    gathers a slice of the cache element by element, 5.6 ms a step for beam 5 at batch 64 on an H100; the compiler's
    kernels copy each row and head's contiguous run of positions. Static at first, it was recompiled for each new
    size until dynamo made them dynamic, and a server's mix of sizes reached the recompile limit (8) exactly; dynamic,
    it settles on 4 graphs (sizes 1 specialised)."""
    return torch.compile(_reorder_rows, fullgraph=True, dynamic=True)


@torch.no_grad()
def static_greedy(
    model: Blip2Like,
    input_ids: torch.Tensor,
    pixel_values: torch.Tensor,
    options: GenerateConfig,
    caches: StaticCaches | None = None,
    image_features: torch.Tensor | None = None,
) -> torch.Tensor:
    """Greedy captions as `generate` makes them (min/max new tokens; a row that emitted EOS gets padding after it),
    over `_StaticDecoder`, without waiting for the GPU at every token: `generate` reads its stopping criteria from the
    GPU after each step, so the host cannot queue the next one. Here the host looks only every STATIC_CHECK_EVERY
    steps. Returns the new tokens only, (rows, up to max_new_tokens)."""
    decoder = _StaticDecoder(model, input_ids, pixel_values, options.max_new_tokens, caches=caches,
                             image_features=image_features)  # fmt: skip
    rows, eos, pad = decoder.rows, decoder.eos, decoder.pad
    tokens = torch.full((rows, options.max_new_tokens), pad, dtype=torch.long, device=input_ids.device)
    unfinished = torch.ones(rows, dtype=torch.bool, device=input_ids.device)
    logits = decoder.first_logits
    for i in range(options.max_new_tokens):
        scores = decoder.logits_after_ban(logits, i, options.min_new_tokens)
        chosen = torch.where(unfinished, scores.argmax(-1), pad)
        tokens[:, i] = chosen
        unfinished &= ~torch.isin(chosen, eos)
        if i + 1 == options.max_new_tokens or (_check_at(i, options) and not bool(unfinished.any())):
            return tokens[:, : i + 1]
        logits = decoder.step(chosen, i)
    return tokens


@torch.no_grad()
def static_beam(
    model: Blip2Like,
    input_ids: torch.Tensor,
    pixel_values: torch.Tensor,
    options: GenerateConfig,
    caches: StaticCaches | None = None,
    image_features: torch.Tensor | None = None,
) -> torch.Tensor:
    """Beam search as transformers' `generate` does it (its vectorised beam search of 4.50+: the top 2 x beams
    continuations of each image, EOS-ended ones scored with `length_penalty` into the finished set, `early_stopping`
    as the language model's generation config says), over `_StaticDecoder` with each image's beams as rows: the
    prompt is prefilled once per image (its cache rows repeated for the beams), the cache reordered in place after
    each step (only the new tokens' keys and values move), and the host checks whether to stop only every
    STATIC_CHECK_EVERY steps (steps past the point where `generate` stops change nothing: no candidate can enter a
    finished set then). Returns the best finished beam's new tokens per image, (images, max_new_tokens), padded after
    EOS."""
    beams, new = options.num_beams, options.max_new_tokens
    decoder = _StaticDecoder(model, input_ids, pixel_values, new, copies=beams, caches=caches,
                             image_features=image_features)  # fmt: skip
    images, device = input_ids.shape[0], input_ids.device
    config = decoder.lm.generation_config
    # What generate takes: the language model's generation config, unset fields at transformers' defaults.
    length_penalty = 1.0 if config.length_penalty is None else config.length_penalty
    early_stopping = False if config.early_stopping is None else config.early_stopping
    keep = max(2, 1 + len(decoder.eos)) * beams  # enough continuations that `beams` of them do not end
    among_top = torch.arange(keep, device=device) < beams
    never = -1.0e9
    running = torch.full((images, beams, new), decoder.pad, dtype=torch.long, device=device)
    running_scores = torch.zeros((images, beams), device=device)
    running_scores[:, 1:] = never  # the beams start equal: only the first one's continuations count at first
    finished = running.clone()
    finished_scores = torch.full((images, beams), never, device=device)
    is_finished = torch.zeros((images, beams), dtype=torch.bool, device=device)
    improvable = torch.ones((images, 1), dtype=torch.bool, device=device)
    first_row = torch.arange(images, device=device)[:, None] * beams
    logits = decoder.first_logits
    for i in range(new):
        scores = decoder.logits_after_ban(logits, i, options.min_new_tokens, log=True)
        vocabulary = scores.shape[-1]
        scores = (scores.view(images, beams, vocabulary) + running_scores[:, :, None]).view(images, -1)
        top_scores, top = scores.topk(keep)
        parent, token = top // vocabulary, top % vocabulary
        candidates = running.gather(1, parent[:, :, None].expand(-1, -1, new))
        candidates[:, :, i] = token
        ends = torch.isin(token, decoder.eos) | (i + 1 >= new)
        # The best `beams` candidates that did not end run on.
        alive_scores = top_scores + ends.to(torch.float32) * never
        chosen = alive_scores.topk(beams)[1]
        running = candidates.gather(1, chosen[:, :, None].expand(-1, -1, new))
        running_scores = alive_scores.gather(1, chosen)
        sources = (parent + first_row).gather(1, chosen).flatten()
        # Ended candidates among the top `beams` enter the finished set if they beat its worst.
        just_ended = ends & among_top
        ended_scores = top_scores / ((i + 1) ** length_penalty)
        ended_scores += (is_finished.all(-1, keepdim=True) & (early_stopping is True)).to(torch.float32) * never
        ended_scores += (~improvable).to(torch.float32) * never
        ended_scores += (~just_ended) * never
        merged_scores = torch.cat((finished_scores, ended_scores), dim=1)
        best = merged_scores.topk(beams)[1]
        finished = torch.cat((finished, candidates), dim=1).gather(1, best[:, :, None].expand(-1, -1, new))
        finished_scores = merged_scores.gather(1, best)
        is_finished = torch.cat((is_finished, just_ended), dim=1).gather(1, best)
        # Can a running beam still beat the worst finished one? (generate's heuristic, by early_stopping)
        length = new if early_stopping == "never" and length_penalty > 0.0 else i + 1
        worst = torch.where(is_finished, finished_scores.min(dim=1, keepdim=True)[0], never)
        improvable &= (running_scores[:, :1] / (length**length_penalty) > worst).any(dim=-1, keepdim=True)
        if i + 1 == new:
            break
        if _check_at(i, options):
            going = improvable.any() & ~(is_finished.all() & (early_stopping is True)) & ~ends.all()
            if not bool(going):
                break
        decoder.reorder(sources, i)
        logits = decoder.step(running[:, :, i].flatten(), i)
    return finished[:, 0]


def _clean(text: str, prompt: str) -> str:
    """Collapses whitespace and drops a repeat of the prompt at the start, as whole words only: prompt `a` must not
    eat the `a` of `at the top`."""
    text, prompt = " ".join(text.split()), " ".join(prompt.split())
    if prompt and (text == prompt or text.startswith(prompt + " ")):
        text = text[len(prompt) :].strip()
    return text


_Item = tuple[int, torch.Tensor | None, str | None]
"""An image's position in the input, its pixels, and the error that kept it from having pixels."""


class _Preprocessed(Dataset):
    """An image file as the model takes it (decoded, resized, normalised), or why it cannot be used."""

    def __init__(self, paths: Sequence[Path], processor: Blip2Processor) -> None:
        self.paths, self.image_processor = list(paths), processor.image_processor

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> _Item:
        try:
            return index, processed_pixels(self.paths[index], self.image_processor), None
        except CaptuneError as err:
            return index, None, str(err)


def _as_batch(items: list[_Item]) -> list[_Item]:
    """Keeps a batch as its list of items: stacking waits until the failed images are left out."""
    return items


def caption_paths(
    model: Blip2Like,
    processor: Blip2Processor,
    paths: Iterable[Path],
    options: GenerateConfig,
    prompt: str = "",
    num_workers: int = 0,
) -> Iterator[CaptionResult]:
    """Captions image files in batches of `options.batch_size`, in input order; an unreadable file yields a result
    with its error and the others are captioned.

    With `num_workers` > 0, worker processes decode and preprocess the next batches while the model captions this
    one, so the GPU does not wait for JPEG decoding. Each worker makes a share of a batch (batch_size / num_workers
    images; up to 2 shares ahead, i.e. about 2 batches in flight), not a whole batch: all workers make the first
    batch together, so it is ready after 1 / num_workers of the time one worker would take.
    """
    files = list(paths)
    device = next(model.parameters()).device
    share = -(-options.batch_size // num_workers) if num_workers else options.batch_size
    loader = DataLoader(
        _Preprocessed(files, processor),
        batch_size=share,
        num_workers=num_workers,
        collate_fn=_as_batch,
        prefetch_factor=2 if num_workers else None,
        pin_memory=device.type == "cuda",
        worker_init_fn=freeze_inherited_objects,
    )
    # A compiled static-cache step is compiled once per batch size: a short batch (the last one, or one with
    # unreadable files) is filled up with copies of its last image, whose captions are dropped.
    batches = _regrouped(loader, options.batch_size)
    if options.static_cache and _own_loop_applies(model, options):
        yield from _static_captions(model, processor, files, batches, options, prompt)
        return
    for batch in batches:
        good, pixels = _good_pixels(batch, device, 0)
        captions = generate_from_pixels(model, processor, pixels, options, prompt)[: len(good)] if good else []
        yield from _results(files, batch, good, captions)


def _good_pixels(batch: list[_Item], device: torch.device, fill_to: int) -> tuple[list[tuple[int, torch.Tensor]], Any]:
    """The readable images of a batch, and their pixels stacked on `device` (filled up to `fill_to` rows with copies
    of the last image), or None when there are none. Each image goes to the GPU from the loader's pinned memory
    without waiting, and is stacked there: stacking on the host would first copy the batch (154 MB at 256 images)
    into unpinned memory."""
    good = [(index, pixels) for index, pixels, _ in batch if pixels is not None]
    if not good:
        return good, None
    pixels = [p.to(device, non_blocking=True) for _, p in good]
    pixels += pixels[-1:] * max(0, fill_to - len(pixels))
    return good, torch.stack(pixels)


def _results(
    files: list[Path], batch: list[_Item], good: list[tuple[int, torch.Tensor]], captions: list[str]
) -> Iterator[CaptionResult]:
    done = {index: caption for (index, _), caption in zip(good, captions, strict=True)}
    for index, _, error in batch:
        yield CaptionResult(str(files[index]), done.get(index), error)


def _static_captions(
    model: Blip2Like,
    processor: Blip2Processor,
    files: list[Path],
    batches: Iterable[list[_Item]],
    options: GenerateConfig,
    prompt: str,
) -> Iterator[CaptionResult]:
    """`caption_paths` through captune's static loops: batches filled up to one size (one compilation: a short batch,
    the last one or one with unreadable files, gets copies of its last image, whose captions are dropped), one set of
    static caches for the whole run, and each batch's image side (ViT-g, Q-Former, projection) computed on a second
    CUDA stream while the previous batch decodes: the image side is large GEMMs, a decode step small ones that leave
    most of the GPU idle."""
    from captune.step import blip_of

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
                good, pixels = _good_pixels(batch, device, options.batch_size)
                features = None
                if good:
                    pixels = pixels.to(dtype)  # here, on this stream: generate_from_pixels then has nothing to convert
                    with torch.no_grad(), attention_kernels(options.cudnn_attention):
                        features = blip.get_image_features(pixel_values=pixels, return_dict=True).pooler_output
                ready = side.record_event() if side is not None else None
            if pending is not None:
                yield from _static_batch(model, processor, files, options, prompt, caches, main, *pending)
            pending = (batch, good, pixels, features, ready)
        if pending is not None:
            yield from _static_batch(model, processor, files, options, prompt, caches, main, *pending)
    finally:
        model.train(was_training)


def _static_batch(
    model: Blip2Like,
    processor: Blip2Processor,
    files: list[Path],
    options: GenerateConfig,
    prompt: str,
    caches: StaticCaches,
    main: Any,
    batch: list[_Item],
    good: list[tuple[int, torch.Tensor]],
    pixels: torch.Tensor | None,
    features: torch.Tensor | None,
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
        captions = generate_from_pixels(model, processor, pixels, options, prompt, caches, features)[: len(good)]
    yield from _results(files, batch, good, captions)


def _regrouped(chunks: Iterable[list[_Item]], size: int) -> Iterator[list[_Item]]:
    """The items of consecutive chunks, in order, in lists of `size` (the last one shorter)."""
    pending: list[_Item] = []
    for chunk in chunks:
        pending.extend(chunk)
        while len(pending) >= size:
            yield pending[:size]
            pending = pending[size:]
    if pending:
        yield pending


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
