"""The static decoder's compiled parts (image side, prefill, cache reorder) against their eager versions, and the
one-launch reset of its caches."""

from __future__ import annotations

import pytest
import torch

from captune.generation.inputs import text_inputs
from captune.generation.static import decoder, fast_path
from captune.model import LoadedModel

from .conftest import _traced_compiles


def test_the_compiled_cache_reorder_moves_what_the_eager_one_moves() -> None:
    """On a GPU beam search reorders the cache with the compiled `_reorder_rows` (the region grows every step, so
    its end becomes a dynamic size); compiled here on the CPU, it must match the eager function step by step."""

    torch.manual_seed(0)
    compiled = [torch.randn(6, 2, 10, 4) for _ in range(3)]
    eager = [t.clone() for t in compiled]
    for stop in (4, 5, 6):
        sources = torch.randint(0, 6, (6,))
        decoder._reorder_rows(eager, sources, 3, stop)
        decoder._compiled_reorder()(compiled, sources, 3, stop)
        assert all(torch.equal(a, b) for a, b in zip(compiled, eager, strict=True)), stop


def test_the_compiled_image_side_is_one_graph_that_gives_the_eager_features(
    tiny: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    # On a GPU the static loops run it with CUDA graphs for small batches; here dynamo traces it whole (fullgraph:
    # a graph break would fail) and runs the traced graph as is.

    asked = _traced_compiles(monkeypatch)
    blip = tiny.model
    size = tiny.processor.image_processor.size
    pixels = torch.randn(2, 3, size["height"], size["width"], generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad():
            compiled = decoder.compiled_image_side(blip)
            assert decoder.compiled_image_side(blip) is compiled  # once per model
            eager = blip.get_image_features(pixel_values=pixels, return_dict=True).pooler_output
            assert torch.equal(compiled(pixels), eager)
    finally:
        fast_path(blip).image_side = None  # the shared tiny model as it was
    assert asked == [{"mode": "reduce-overhead", "fullgraph": True}]


@pytest.mark.parametrize("images", [1, 2])
@pytest.mark.usefixtures("fresh_compiles")
def test_the_compiled_prefill_is_one_graph_that_fills_the_cache_as_the_eager_one(
    tiny: LoadedModel, monkeypatch: pytest.MonkeyPatch, images: int
) -> None:
    # On a GPU the static loops prefill small batches with CUDA graphs into a cache allocated ahead; here dynamo
    # traces the prefill whole (fullgraph: a graph break would fail) over such a cache and runs the traced graph.
    import inspect

    from transformers import StaticCache

    from captune.model import blip_of, embedded_inputs

    asked = _traced_compiles(monkeypatch)
    blip = blip_of(tiny.model)
    lm = blip.language_model
    name = "cache" if "cache" in inspect.signature(lm.forward).parameters else "past_key_values"
    inputs = text_inputs(tiny.model, tiny.processor, images, prompt="a picture of")
    size = tiny.processor.image_processor.size
    pixels = torch.randn(images, 3, size["height"], size["width"], generator=torch.Generator().manual_seed(0))
    total = inputs["input_ids"].shape[1] + 4
    mask, positions = torch.ones((images, total), dtype=torch.long), torch.arange(inputs["input_ids"].shape[1])
    filled = []
    with torch.no_grad():
        embeds = embedded_inputs(blip, inputs["input_ids"], pixels)
        for prefill in (decoder._prefill_logits, decoder._compiled_prefill()):
            cache = StaticCache(config=lm.config, max_cache_len=total)
            decoder._initialize(cache, lm.config, images, embeds.dtype, embeds.device)
            allocated = [layer.keys.data_ptr() for layer in cache.layers]
            logits = prefill(lm, embeds, mask, positions, name, cache)
            assert [layer.keys.data_ptr() for layer in cache.layers] == allocated  # written in place
            filled.append((logits, [(layer.keys, layer.values) for layer in cache.layers]))
    (eager_logits, eager_cache), (compiled_logits, compiled_cache) = filled
    assert eager_logits.shape == (images, lm.config.vocab_size)
    assert torch.equal(compiled_logits, eager_logits)
    written = positions.numel()
    for (keys, values), (eager_keys, eager_values) in zip(compiled_cache, eager_cache, strict=True):
        assert torch.equal(keys, eager_keys) and torch.equal(values, eager_values)
        assert keys[:, :, :written].abs().sum() > 0 and keys[:, :, written:].abs().sum() == 0
    assert asked == [{"mode": "reduce-overhead", "fullgraph": True}]


def test_emptying_a_static_cache_in_one_launch_is_its_reset(tiny: LoadedModel) -> None:
    from transformers import StaticCache

    from captune.generation.static.decoder import _initialize, _reset

    config = tiny.model.language_model.config
    caches = [StaticCache(config=config, max_cache_len=7) for _ in range(2)]
    for cache in caches:
        _initialize(cache, config, 2, torch.float32, torch.device("cpu"))
        for layer in cache.layers:
            layer.keys.normal_()
            layer.values.normal_()
            layer.cumulative_length.fill_(5)
    never_written = StaticCache(config=config, max_cache_len=7)
    _reset(never_written)  # (nothing to zero: a cache whose call failed before its prefill)
    assert not any(layer.is_initialized for layer in never_written.layers)
    caches[0].reset()
    _reset(caches[1])
    for reset, ours in zip(caches[0].layers, caches[1].layers, strict=True):
        assert ours.keys.abs().sum() == 0 and ours.values.abs().sum() == 0 and int(ours.cumulative_length) == 0
        assert torch.equal(reset.keys, ours.keys) and int(reset.cumulative_length) == 0


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("copies", [1, 3])
def test_the_graphed_steps_forward_gives_the_compiled_steps_logits(
    tiny: LoadedModel, copies: int, padded: bool
) -> None:
    """A large batch's decode step is `GraphedStep`: the eager step recorded as a CUDA graph, with its own input
    tensors and the not-yet-written slots hidden by a mask made from the position. Run eagerly here (no CUDA graph on
    a CPU), its forward must give the usual step's logits, step after step, and write the same cache; `padded`: a
    question per row, left-padded, the pads taken into its own tensors (`GraphedStep.pad`)."""
    from captune.generation.static.attention import static_attention
    from captune.model import blip_of

    prompt = ["Question: what colour is the large shape? Answer:", "a"] if padded else "a picture of"
    inputs = text_inputs(tiny.model, tiny.processor, 2, prompt=prompt)
    mask = inputs["attention_mask"] if padded else None
    size = tiny.processor.image_processor.size
    pixels = torch.randn(2, 3, size["height"], size["width"], generator=torch.Generator().manual_seed(0))
    new = 5
    with torch.no_grad(), static_attention(tiny.model):
        usual = decoder.StaticDecoder(tiny.model, inputs["input_ids"], pixels, new, copies=copies, attention_mask=mask)
        other = decoder.StaticDecoder(tiny.model, inputs["input_ids"], pixels, new, copies=copies, attention_mask=mask)
        name = next(iter(other.cached))
        lm = blip_of(tiny.model).language_model
        graphed = decoder.GraphedStep(lm, other.cache, name, other.rows, other.prefix + new, torch.device("cpu"))
        graphed.pad(other.mask, other.shift)
        tokens = usual.first_logits.argmax(-1)
        for index in range(new - 1):
            expected = usual.step(tokens, index)
            graphed.tokens.copy_(tokens[:, None])
            graphed.at.copy_(other.positions[other.prefix + index : other.prefix + index + 1])
            assert torch.equal(graphed.forward(), expected), index
            tokens = expected.argmax(-1)
    for layer, other_layer in zip(usual.cache.layers, other.cache.layers, strict=True):
        assert torch.equal(layer.keys, other_layer.keys) and torch.equal(layer.values, other_layer.values)
        assert torch.equal(layer.cumulative_length, other_layer.cumulative_length)
