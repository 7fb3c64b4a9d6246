"""captune's static greedy and beam loops give `generate`'s captions: with prompts, adapters and beams ending at
every length, stopping at their checks."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from PIL import Image

from captune.config import GenerateConfig
from captune.generation.core import generate_captions
from captune.generation.static import StaticOptions, decoder, fast_path, loops
from captune.model import LoadedModel

from ..conftest import COLOURS, _images


@pytest.mark.parametrize("num_beams", [1, 3])
def test_a_static_cache_gives_the_same_captions(tiny: LoadedModel, num_beams: int) -> None:
    options = GenerateConfig(num_beams=num_beams, min_new_tokens=2, max_new_tokens=6)
    static = GenerateConfig(num_beams=num_beams, min_new_tokens=2, max_new_tokens=6, static_cache=True)
    expected = generate_captions(tiny.model, tiny.processor, _images(), options)
    assert generate_captions(tiny.model, tiny.processor, _images(), static) == expected


@pytest.mark.parametrize("beams", [1, 4])
@pytest.mark.parametrize(("prompt", "min_new"), [("", 1), ("a picture of", 0), ("a picture of", 3)])
def test_captunes_static_loops_give_generates_captions(
    tiny: LoadedModel, prompt: str, min_new: int, beams: int
) -> None:
    dynamic = GenerateConfig(num_beams=beams, min_new_tokens=min_new, max_new_tokens=10)
    static = GenerateConfig(num_beams=beams, min_new_tokens=min_new, max_new_tokens=10, static_cache=True)
    expected = generate_captions(tiny.model, tiny.processor, _images(), dynamic, prompt)
    assert generate_captions(tiny.model, tiny.processor, _images(), static, prompt) == expected
    assert any(expected)


@pytest.mark.parametrize("beams", [1, 3])
def test_captunes_static_loops_run_the_adapter(tiny: LoadedModel, beams: int) -> None:
    from captune.config_loading import load_config
    from captune.model import apply_lora

    model = apply_lora(tiny.model, load_config(None, []).lora)
    torch.manual_seed(1)
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            parameter.data.normal_(0, 0.5)  # an adapter that changes the captions
    options = GenerateConfig(num_beams=beams, min_new_tokens=2, max_new_tokens=8)
    static = GenerateConfig(num_beams=beams, min_new_tokens=2, max_new_tokens=8, static_cache=True)
    with_adapter = generate_captions(model, tiny.processor, _images(), options)
    assert generate_captions(model, tiny.processor, _images(), static) == with_adapter
    with model.disable_adapter():
        assert generate_captions(model, tiny.processor, _images(), options) != with_adapter


def test_captunes_static_greedy_loop_ends_rows_at_eos_and_stops_early(
    tiny: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:

    lm = tiny.model.language_model
    eos = lm.generation_config.eos_token_id
    bonus = torch.zeros(lm.config.vocab_size)
    bonus[eos] = 1e4  # EOS wins wherever it is allowed: after min_new_tokens
    lm.lm_head.register_forward_hook(lambda module, inputs, output: output + bonus)
    monkeypatch.setattr(fast_path(tiny.model), "options", StaticOptions(check_every=2))
    options = GenerateConfig(num_beams=1, min_new_tokens=3, max_new_tokens=12, static_cache=True)
    pixels = tiny.processor.image_processor(_images(), return_tensors="pt")["pixel_values"]
    ids = torch.tensor([[tiny.model.config.image_token_id] * 8 + [lm.config.bos_token_id]] * len(pixels))
    tokens = loops.static_greedy(tiny.model, ids, pixels, options)
    assert tokens.shape[1] == 4  # 3 tokens, EOS, then the check after step 4 finds every row ended
    assert (tokens[:, 3] == eos).all() and not (tokens[:, :3] == eos).any()
    plain = GenerateConfig(num_beams=1, min_new_tokens=3, max_new_tokens=12)
    assert generate_captions(tiny.model, tiny.processor, _images(), options) == generate_captions(
        tiny.model, tiny.processor, _images(), plain
    )


def _favour_eos(tiny: LoadedModel, bonus: float) -> Any:
    """Adds `bonus` to the EOS logit, so that beams end at different steps (0: the model as it is)."""
    lm = tiny.model.language_model
    extra = torch.zeros(lm.config.vocab_size)
    extra[lm.generation_config.eos_token_id] = bonus
    return lm.lm_head.register_forward_hook(lambda module, inputs, output: output + extra)


ENDINGS = [(0.0, False, 1.0), (0.5, False, 1.0), (1.0, False, 2.0), (0.5, True, 1.0), (1.0, "never", 1.5),
           (1.0, "never", 2.0), (1.0, "never", 1.0), (1.0, False, -1.0)]  # fmt: skip
"""EOS logit bonus, early_stopping, length_penalty: beams ending at many lengths (checked against generate on CPU)."""


@pytest.mark.parametrize(("bonus", "early_stopping", "length_penalty"), ENDINGS)
def test_captunes_beam_search_scores_ended_beams_as_generate_does(
    tiny: LoadedModel, monkeypatch: pytest.MonkeyPatch, bonus: float, early_stopping: Any, length_penalty: float
) -> None:
    """Beams that end at different lengths: the finished set, the length penalty and each early_stopping mode."""
    config = tiny.model.language_model.generation_config
    monkeypatch.setattr(config, "early_stopping", early_stopping)
    monkeypatch.setattr(config, "length_penalty", length_penalty)
    hook = _favour_eos(tiny, bonus)
    try:
        images = _images() + [Image.new("RGB", (40, 30), colour) for colour in COLOURS[3:]]
        dynamic = GenerateConfig(num_beams=3, min_new_tokens=2, max_new_tokens=12)
        static = GenerateConfig(num_beams=3, min_new_tokens=2, max_new_tokens=12, static_cache=True)
        expected = generate_captions(tiny.model, tiny.processor, images, dynamic)
        assert generate_captions(tiny.model, tiny.processor, images, static) == expected
    finally:
        hook.remove()
    if bonus:  # the case is one of beams ending early
        assert any(len(caption.split()) < 12 for caption in expected)


def test_captunes_beam_search_stops_at_a_check_with_generates_tokens(
    tiny: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With early stopping every image's beams are done after 2 tokens + EOS: the loop stops at the next check
    (not at max_new_tokens) and returns generate's tokens, EOS and then padding."""

    monkeypatch.setattr(tiny.model.language_model.generation_config, "early_stopping", True)
    monkeypatch.setattr(fast_path(tiny.model), "options", StaticOptions(check_every=2))
    steps: list[int] = []
    real_step = decoder.StaticDecoder.step
    monkeypatch.setattr(
        decoder.StaticDecoder, "step", lambda self, tokens, i: steps.append(i) or real_step(self, tokens, i)
    )
    hook = _favour_eos(tiny, 1e4)
    try:
        pixels = tiny.processor.image_processor(_images(), return_tensors="pt")["pixel_values"]
        lm = tiny.model.language_model
        ids = torch.tensor([[tiny.model.config.image_token_id] * 8 + [lm.config.bos_token_id]] * len(pixels))
        options = GenerateConfig(num_beams=3, min_new_tokens=2, max_new_tokens=12, static_cache=True)
        tokens = loops.static_beam(tiny.model, ids, pixels, options)
        output = tiny.model.generate(input_ids=ids, pixel_values=pixels, attention_mask=torch.ones_like(ids),
                                     num_beams=3, min_new_tokens=2, max_new_tokens=12, do_sample=False)  # fmt: skip
    finally:
        hook.remove()
    new = output[:, ids.shape[1] :]
    assert (
        torch.equal(tokens[:, : new.shape[1]], new)
        and (tokens[:, new.shape[1] :] == lm.generation_config.pad_token_id).all()
    )
    assert (tokens[:, 2] == lm.generation_config.eos_token_id).all()
    assert steps == [0, 1, 2]  # tokens 0-2 fed; after token 3 (a check) every image is done


def test_static_loops_look_for_the_end_only_where_a_row_may_have_ended() -> None:

    every = 2  # (StaticOptions.check_every)
    looks = [i for i in range(10) if loops._check_at(i, GenerateConfig(min_new_tokens=6, max_new_tokens=10), every)]
    assert looks == [7, 9]  # EOS is banned for new tokens 0-5: no row can end before number 6
    anywhere = GenerateConfig(min_new_tokens=0, max_new_tokens=10)
    assert [i for i in range(10) if loops._check_at(i, anywhere, every)] == [1, 3, 5, 7, 9]
