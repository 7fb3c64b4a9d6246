"""The static loops' linear layers: q, k and v as one GEMM over views of one buffer, and one-row products as
compiled reductions."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from captune.config import GenerateConfig
from captune.generation.core import generate_captions
from captune.generation.static import StaticOptions, decoder, fast_path, linears
from captune.model import LoadedModel

from ..conftest import _images


def test_static_loops_project_q_k_and_v_with_one_gemm_over_weights_of_the_moment(
    tiny: LoadedModel, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Within the static loops every OPT attention layer projects q, k and v with one GEMM over its concatenated
    weights, of which the projections' weights become views (nothing copied at a call); captions stay generate's,
    also after the weights change in place between calls or are given new tensors (copied in again, at the same
    address), the layers get their own forward back, and the model saves and loads as before."""
    from transformers import Blip2ForConditionalGeneration
    from transformers.models.opt.modeling_opt import OPTAttention

    layers = [m for m in tiny.model.language_model.modules() if isinstance(m, OPTAttention)]
    assert layers
    fused_calls: list[torch.Tensor] = []
    real_forward = linears._fused_qkv_forward

    def watched(self: Any, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        fused_calls.append(self.captune_qkv_weight)
        assert torch.equal(self.captune_qkv_weight, torch.cat([self.q_proj.weight, self.k_proj.weight,
                                                                 self.v_proj.weight]))  # fmt: skip
        return real_forward(self, hidden_states, *args, **kwargs)

    def viewed(layer: Any) -> bool:  # each projection's weight and bias are their part of the layer's buffers
        for buffer, kind in (("captune_qkv_weight", "weight"), ("captune_qkv_bias", "bias")):
            parts = [getattr(getattr(layer, n), kind) for n in ("q_proj", "k_proj", "v_proj")]
            held = getattr(layer, buffer).split([p.shape[0] for p in parts])
            if any(p.data_ptr() != h.data_ptr() or p.shape != h.shape for p, h in zip(parts, held, strict=True)):
                return False
        return True

    monkeypatch.setattr(linears, "_fused_qkv_forward", watched)
    options = GenerateConfig(num_beams=1, min_new_tokens=2, max_new_tokens=6)
    static = GenerateConfig(num_beams=1, min_new_tokens=2, max_new_tokens=6, static_cache=True)
    before = generate_captions(tiny.model, tiny.processor, _images(), options)
    assert generate_captions(tiny.model, tiny.processor, _images(), static) == before
    assert len(fused_calls) == 6 * len(layers)  # the prefill and 5 steps, every layer
    addresses = {t.data_ptr() for t in fused_calls}
    assert all(viewed(layer) for layer in layers)
    assert all("forward" not in vars(layer) for layer in layers)  # the class's forward again
    assert "captune_qkv_weight" not in tiny.model.state_dict()  # (not saved)
    generator = torch.Generator().manual_seed(3)
    saved = [(layer.v_proj.weight.detach().clone(), layer.q_proj.weight.detach().clone()) for layer in layers]
    try:
        for layer in layers:  # in place, past autograd's version counter, as a merge does it
            layer.v_proj.weight.data += torch.randn(layer.v_proj.weight.shape, generator=generator)
        changed = generate_captions(tiny.model, tiny.processor, _images(), options)
        assert changed != before
        fused_calls.clear()
        assert generate_captions(tiny.model, tiny.processor, _images(), static) == changed
        assert {t.data_ptr() for t in fused_calls} == addresses  # the same buffers
        for layer in layers:  # new tensors, as a safe merge or `.to()` gives them
            layer.q_proj.weight.data = layer.q_proj.weight.detach() + torch.randn(layer.q_proj.weight.shape,
                                                                                 generator=generator)  # fmt: skip
        assert not any(viewed(layer) for layer in layers)
        changed_again = generate_captions(tiny.model, tiny.processor, _images(), options)
        assert changed_again != changed
        fused_calls.clear()
        assert generate_captions(tiny.model, tiny.processor, _images(), static) == changed_again
        assert {t.data_ptr() for t in fused_calls} == addresses  # copied into the same buffers
        assert all(viewed(layer) for layer in layers)
        tiny.model.save_pretrained(tmp_path / "saved")  # shared storage: transformers writes the parts apart
        reloaded = Blip2ForConditionalGeneration.from_pretrained(tmp_path / "saved")
        assert all(torch.equal(v, reloaded.state_dict()[k]) for k, v in tiny.model.state_dict().items())
    finally:
        for layer, (v_weight, q_weight) in zip(layers, saved, strict=True):
            layer.v_proj.weight.data.copy_(v_weight)
            layer.q_proj.weight.data.copy_(q_weight)


def test_only_plain_weights_with_memory_are_fused() -> None:
    """Sharded (DTensor) or meta weights (offloaded) are never made views of a fused buffer."""
    from captune.generation.static.linears import _plain

    assert _plain(torch.nn.Linear(2, 2))
    assert not _plain(torch.nn.Linear(2, 2, device="meta"))


@pytest.mark.parametrize("bias", [True, False])
def test_a_gemv_is_the_linear_layers_product(bias: bool) -> None:
    from captune.generation.static.linears import _gemv

    generator = torch.Generator().manual_seed(0)
    x, weight = torch.randn(1, 1, 24, generator=generator), torch.randn(40, 24, generator=generator)
    b = torch.randn(40, generator=generator) if bias else None
    out = _gemv(x, weight, b)
    assert out.shape == (1, 1, 40) and out.dtype == x.dtype
    torch.testing.assert_close(out, torch.nn.functional.linear(x, weight, b))
    half = _gemv(x.bfloat16(), weight.bfloat16(), None if b is None else b.bfloat16())
    assert half.dtype == torch.bfloat16  # summed in float32, returned in the input's dtype


@pytest.mark.parametrize(("rows", "compiling", "expected"), [(1, True, "_gemv"), (2, True, "linear"),
                                                             (1, False, "linear")])  # fmt: skip
def test_linear_layers_take_the_gemv_only_for_few_rows_while_compiling(
    rows: int, compiling: bool, expected: str, monkeypatch: pytest.MonkeyPatch
) -> None:

    used: list[str] = []
    real_gemv, real_linear = linears._gemv, torch.nn.functional.linear
    monkeypatch.setattr(linears, "_gemv", lambda *a: used.append("_gemv") or real_gemv(*a))
    monkeypatch.setattr(torch.nn.functional, "linear", lambda *a: used.append("linear") or real_linear(*a))
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: compiling)
    x, weight = torch.randn(rows, 1, 8), torch.randn(5, 8)
    torch.testing.assert_close(linears._linear(x, weight, up_to=1), real_linear(x, weight))
    assert used == [expected]


