"""The language model's linear layers in captune's static loops: q, k and v as one GEMM over views of one buffer
(`fused_qkv`), and one-row products as compiled reductions (`gemv_linears`)."""

from __future__ import annotations

import functools
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from captune.generation.static.fast_path import fast_path
from captune.model import Blip2Like, blip_of


def _fused_qkv_forward(
    self: Any, hidden_states: torch.Tensor, attention_mask: Any = None, *, gemv_up_to: int, **kwargs: Any
) -> tuple:
    """OPT's attention forward (as transformers 5.17-5.24 write it) with q, k and v projected by one GEMM over the
    layer's concatenated weights (`fused_qkv`; `_linear` with `gemv_up_to`); the rest as transformers does it, over a
    static cache."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.opt.modeling_opt import eager_attention_forward

    cache = kwargs.pop("cache", None)  # `past_key_values` before transformers 5.24
    cache = kwargs.pop("past_key_values", cache)
    kwargs.pop("output_attentions", None)
    rows, length, width = hidden_states.shape
    qkv = _linear(hidden_states, self.captune_qkv_weight, self.captune_qkv_bias, up_to=gemv_up_to)
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


@functools.cache
def _qkv_forward(gemv_up_to: int) -> Callable[..., tuple]:
    """`_fused_qkv_forward` with `gemv_up_to`, as a forward to bind to a layer: one function per value (the same
    object at every call: the compiled step's guards see the forward they were recorded with)."""

    def forward(self: Any, hidden_states: torch.Tensor, attention_mask: Any = None, **kwargs: Any) -> tuple:
        return _fused_qkv_forward(self, hidden_states, attention_mask, gemv_up_to=gemv_up_to, **kwargs)

    return forward


@contextmanager
def fused_qkv(model: Blip2Like) -> Iterator[None]:
    """Within it (captune's static loops), each OPT attention layer whose q, k and v projections are plain linear
    layers (merged or no adapter, not quantized, not sharded) computes them with one GEMM over their concatenated
    weights: at batch 1 the three 13 MB GEMVs of OPT-2.7B ran at ~1.67 TB/s on an H100, the 39 MB one runs faster (a
    decode step 3.50 -> 3.28 ms, measured). The concatenation is a buffer at a fixed address (the compiled step's CUDA
    graphs read it there) of which the three projections' weights (and biases) become views (`_fuse_as_views`): no
    more memory, nothing copied at each call, and weights changed in place since (training, a merge's `.data +=`)
    are already there. The layers and their pointers are kept on the model's `FastPath`."""
    from transformers.models.opt.modeling_opt import OPTAttention

    plain = ("q_proj", "k_proj", "v_proj")
    lm = blip_of(model).language_model
    path = fast_path(model)
    if path.attention_layers is None:  # found once (a walk over its modules: host time at every call)
        path.attention_layers = [m for m in lm.modules() if isinstance(m, OPTAttention)]
    # (submodules and buffers read through the modules' dicts: nn.Module's attribute hooks cost host time at every
    # call)
    layers = [m for m in path.attention_layers if all(_plain(m._modules[n]) for n in plain)]
    with torch.no_grad():
        for layer in layers:
            parts = [layer._modules[name]._parameters for name in plain]
            tensors = [p["weight"] for p in parts] + [p.get("bias") for p in parts]
            if _pointers(layer, tensors) != path.qkv_pointers.get(layer):  # (else all viewed already)
                _fuse_as_views(layer, "captune_qkv_weight", tensors[:3])
                _fuse_as_views(layer, "captune_qkv_bias", tensors[3:])
                path.qkv_pointers[layer] = _pointers(layer, tensors)
    with _forwards(layers, _qkv_forward(path.options.gemv_up_to)):
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


def _gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)` as one float32 reduction over each weight row, in x's dtype. Compiled, it is a
    reduction kernel that reads each weight row once and takes the bias and a following activation along; for one row
    cuBLAS's kernels read OPT-2.7B's weights at 2.2-2.5 TB/s of an H100's 3.35 (results/gemv-kernels-h100.json)."""
    out = (x.unsqueeze(-2).float() * weight.float()).sum(-1)
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *, up_to: int) -> torch.Tensor:
    """`_gemv` for up to `up_to` rows (`StaticOptions.gemv_up_to`) while compiling (eager, the reduction would be
    materialised), else `F.linear`."""
    if torch.compiler.is_compiling() and x.numel() <= up_to * x.shape[-1]:
        return _gemv(x, weight, bias)
    return nn.functional.linear(x, weight, bias)


@functools.cache
def _linear_forward(up_to: int) -> Callable[[nn.Linear, torch.Tensor], torch.Tensor]:
    """nn.Linear's forward by `_linear` with `up_to` (`gemv_linears`): one function per value, as `_qkv_forward`."""

    def forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        return _linear(x, self.weight, self.bias, up_to=up_to)

    return forward


@contextmanager
def gemv_linears(model: Blip2Like) -> Iterator[None]:
    """Within it (captune's static loops), the language model's plain linear layers (the attention's output
    projection, the feed-forward layers, the LM head; merged or no adapter, not quantized) run `_linear`: a one-token
    decode step's matrix-vector products become the compiler's reductions; the prefill keeps its GEMMs. Up to the
    model's `StaticOptions.gemv_up_to` rows; 0 patches nothing (no host time, no guards in the compiled calls)."""
    path = fast_path(model)
    up_to = path.options.gemv_up_to
    if up_to < 1:
        yield
        return
    if path.linears is None:  # found once (a walk over its modules: host time at every call)
        lm = blip_of(model).language_model
        path.linears = [m for m in lm.modules() if type(m) is nn.Linear]  # (added later: F.linear)
    with _forwards([m for m in path.linears if type(m) is nn.Linear], _linear_forward(up_to)):
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
