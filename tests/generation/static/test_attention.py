"""The one-query attention of the static loops' decode steps."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from captune.config import GenerateConfig
from captune.generation import static as static_entry
from captune.generation.core import generate_captions
from captune.generation.static import StaticOptions, attention
from captune.model import LoadedModel

from ..conftest import _images


def test_static_loops_run_their_one_query_attention_and_give_the_model_back(
    tiny: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The decode steps' attention is captune's (PyTorch's kernels are slow for one query over a masked static
    cache); the captions stay generate's, and the language model leaves on SDPA, also after an error."""

    config = tiny.model.language_model.config
    assert config._attn_implementation == "sdpa"
    queries: list[int] = []
    real = attention.one_query_attention(StaticOptions().reductions_up_to)

    rows: list[int] = []

    def counting(module: Any, query: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        queries.append(query.shape[2])
        rows.append(query.shape[0])
        return real(module, query, *args, **kwargs)

    monkeypatch.setattr(attention, "one_query_attention", lambda up_to: counting)
    options = GenerateConfig(num_beams=2, min_new_tokens=2, max_new_tokens=5)
    expected = generate_captions(tiny.model, tiny.processor, _images(), options)
    static = GenerateConfig(num_beams=2, min_new_tokens=2, max_new_tokens=5, static_cache=True)
    assert generate_captions(tiny.model, tiny.processor, _images(), static) == expected
    layers = config.num_hidden_layers
    assert queries.count(1) == 4 * layers and queries.count(9) == layers  # 4 one-token steps, the 9-token prefill
    prefill_rows = {r for q, r in zip(queries, rows, strict=True) if q == 9}
    assert prefill_rows == {3} and set(rows) == {3, 6}  # the prompt prefilled once per image, then 2 beams each
    assert config._attn_implementation == "sdpa"
    monkeypatch.setattr(static_entry, "static_beam", lambda *args: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        generate_captions(tiny.model, tiny.processor, _images(), static)
    assert config._attn_implementation == "sdpa"


@pytest.mark.parametrize(("rows", "compiling"), [(1, True), (3, True), (1, False)])
def test_the_one_query_attention_is_sdpas_by_reductions_for_few_rows_compiled_and_products_otherwise(
    rows: int, compiling: bool, monkeypatch: pytest.MonkeyPatch
) -> None:

    generator = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(size, generator=generator) for size in ((rows, 4, 1, 8), *[(rows, 4, 6, 8)] * 2))
    mask = torch.tensor([True, True, True, False, True, False]).expand(rows, 1, 1, 6)
    expected = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=0.3)
    expected = expected.transpose(1, 2)
    used: list[str] = []
    for name in ("_reductions", "_batched_products"):
        real = getattr(attention, name)
        monkeypatch.setattr(attention, name, lambda *a, real=real, name=name: used.append(name) or real(*a))
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: compiling)  # as while dynamo traces the step
    out = attention._by_rows(query, key, value, mask, 0.3, up_to=2)
    assert used == (["_reductions"] if rows <= 2 and compiling else ["_batched_products"])
    assert out.shape == (rows, 1, 4, 8) and out.is_contiguous()
    torch.testing.assert_close(out, expected)
