"""The model card: what it says of an adapter, a merged model, a `qformer` run and a VQA run, and how it says to load
them."""

from __future__ import annotations

import ast
import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest
from safetensors.torch import load_file
from transformers import Blip2ForConditionalGeneration

from captune.card import QUESTION, model_card
from captune.cli import main
from captune.config import Config
from captune.export import merge_model_dir
from captune.generation.core import generate_captions
from captune.model import LoadedModel
from captune.model_dir import META_FILE

from .conftest import METRICS, save_run, write_image
from .test_export import GREEDY, _images


def test_model_card_names_base_hyperparameters_and_metrics(
    run: tuple[LoadedModel, Config, Path], tmp_path: Path
) -> None:
    card = (merge_model_dir(run[2], tmp_path / "merged") / "README.md").read_text()
    assert "library_name: transformers" in card
    assert "`tiny`" in card and "random weights" in card
    assert "| lora.r | `8` |" in card and "| lora.alpha | `32` |" in card
    assert "| train.lr / weight_decay / warmup_steps | `0.0001 / 0.01 / 100` |" in card
    assert "| format | `synthetic` |" in card
    assert "| CIDEr | 0.5678 |" in card and "From best/metrics.json" in card
    assert f"`{run[2]}` merged into the base weights" in card
    assert "generation_config=model.generation_config" in card


def test_adapter_card_says_how_to_load_the_adapter_and_that_metrics_are_absent(
    run: tuple[LoadedModel, Config, Path],
) -> None:
    loaded, config, _ = run
    config.model.name = "Salesforce/blip2-opt-2.7b"
    card = model_card(loaded, config)
    assert "library_name: peft" in card and "base_model: Salesforce/blip2-opt-2.7b" in card
    assert 'PeftModel.from_pretrained(base, "MODEL_DIR")' in card
    assert "No validation metrics were recorded" in card
    assert "random weights" not in card
    with_metrics = model_card(loaded, config, METRICS)
    assert "| CIDEr | 0.5678 |" in with_metrics and "From the val split, scored during training." in with_metrics


def test_qformer_mode_directory_has_a_card_and_loads_with_plain_transformers(tmp_path: Path) -> None:
    tuned, _, best = save_run(tmp_path / "run", ["train.mode=qformer"])
    assert {p.name for p in best.iterdir()} >= {"trained.safetensors", META_FILE, "README.md"}
    assert not (best / "adapter_config.json").exists()
    card = (best / "README.md").read_text()
    assert "trained in full" in card and "| train.mode | `qformer` |" in card and "lora.r" not in card
    # The card's transformers-only recipe: the base, then the trained weights over it.
    model = Blip2ForConditionalGeneration.from_pretrained(best / "base").eval()
    model.load_state_dict(load_file(str(best / "trained.safetensors")), strict=False)
    images = _images()
    assert generate_captions(model, tuned.processor, images, GREEDY) == generate_captions(
        tuned.model, tuned.processor, images, GREEDY
    )


@pytest.mark.parametrize(
    ("overrides", "vision", "vit_targets"),
    [
        ([], "the vision encoder is frozen.", "none"),
        (["train.mode=qformer"], "the vision encoder is frozen.", None),
        (["train.mode=vit+qformer"], "the vision encoder trained in full.", None),
        (
            ["train.mode=lora-lm+qformer+vit"],
            "the vision encoder's weights frozen, LoRA on its qkv layers trained.",
            "qkv",
        ),
        (
            ["train.mode=lora-lm+qformer+vit", "vit_target_modules=qkv,projection"],
            "the vision encoder's weights frozen, LoRA on its qkv, projection layers trained.",
            "qkv, projection",
        ),
    ],
    ids=["lora-lm", "qformer", "vit+qformer", "lora-lm+qformer+vit", "vit-projection"],
)
def test_card_says_what_the_mode_did_to_the_vision_encoder(
    tmp_path: Path, overrides: list[str], vision: str, vit_targets: str | None
) -> None:
    card = (save_run(tmp_path / "run", overrides)[2] / "README.md").read_text()
    assert f"AdamW with linear warm-up and cosine decay; {vision}" in card
    row = f"| lora.vit_target_modules (vision encoder) | `{vit_targets}` |"
    assert (row in card) if vit_targets else ("lora.vit_target_modules" not in card)


VQA_METRICS = {"vqa_accuracy": 31.4286, "vqa_accuracy_other": 20.0, "vqa_accuracy_yes_no": 75.0}


def _block(card: str, language: str) -> str:
    """The one fenced code block of `language` in a card."""
    (block,) = re.findall(rf"```{language}\n(.*?)```", card, re.DOTALL)
    return block


def test_vqa_card_says_best_is_chosen_by_vqa_accuracy_and_shows_captune_ask(tmp_path: Path) -> None:
    loaded, config, _ = save_run(tmp_path / "run", ["task=vqa"])
    card = model_card(loaded, config, VQA_METRICS)
    assert "pipeline_tag: visual-question-answering" in card and "image-captioning" not in card
    assert "# BLIP-2 visual question answering fine-tuned with captune" in card
    assert "| vqa_accuracy | 31.4286 |" in card and "| vqa_accuracy_yes_no | 75.0000 |" in card
    assert "best/ is chosen by val VQA accuracy (the official VQA evaluation's, in percent" in card
    assert "CIDEr" not in card and "captune caption" not in card and "| prompt |" not in card
    assert '| question_template | `"Question: {} Answer:"` |' in card and "| vqa_answers | `most-frequent` |" in card
    assert "Generation (validation and `captune ask` defaults)" in card
    assert _block(card, "bash") == f'captune ask photo.jpg --question "{QUESTION}" --model-dir MODEL_DIR\n'
    assert "It answers like its training data" in card and "It is not a usable VQA model." in card


def test_vqa_card_usage_lines_answer_as_captune_ask_does(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Both of the card's ways, run as written (MODEL_DIR and photo.jpg replaced), give the same answer.
    _, _, best = save_run(tmp_path / "run", ["task=vqa"])
    card = (best / "README.md").read_text()
    photo = write_image(tmp_path / "photo.jpg", (30, 60, 220), size=64)
    command = _block(card, "bash").replace("MODEL_DIR", str(best)).replace("photo.jpg", str(photo))
    argv = shlex.split(command)
    assert argv[:2] == ["captune", "ask"] and main(argv[1:]) == 0
    asked = capsys.readouterr().out.splitlines()
    python = _block(card, "python").replace("MODEL_DIR", str(best)).replace("photo.jpg", str(photo))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(python, {})  # noqa: S102 - the card's own code, on this test's files
    (answer,) = ast.literal_eval(printed.getvalue())
    assert asked == [answer.strip()] and answer.strip()
