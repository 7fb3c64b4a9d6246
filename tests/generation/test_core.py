"""The plain captioning path (`generate_captions` through transformers' `generate`): one caption per image,
batch invariance, prompt handling, the model's mode, and when the static cache is advised."""

from __future__ import annotations

import pytest
import torch

from captune.config import GenerateConfig
from captune.generation.core import generate_captions
from captune.model import LoadedModel

from .conftest import GREEDY, _images


def test_one_caption_string_per_image(tiny: LoadedModel) -> None:
    captions = generate_captions(tiny.model, tiny.processor, _images(), GREEDY)
    assert len(captions) == 3
    assert all(isinstance(c, str) and c for c in captions)


def test_captions_are_deterministic(tiny: LoadedModel) -> None:
    images, options = _images(), GenerateConfig(num_beams=3, min_new_tokens=1, max_new_tokens=6)
    first = generate_captions(tiny.model, tiny.processor, images, options)
    assert generate_captions(tiny.model, tiny.processor, images, options) == first


def test_captions_differ_between_images(tiny: LoadedModel) -> None:
    # Guards the batch tests below: identical captions for every image would make them pass vacuously.
    assert len(set(generate_captions(tiny.model, tiny.processor, _images(), GREEDY))) > 1


@pytest.mark.parametrize("num_beams", [1, 3])
def test_an_image_gets_the_same_caption_alone_and_in_a_batch(tiny: LoadedModel, num_beams: int) -> None:
    options = GenerateConfig(num_beams=num_beams, min_new_tokens=1, max_new_tokens=6)
    images = _images()
    batched = generate_captions(tiny.model, tiny.processor, images, options, prompt="a picture of")
    alone = [generate_captions(tiny.model, tiny.processor, [im], options, prompt="a picture of")[0] for im in images]
    assert batched == alone


@pytest.mark.parametrize("num_beams", [1, 3])
def test_one_prompt_per_image_gives_each_image_its_own_prompts_answer(tiny: LoadedModel, num_beams: int) -> None:
    """Prompts of different lengths in one batch (left-padded): each row gets what it gets alone with its prompt."""
    options = GenerateConfig(num_beams=num_beams, min_new_tokens=1, max_new_tokens=6)
    images = _images()
    prompts = ["a", "a picture of", "Question: what colour is the large shape? Answer:"]
    batched = generate_captions(tiny.model, tiny.processor, images, options, prompt=prompts)
    pairs = zip(images, prompts, strict=True)
    alone = [generate_captions(tiny.model, tiny.processor, [im], options, prompt=p)[0] for im, p in pairs]
    assert batched == alone
    assert len(set(batched)) > 1
    with pytest.raises(ValueError, match="2 prompts for 3 rows"):
        generate_captions(tiny.model, tiny.processor, images, options, prompt=prompts[:2])


def test_min_and_max_new_tokens_bound_the_caption_length(tiny: LoadedModel) -> None:
    options = GenerateConfig(num_beams=1, min_new_tokens=4, max_new_tokens=4)
    captions = generate_captions(tiny.model, tiny.processor, _images(), options)
    # Every word of the tiny vocabulary is one token.
    assert [len(c.split()) for c in captions] == [4, 4, 4]


def test_a_model_in_training_mode_is_left_in_training_mode(tiny: LoadedModel) -> None:
    tiny.model.train()
    generate_captions(tiny.model, tiny.processor, _images()[:1], GREEDY)
    assert tiny.model.training


class _FixedContinuation(torch.nn.Module):
    """Stands in for a decoder-only BLIP-2: `generate` returns the input ids followed by the same new words."""

    def __init__(self, tiny: LoadedModel, words: str):
        super().__init__()
        self.config = tiny.model.config
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.new_ids = tiny.processor.tokenizer(words, add_special_tokens=False).input_ids

    def generate(self, input_ids: torch.Tensor, **_: object) -> torch.Tensor:
        new = torch.tensor(self.new_ids).expand(len(input_ids), -1)
        return torch.cat([input_ids, new], dim=1)


@pytest.mark.parametrize(
    ("prompt", "continuation", "expected"),
    [
        ("", "a red circle", "a red circle"),
        ("a picture of", "a red circle", "a red circle"),
        ("a picture of", "a picture of a red circle", "a red circle"),
        ("  a   picture of ", "a picture of a red circle", "a red circle"),
        ("a", "at the top", "at the top"),
        ("a picture", "a picture", ""),
    ],
    ids=[
        "no-prompt",
        "prompt-not-returned",
        "repeated-prompt-stripped",
        "prompt-spacing",
        "whole-words-only",
        "only-the-prompt",
    ],  # fmt: skip
)
def test_prompt_is_fed_and_not_returned(tiny: LoadedModel, prompt: str, continuation: str, expected: str) -> None:
    model = _FixedContinuation(tiny, continuation)
    assert generate_captions(model, tiny.processor, _images()[:2], GREEDY, prompt=prompt) == [expected, expected]
