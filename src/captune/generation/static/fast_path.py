"""`FastPath`: what captune's static loops keep for one model between calls (its options, held caches, the compiled
image side, the layers they patch), found through `fast_path(model)`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from captune.generation.compile_cache import use_compile_cache
from captune.generation.static.options import StaticOptions
from captune.model import Blip2Like, blip_of

StaticCaches = dict[str, tuple[tuple, Any]]
"""Static KV caches kept from one batch to the next (a role, "prefill" or "beams", to its shape and cache):
`caption_paths` holds one set for a run, `FastPath.caches` one for the calls that bring none. Reusing a cache keeps
its tensors at the same addresses, so the compiled step's CUDA graphs replay as recorded instead of being recorded
again for new ones; the caches live as long as whatever holds them."""


@dataclass(eq=False)
class FastPath:
    """captune's static loops for one model (`fast_path`): their options and what they keep between calls. Like the
    CUDA graphs it holds, it serves one thread at a time (`captune serve` captions from one)."""

    options: StaticOptions = field(default_factory=StaticOptions)
    """The loops' settings for this model; assign new ones to change the later calls (a benchmark's arms)."""
    caches: StaticCaches = field(default_factory=dict)
    """The static caches of the last call without its own of up to `options.held_cache_rows` rows, for the next."""
    image_side: Any = None
    """The compiled image side (`decoder.compiled_image_side`), made at its first use."""
    linears: list[nn.Linear] | None = None
    """The language model's plain linear layers, found at the first `linears.gemv_linears` (a walk over its modules
    at every call would cost host time)."""
    attention_layers: list[Any] | None = None
    """The language model's OPT attention layers (`OPTAttention`), found at the first `linears.fused_qkv`."""
    qkv_pointers: dict[nn.Module, list[int]] = field(default_factory=dict)
    """By attention layer: the addresses of its q, k and v parameters and fused buffers when `linears.fused_qkv` last
    made the parameters views of the buffers (the same addresses now: they still are)."""


_ATTRIBUTE = "_captune_fast_path"


def fast_path(model: Blip2Like) -> FastPath:
    """The model's `FastPath` (the same for a PEFT model and its base), made with the default options at the first
    call (which also points torch's compile caches at captune's cache directory: `compile_cache`). It is kept in the
    BLIP-2 module's dict, where it lives and dies with the model (its compiled image side
    holds the model)."""
    blip = blip_of(model)
    held = vars(blip).get(_ATTRIBUTE)
    if held is None:
        use_compile_cache()  # before the loops compile anything for this model
        held = vars(blip)[_ATTRIBUTE] = FastPath()
    return held
