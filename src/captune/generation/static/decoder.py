"""`StaticDecoder`: the language model over static KV caches, its compiled prefill, step and cache reorder, and the
caches kept between calls."""

from __future__ import annotations

import functools
import inspect
from contextlib import nullcontext
from typing import Any

import torch

from captune.generation.static.fast_path import StaticCaches, fast_path
from captune.model import Blip2Like, blip_of, embedded_inputs, stop_token_ids


class StaticDecoder:
    """The language model of a BLIP-2 over a static KV cache, as captune's own loops use it: the prompt rows
    (image features in the prompt's embeddings, each row repeated `copies` times, as `generate` expands a batch for
    beam search) are prefilled once, then `step` feeds one token per row through the language model's compiled call
    (transformers' `get_compiled_call`: CUDA graphs on a GPU) with one mask for all steps, so every step has the same
    input shapes; causality comes from `cache_position`, which also hides the cache slots not written yet.

    Rows with prompts of different lengths (a question each) come left-padded with their `attention_mask`, as
    `text_inputs` builds them: the pad slots stay masked in the prefill and in every step, and each row's positions
    count its own tokens only, as `generate` computes them from the mask (`_padding`), so the tokens are `generate`'s.
    Without a mask every row holds the same prompt. What runs compiled follows the model's `StaticOptions`
    (`fast_path(model).options`).
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
        attention_mask: torch.Tensor | None = None,
    ) -> None:
        from transformers import CompileConfig

        blip = blip_of(model)
        settings = fast_path(blip).options
        self.lm = lm = blip.language_model
        ids = stop_token_ids(model)
        self.eos = torch.tensor(ids).to(input_ids.device, non_blocking=True)  # (see text_inputs)
        pad = lm.generation_config.pad_token_id
        self.pad = pad if pad is not None else ids[0]
        compiled = compiles(blip, input_ids.device)
        embeds = embedded_inputs(blip, input_ids, pixel_values, image_features)
        images, self.prefix = embeds.shape[:2]
        self.rows = images * copies
        total = self.prefix + new_tokens
        device = embeds.device
        self.positions = torch.arange(total, device=device)
        image_mask, prefill_positions, self.shift = _padding(attention_mask, images, total, device)
        self.mask = image_mask.repeat_interleave(copies, dim=0) if copies > 1 else image_mask
        if self.shift is not None:
            self.shift = self.shift.repeat_interleave(copies, dim=0)
        # transformers 5.24 renamed the cache argument (`past_key_values` still works there, with a warning, until 5.40)
        name = "cache" if "cache" in inspect.signature(lm.forward).parameters else "past_key_values"
        # The prefill runs once per image; with copies (beams) its cache rows are then repeated into the big cache.
        held = {} if caches is None else caches
        prefilled = _static_cache(held, "prefill", (images, total, embeds.dtype, device), lm.config)
        prefill = _prefill_logits
        if compiled and images <= settings.compiled_prefill_up_to:
            prefill = _compiled_prefill()
            _initialize(prefilled, lm.config, images, embeds.dtype, device)  # the graph writes into its tensors
        logits = prefill(lm, embeds, image_mask, self.positions[: self.prefix], name, prefilled, prefill_positions)
        # a copy (repeat_interleave always makes one): a CUDA graph's output is overwritten by its next replay
        self.first_logits = logits.repeat_interleave(copies, dim=0)
        if copies == 1:
            self.cache = prefilled
        else:
            self.cache = _static_cache(held, "beams", (self.rows, total, embeds.dtype, device), lm.config)
            _repeat_rows(prefilled, self.cache, copies, self.prefix)
        self.cached = {name: self.cache}
        self.call = lm.get_compiled_call(CompileConfig()) if compiled else lm.__call__
        self.graphed: GraphedStep | None = None
        if compiled and self.rows > settings.compiled_step_up_to:
            role = "prefill" if copies == 1 else "beams"
            self.graphed = _graphed_step(held, role, (self.rows, total, embeds.dtype, device), lm, self.cache, name)
            self.graphed.pad(self.mask, self.shift)
        # A step of `_gemv` rows is compiled with the compiler's coordinate descent tuning: its reductions' own
        # configurations read the weights slower than cuBLAS (results/caption-single-latency-h100-gemv-default-configs
        # .json). (Compiling it without the compile caches on disk, so that each process tunes it anew, did not help: a
        # later process on a machine tuned to slower configurations as often as one that took them from the caches;
        # results/caption-single-latency-h100-no-compile-caches-reverted.json.)
        self.tuning: Any = nullcontext()  # (entered at every step; a config patch can be entered again)
        if compiled and self.rows <= settings.gemv_up_to:
            import torch._inductor.config as inductor

            self.tuning = inductor.patch(coordinate_descent_tuning=True)
        self.move = _compiled_reorder() if compiled else _reorder_rows
        self.layers: list[torch.Tensor] = []
        for layer in self.cache.layers:  # StaticLayers, their tensors made by the prefill
            self.layers += [layer.keys, layer.values]  # type: ignore[union-attr,list-item]

    def step(self, tokens: torch.Tensor, index: int) -> torch.Tensor:
        """The next-token logits after feeding `tokens` (one per row) as new token number `index`."""
        at = self.positions[self.prefix + index : self.prefix + index + 1]
        if self.graphed is not None:
            return self.graphed(tokens, at)
        positions = at.expand(self.rows, 1) if self.shift is None else at + self.shift
        with self.tuning:
            return self.call(input_ids=tokens[:, None], attention_mask=self.mask, use_cache=True, cache_position=at,
                             position_ids=positions, **self.cached).logits[:, -1]  # fmt: skip

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


class GraphedStep:
    """The language model's decode step over one static cache, run eagerly and recorded as one CUDA graph at its first
    call, then replayed: the step of a large batch (`StaticOptions.compiled_step_up_to`) without dynamo's tracing or
    Inductor's compile, whose warm-up costs tens of seconds a process. Its inputs live in tensors of its own (the
    tokens, the position) that each call fills, and so does a batch's padding (`pad`: the pad slots of left-padded
    rows, each row's position shift); the mask that hides the slots not written yet is made inside the graph from the
    position, as transformers' own mask hides them from `cache_position`; the cache is read and written
    at the addresses it was recorded with, so it lives as long as its cache (`_graphed_step`). Its output is the
    graph's: the next replay overwrites it (`logits_after_ban` copies it first)."""

    def __init__(self, lm: Any, cache: Any, name: str, rows: int, total: int, device: torch.device) -> None:
        self.lm, self.cache, self.name, self.rows = lm, cache, name, rows
        self.tokens = torch.zeros((rows, 1), dtype=torch.long, device=device)
        self.at = torch.zeros(1, dtype=torch.long, device=device)
        self.slots = torch.arange(total, device=device)
        self.kept = torch.ones((rows, total), dtype=torch.bool, device=device)
        self.shift = torch.zeros((rows, 1), dtype=torch.long, device=device)
        self.graph: Any = None
        self.logits: torch.Tensor | None = None

    def pad(self, mask: torch.Tensor, shift: torch.Tensor | None) -> None:
        """The next steps' padding: `mask` (rows, slots), 0 at pad slots; `shift` (rows, 1), each row's position
        minus its slot (None: no padding)."""
        self.kept.copy_(mask)
        if shift is None:
            self.shift.zero_()
        else:
            self.shift.copy_(shift)

    def forward(self) -> torch.Tensor:
        """The step on the held inputs: the next-token logits, (rows, vocabulary)."""
        visible = ((self.slots <= self.at)[None, :] & self.kept)[:, None, None, :]
        return self.lm(input_ids=self.tokens, attention_mask=visible, use_cache=True, cache_position=self.at,
                       position_ids=self.at + self.shift, **{self.name: self.cache}).logits[:, -1]  # fmt: skip

    def __call__(self, tokens: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
        self.tokens.copy_(tokens[:, None])
        self.at.copy_(at)
        if self.graph is None:
            self._record()
        self.graph.replay()
        assert self.logits is not None
        return self.logits

    def _record(self) -> None:
        """One eager run on a side stream (CUDA graphs need the libraries' lazy set-up done before they record), with
        the layers' write positions put back after it (the replay writes the same keys and values at the same
        position again), then the recording."""
        from transformers.cache_utils import StaticLayer

        lengths = [layer.cumulative_length for layer in self.cache.layers if type(layer) is StaticLayer]
        kept = [length.clone() for length in lengths]
        main = torch.cuda.current_stream()
        side = torch.cuda.Stream()
        side.wait_stream(main)
        with torch.cuda.stream(side):
            self.forward()
            for length, value in zip(lengths, kept, strict=True):
                length.copy_(value)
        main.wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self.logits = self.forward()


def _graphed_step(held: StaticCaches, role: str, shape: tuple, lm: Any, cache: Any, name: str) -> GraphedStep:
    """The `GraphedStep` over the cache of `held` for this role and shape, or a new one (a new cache: a new step)."""
    key = f"{role}-step"
    if key in held and held[key][0] == shape and held[key][1].cache is cache:
        return held[key][1]
    step = GraphedStep(lm, cache, name, shape[0], shape[1], shape[3])
    held[key] = (shape, step)
    return step


def compiles(blip: Any, device: torch.device) -> bool:
    """Whether the static loops compile their parts (CUDA graphs): on a GPU, for a model that is not quantized."""
    return device.type == "cuda" and getattr(blip, "hf_quantizer", None) is None


def compiled_image_side(blip: Any) -> Any:
    """The image side (ViT-g, Q-Former, projection: pixels to projected query features) compiled with CUDA graphs,
    once per model (kept on its `FastPath`; recorded once per batch size). Eager, it is ~1,000 small kernel launches:
    32.7 ms for one image on an H100, a quarter of a single caption's latency, where the graph takes 5.6 ms."""
    path = fast_path(blip)
    if path.image_side is None:

        def image_side(pixels: torch.Tensor) -> torch.Tensor:
            return blip.get_image_features(pixel_values=pixels, return_dict=True).pooler_output

        path.image_side = torch.compile(image_side, mode="reduce-overhead", fullgraph=True)
    return path.image_side


def _prefill_logits(lm: Any, embeds: torch.Tensor, mask: torch.Tensor, start: torch.Tensor, name: str,
                    cache: Any, positions: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """The language model's prefill of the prompt rows `embeds` into the static `cache` (passed as argument `name`):
    the next-token logits, (rows, vocabulary). `positions`: each row's position ids, (rows, prompt), for left-padded
    rows (None: the slots `start`). The LM head runs on the last position only (`generate` runs it on every prompt
    position: 1.7 GB of logits and ~4 TFLOP at batch 512 with the 33-token prompt)."""
    positions = start.expand(len(embeds), -1) if positions is None else positions
    return lm(inputs_embeds=embeds, attention_mask=mask, use_cache=True, cache_position=start,
              position_ids=positions, logits_to_keep=1, **{name: cache}).logits[:, -1]  # fmt: skip


def _padding(
    attention_mask: torch.Tensor | None, images: int, total: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The mask over a static cache's `total` slots of each image's row (0 at its prompt's pad slots, 1 elsewhere),
    and for padded rows their prefill position ids and their shift, (images, 1): a new token's position is its slot
    plus the shift. Positions are what `generate` gives left-padded rows (`_prepare_position_ids_for_generation`): the
    count of real tokens before, 0 at the pads; each new token's follows its row's last. None, None without a mask."""
    mask = torch.ones((images, total), dtype=torch.long, device=device)
    if attention_mask is None:
        return mask, None, None
    prompt = attention_mask.shape[1]
    mask[:, :prompt] = attention_mask
    positions = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
    return mask, positions, positions[:, -1:] + 1 - prompt


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
