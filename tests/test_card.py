"""The model card: what it says of an adapter, a merged model and a `qformer` run, and how it says to load them."""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import load_file
from transformers import Blip2ForConditionalGeneration

from captune.card import model_card
from captune.config import Config
from captune.export import merge_model_dir
from captune.generation.core import generate_captions
from captune.model import LoadedModel
from captune.model_dir import META_FILE

from .conftest import METRICS, save_run
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
