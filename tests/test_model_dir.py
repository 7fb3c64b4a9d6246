"""Saving a fine-tuned model directory and loading it back: the same captions and logits, standing alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from captune.config import Config, GenerateConfig, LoraConfig
from captune.errors import CaptuneError
from captune.generation.core import generate_captions
from captune.model import LoadedModel, apply_lora, load_base
from captune.model_dir import META_FILE, load_model_dir, save_base, save_model_dir

from .test_model import _images

GREEDY = GenerateConfig(num_beams=1, min_new_tokens=1, max_new_tokens=6)


@pytest.fixture
def saved(tiny: LoadedModel, tmp_path: Path) -> tuple[LoadedModel, Path]:
    """The tiny model with a LoRA adapter that changes its output, saved as `captune train` saves it."""
    save_base(tmp_path / "base-model", tiny)
    tiny.model = apply_lora(tiny.model, LoraConfig())
    # LoRA B starts at zero (the adapter is a no-op); random B weights make the adapter matter.
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in tiny.model.named_parameters():
            if ".lora_B." in name:
                param.copy_(torch.randn(param.shape, generator=generator))
    tiny.model.eval()
    save_model_dir(tmp_path / "model", tiny, Config(), tmp_path / "base-model")
    return tiny, tmp_path / "model"


def _logits(loaded: LoadedModel) -> torch.Tensor:
    inputs = loaded.processor(images=_images(), text=["a picture of"] * 3, return_tensors="pt")
    with torch.no_grad():
        return loaded.model(**inputs).logits


def test_the_adapter_changes_the_captions(saved: tuple[LoadedModel, Path]) -> None:
    tuned, _ = saved
    base = load_base("tiny")
    images = _images()
    tuned_captions = generate_captions(tuned.model, tuned.processor, images, GREEDY)
    assert tuned_captions != generate_captions(base.model, base.processor, images, GREEDY)


def test_reloaded_model_gives_the_same_captions(saved: tuple[LoadedModel, Path]) -> None:
    tuned, path = saved
    reloaded = load_model_dir(path)
    images = _images()
    assert generate_captions(reloaded.model, reloaded.processor, images, GREEDY) == generate_captions(
        tuned.model, tuned.processor, images, GREEDY
    )


def test_reloaded_model_gives_the_same_logits(saved: tuple[LoadedModel, Path]) -> None:
    tuned, path = saved
    torch.testing.assert_close(_logits(load_model_dir(path)), _logits(tuned), rtol=0, atol=0)


def test_saved_directory_stands_alone(saved: tuple[LoadedModel, Path], tmp_path: Path) -> None:
    # The run's base-model/ is copied inside: deleting it must not break the saved model.
    tuned, path = saved
    moved = tmp_path / "elsewhere"
    path.rename(moved)
    for file in (tmp_path / "base-model").iterdir():
        file.unlink()
    torch.testing.assert_close(_logits(load_model_dir(moved)), _logits(tuned), rtol=0, atol=0)


def test_saved_directory_records_the_base_and_the_config(saved: tuple[LoadedModel, Path]) -> None:
    meta = json.loads((saved[1] / META_FILE).read_text())
    assert meta["base_model"] == "base"
    assert meta["config"]["lora"]["target_modules"] == ["q_proj", "v_proj"]


def test_directory_without_adapter_or_model_is_refused(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(CaptuneError, match=rf"no {META_FILE} .*and no config\.json"):
        load_model_dir(tmp_path)
