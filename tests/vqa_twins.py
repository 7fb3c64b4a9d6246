"""What the VQA tests on twins share (`captune ask`, `captune eval --task vqa`, `POST /v1/answers`): a VQA run of the
twin of blip2-opt-2.7b or blip2-flan-t5-xl saved as `captune train` saves one, images and questions of different
lengths, and the answers plain transformers gives: the processor's inputs, the model's own `generate` and
generation config, the new tokens decoded up to the checkpoint's end token."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from captune.config_loading import load_config
from captune.data.images import load_rgb
from captune.model import apply_lora, load_base
from captune.model_dir import load_model_dir, save_base, save_model_dir

from .conftest import write_image

OPT, T5 = "twin-blip2-opt-2.7b", "twin-blip2-flan-t5-xl"
END = {OPT: 50118, T5: 1}
"""The token each checkpoint ends a text with, as the hub has it: blip2-opt's generation config EOS, "\\n" (not the
tokenizer's `</s>`, 2); Flan-T5's `</s>`."""
END_TEXT = {OPT: "\n", T5: "</s>"}
"""What the end token decodes to (`</s>` only without skip_special_tokens): an answer must never hold it."""
END_SCALE = 30.0
"""The end token's output embedding row is multiplied by this: a random twin's logits are nearly flat (at most ~1.3
over 50k tokens), so it would never stop; scaled, the end token wins at some steps and not at others, and answers
stop after one, two or more tokens, or run to max_new_tokens. (The row is tied to the input embedding: OPT's "\\n"
is in no prompt; T5's `</s>` ends every encoder input, on every path alike.)"""
MAX_NEW_TOKENS = 6
RUN_OVERRIDES = ["task=vqa", "num_beams=1", "min_new_tokens=1", f"max_new_tokens={MAX_NEW_TOKENS}"]
TEMPLATE = "Question: {} Answer:"  # data.question_template's default: what these runs answer with
QUESTIONS = ["which shape is at the top right of the picture, and is it large or small?", "how big?",
             "is there a square on the left?", "where?"]  # fmt: skip
"""Prompts of 7 to 23 tokens with the template: batched together they are padded to the longest."""
IMAGES = {"red.png": (200, 20, 20), "blue.png": (30, 40, 220)}


def save_twin_vqa_run(root: Path, name: str, overrides: Sequence[str] = ()) -> Path:
    """A VQA run's model directory (`root/best`, returned) as `captune train` writes it, for twin `name` with its end
    token scaled (`END_SCALE`) and an untrained default LoRA; greedy, 1 to `MAX_NEW_TOKENS` new tokens, then
    `overrides`."""
    loaded = load_base(name)
    with torch.no_grad():
        loaded.model.language_model.get_output_embeddings().weight[END[name]] *= END_SCALE
    save_base(root / "base-model", loaded)
    config = load_config(None, [f"model.name={name}", *RUN_OVERRIDES, *overrides])
    loaded.model = apply_lora(loaded.model, config.lora)
    save_model_dir(root / "best", loaded, config, root / "base-model")
    return root / "best"


@dataclass(frozen=True)
class TwinRun:
    name: str
    model_dir: Path
    folder: Path
    """`IMAGES` as PNG files."""
    expected: dict[tuple[str, str], str]
    """(image file name, question) -> plain transformers' answer (`transformers_answer`), for every pair."""


@pytest.fixture(scope="module", params=[OPT, T5])
def twin_run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> TwinRun:
    """Each twin's saved run, the images, and plain transformers' answer to every question about every image, after
    checking that some stopped at the end token and some ran to max_new_tokens (a stop token that never comes would
    leave every answer full length). A module takes it as `twin_run = vqa_twins.twin_run`."""
    name = request.param
    root = tmp_path_factory.mktemp(name)
    model_dir = save_twin_vqa_run(root / "run", name)
    for file, colour in IMAGES.items():
        write_image(root / file, colour, size=32, fmt="PNG")
    answers = transformers_answers(model_dir, name, [root / file for file in IMAGES])
    stops = [stopped for _, stopped in answers.values()]
    assert any(stops) and not all(stops), stops
    return TwinRun(name, model_dir, root, {key: answer for key, (answer, _) in answers.items()})


def transformers_answers(model_dir: Path, name: str, images: list[Path]) -> dict[tuple[str, str], tuple[str, bool]]:
    """(image file name, question) -> plain transformers' answer to the question alone (`Blip2Processor`'s inputs,
    the model's `generate` with its own generation config, no padding), and whether it stopped at the end token."""
    loaded = load_model_dir(model_dir, device="cpu")
    model, processor = loaded.model, loaded.processor
    answers: dict[tuple[str, str], tuple[str, bool]] = {}
    for path in images:
        image = load_rgb(path)
        for question in QUESTIONS:
            inputs = processor(images=[image], text=[TEMPLATE.format(question)], return_tensors="pt")
            with torch.no_grad():
                out = model.generate(**inputs, num_beams=1, min_new_tokens=1, max_new_tokens=MAX_NEW_TOKENS,
                                     do_sample=False)  # fmt: skip
            # OPT: the prompt, then the new tokens; T5: the decoder's start token, then the new tokens
            new = out[0, 1:] if name == T5 else out[0, inputs["input_ids"].shape[1] :]
            tokens = new.tolist()
            stopped = END[name] in tokens
            assert stopped or len(tokens) == MAX_NEW_TOKENS, f"stopped at {tokens[-1]}, not at {END[name]}: {tokens}"
            kept = tokens[: tokens.index(END[name])] if stopped else tokens
            text = processor.tokenizer.decode(kept, skip_special_tokens=True)
            answers[path.name, question] = " ".join(text.split()), stopped
    return answers


def assert_no_end_text(name: str, answers: list[str]) -> None:
    assert [a for a in answers if END_TEXT[name] in a or a != a.strip()] == []