@pytest.mark.usefixtures("fresh_compiles")
@pytest.mark.parametrize("up_to", [0, 1])
def test_compiled_one_row_steps_give_generates_captions_by_gemvs_only_when_asked(
    tiny: LoadedModel, monkeypatch: pytest.MonkeyPatch, up_to: int
) -> None:
    # As on a GPU (dynamo traces the compiled parts; CUDA graphs aside): with gemv_up_to 1 the decode step of a
    # single image has no linear layer left in its graph (the products are reductions), the captions stay generate's,
    # and the layers get nn.Linear's forward back (1 is the default); with 0 no layer is touched.
    # The one-row step of reductions is compiled with coordinate descent tuning.

    lm = tiny.model.language_model
    linear_layers = [m for m in lm.modules() if type(m) is torch.nn.Linear]
    graphs: list[torch.fx.GraphModule] = []
    settings: list[bool] = []  # whether the compiler tuned by coordinate descent while each graph was compiled

    def recording(graph: torch.fx.GraphModule, example_inputs: Any) -> Any:
        import torch._inductor.config as inductor

        graphs.append(graph)
        settings.append(inductor.coordinate_descent_tuning)
        return graph.forward

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda f, **o: real_compile(f, backend=recording, fullgraph=o["fullgraph"]))
    monkeypatch.setattr(decoder, "compiles", lambda blip, device: True)
    monkeypatch.setattr(fast_path(tiny.model), "options", StaticOptions(gemv_up_to=up_to))
    options = GenerateConfig(num_beams=1, min_new_tokens=2, max_new_tokens=6)
    static = GenerateConfig(num_beams=1, min_new_tokens=2, max_new_tokens=6, static_cache=True)
    patched: list[bool] = []
    real_step = decoder.StaticDecoder.step

    def step(self: Any, *args: Any) -> Any:
        patched.append(any("forward" in vars(m) for m in linear_layers))
        return real_step(self, *args)

    monkeypatch.setattr(decoder.StaticDecoder, "step", step)
    torch._dynamo.reset()
    try:
        for image in _images():
            assert generate_captions(tiny.model, tiny.processor, [image], static) == generate_captions(
                tiny.model, tiny.processor, [image], options
            )
    finally:
        torch._dynamo.reset()
        fast_path(tiny.model).image_side = None  # the shared tiny model as it was
        for name in ("_compiled_call", "_last_compile_config"):
            vars(lm).pop(name, None)
    assert patched and all(patched) == bool(up_to) and any(patched) == bool(up_to)
    assert len(graphs) == 3  # the image side, the prefill, the decode step: each traced once for the three images
    assert settings == [False, False, bool(up_to)]  # only the one-row step of reductions is tuned
    calls = [n.target for n in graphs[2].graph.nodes if n.op == "call_function"]
    layers = lm.config.num_hidden_layers
    assert calls.count(torch._C._nn.linear) == (0 if up_to else 4 * layers + 1)  # q/k/v fused, out, fc1, fc2; head
    assert all("forward" not in vars(m) for m in linear_layers)
