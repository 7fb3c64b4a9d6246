"""captune's static loops with one prompt per row (questions of different lengths in one batch, left-padded): the
tokens of plain `generate`, token for token in float32, on the tiny model and the OPT twin of blip2-opt-2.7b."""

from __future__ import annotations

import pytest
import torch

from captune.config import GenerateConfig
from captune.generation import core
from captune.generation.inputs import prompt_tokens
from captune.generation.static import decoder, static_tokens
from captune.model import LoadedModel, evaluating, load_base

QUESTIONS = [
    "Question: what colour is the large shape in the picture? Answer:",
    "a",
    "Question: where is it? Answer:",
    "Question: is there a circle? Answer:",
]
"""Prompts of 1 to 14 words: every row but the longest is left-padded, by different amounts."""


@pytest.fixture(scope="module")
def opt_twin() -> LoadedModel:
    return load_base("twin-blip2-opt-2.7b")


def _pixels(loaded: LoadedModel, count: int) -> torch.Tensor:
    size = loaded.processor.image_processor.size
    return torch.randn(count, 3, size["height"], size["width"], generator=torch.Generator().manual_seed(0))


def _both(loaded: LoadedModel, beams: int, length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain `generate`'s new tokens and the static loops' (cut to generate's length: it stops when all rows end)."""
    plain = GenerateConfig(num_beams=beams, min_new_tokens=1, max_new_tokens=8)
    static = GenerateConfig(num_beams=beams, min_new_tokens=1, max_new_tokens=8, static_cache=True)
    pixels = _pixels(loaded, len(QUESTIONS))
    with torch.no_grad(), evaluating(loaded.model):
        expected = core._generated_tokens(loaded.model, loaded.processor, pixels, plain, QUESTIONS)
        ours = static_tokens(loaded.model, loaded.processor, pixels, static, QUESTIONS, prompt_length=length)
    return expected, ours


def _assert_generates_tokens(expected: torch.Tensor, ours: torch.Tensor, pad: int) -> None:
    assert torch.equal(ours[:, : expected.shape[1]], expected)
    assert (ours[:, expected.shape[1] :] == pad).all()


@pytest.mark.parametrize("beams", [1, 3])
def test_the_static_loops_answer_mixed_length_prompts_as_generate_does_on_the_tiny_model(
    tiny: LoadedModel, beams: int
) -> None:
    lengths = {len(ids) for ids in tiny.processor.tokenizer(QUESTIONS)["input_ids"]}
    assert len(lengths) == len(QUESTIONS)  # every row padded differently
    expected, ours = _both(tiny, beams)
    _assert_generates_tokens(expected, ours, tiny.model.language_model.generation_config.pad_token_id)


@pytest.mark.parametrize("beams", [1, 3])
def test_the_static_loops_answer_mixed_length_prompts_as_generate_does_on_the_opt_twin(
    opt_twin: LoadedModel, beams: int
) -> None:
    expected, ours = _both(opt_twin, beams)
    _assert_generates_tokens(expected, ours, opt_twin.model.language_model.generation_config.pad_token_id)
    assert len({tuple(row) for row in expected.tolist()}) > 1  # the rows' answers differ


def test_padding_every_batch_to_the_runs_longest_prompt_keeps_the_tokens(opt_twin: LoadedModel) -> None:
    """A bulk run pads every batch to its longest prompt (one cache shape for the run): more pads, same tokens."""
    longest = prompt_tokens(opt_twin.processor, QUESTIONS)
    assert longest == len(opt_twin.processor.tokenizer(QUESTIONS[0])["input_ids"])
    expected, ours = _both(opt_twin, 1, length=longest + 5)
    _assert_generates_tokens(expected, ours, opt_twin.model.language_model.generation_config.pad_token_id)


def test_without_generates_positions_the_padded_rows_answer_otherwise(
    opt_twin: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The case above depends on the positions: counted over the slots instead (pads included), the tokens differ."""
    real = decoder._padding
    monkeypatch.setattr(decoder, "_padding", lambda *args: (*real(*args)[:1], None, None))
    expected, ours = _both(opt_twin, 1)
    assert not torch.equal(ours[:, : expected.shape[1]], expected)
