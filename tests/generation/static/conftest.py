"""Compiling as on a GPU, on the CPU: captune's compile-once functions emptied, and torch.compile made to trace with
dynamo and run the traced graphs as they are (no CUDA graphs)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from captune.generation.static import decoder


@pytest.fixture
def fresh_compiles() -> Any:
    """captune's compile-once functions emptied before and after the test (which compiles them its own way)."""

    for once in (decoder._compiled_prefill, decoder._compiled_reorder):
        once.cache_clear()
    yield
    for once in (decoder._compiled_prefill, decoder._compiled_reorder):
        once.cache_clear()


def _traced_compiles(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """torch.compile made to trace with dynamo and run the traced graph as is (no CUDA graphs on a CPU), with
    `fullgraph` as asked (a graph break then fails); returns the list of the options each call asked for."""
    asked: list[dict[str, Any]] = []
    real_compile = torch.compile

    def traced(function: Any, **options: Any) -> Any:
        asked.append(options)
        dynamic = {"dynamic": options["dynamic"]} if "dynamic" in options else {}
        return real_compile(function, backend="eager", fullgraph=options["fullgraph"], **dynamic)

    monkeypatch.setattr(torch, "compile", traced)
    return asked
