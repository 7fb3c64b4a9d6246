"""Training and captioning at another image size than the checkpoint's (`model.image_size`), and gradient
checkpointing in a vision encoder that trains (`train.gradient_checkpointing`)."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers.modeling_utils
from PIL import Image
from safetensors.torch import load_file

from captune.config import GenerateConfig
from captune.errors import CaptuneError
from captune.generation.core import generate_captions
from captune.model import load_base, resize_images, vision_model_of
from captune.model_dir import load_model_dir, save_base
from captune.tiny import PATCH_SIZE
from captune.training import recipe
from captune.training_modes import TRAINED_FILE

from .test_recipe import _config


@pytest.mark.parametrize(("name", "size"), [("tiny", 48), ("twin-blip2-opt-2.7b", 364)])
def test_a_resized_model_computes_what_transformers_interpolation_computes(name: str, size: int) -> None:
    # The resized model on `size`-pixel images equals the original run with interpolate_pos_encoding=True: the one
    # interpolation, done once at load instead of at every forward.
    original = load_base(name).model.eval()
    resized = load_base(name)
    resize_images(resized, size)
    assert resized.processor.image_processor.size == {"height": size, "width": size}
    assert resized.model.config.vision_config.image_size == size
    patch = original.config.vision_config.patch_size
    pixels = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = original.vision_model(pixels, interpolate_pos_encoding=True).last_hidden_state
        got = resized.model.eval().vision_model(pixels).last_hidden_state
    assert got.shape[1] == (size // patch) ** 2 + 1
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_an_image_size_off_the_patch_grid_is_an_error_that_says_what_to_use() -> None:
    loaded = load_base("tiny")
    with pytest.raises(CaptuneError, match=r"model.image_size=50: not a multiple of .* patch size 4; use 48 or 52"):
        resize_images(loaded, 50)


def test_a_run_at_another_image_size_saves_and_loads_at_that_size(synthetic_dir: Path, tmp_path: Path) -> None:
    # The base is a directory of the tiny model at its own 32 px (as a hub checkpoint at 224): the run trains at 48,
    # and its model directory loads the base and interpolates again, to the same weights the run trained.
    base_dir = tmp_path / "base"
    save_base(base_dir, load_base("tiny"))
    overrides = (f"model.name={base_dir}", "model.image_size=48", "train.mode=vit+qformer", "lora.modules_to_save=",
                 "train.max_steps=2", "data.num_workers=0")  # fmt: skip
    recipe.train(_config(synthetic_dir, tmp_path / "run", *overrides))
    final = tmp_path / "run" / "final"
    trained = load_file(str(final / TRAINED_FILE))
    position = "vision_model.embeddings.position_embedding"
    assert trained[position].shape == (1, (48 // PATCH_SIZE) ** 2 + 1, 32)
    loaded = load_model_dir(final, torch.float32, device="cpu")
    assert loaded.processor.image_processor.size == {"height": 48, "width": 48}
    params = dict(loaded.model.named_parameters())
    for key, value in trained.items():
        assert torch.equal(params[key], value), key
    image = Image.open(sorted((synthetic_dir / "images").glob("val-*.png"))[0])
    assert loaded.processor(images=[image], return_tensors="pt")["pixel_values"].shape[-2:] == (48, 48)
    captions = generate_captions(loaded.model, loaded.processor, [image], GenerateConfig(num_beams=1))
    assert len(captions) == 1 and captions[0].strip()


@pytest.mark.parametrize("mode", ["vit+qformer", "lora-lm+qformer+vit"])
def test_gradient_checkpointing_recomputes_the_vit_and_trains_the_same_steps(
    synthetic_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    checkpointed_layers: list[str] = []
    checkpoint = transformers.modeling_utils.checkpoint

    def counting(function: Any, *args: Any, **kwargs: Any) -> Any:
        layer = function.args[0] if isinstance(function, functools.partial) else function.__self__
        checkpointed_layers.append(type(layer).__name__)
        return checkpoint(function, *args, **kwargs)

    monkeypatch.setattr(transformers.modeling_utils, "checkpoint", counting)
    overrides = (f"train.mode={mode}", "lora.modules_to_save=", "train.max_steps=2", "data.num_workers=0")
    recipe.train(_config(synthetic_dir, tmp_path / "plain", *overrides))
    assert not checkpointed_layers
    recipe.train(_config(synthetic_dir, tmp_path / "ckpt", *overrides, "train.gradient_checkpointing=true"))
    assert {"Blip2EncoderLayer", "OPTDecoderLayer"} <= set(checkpointed_layers)  # the ViT's layers and the LM's
    saved = TRAINED_FILE if mode == "vit+qformer" else "adapter_model.safetensors"
    a, b = (load_file(str(tmp_path / run / "final" / saved)) for run in ("plain", "ckpt"))
    assert a.keys() == b.keys() and any("vision_model." in key for key in a)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)


def test_vision_model_of_finds_the_encoder_inside_a_peft_wrapper() -> None:
    from captune.config_loading import load_config
    from captune.model import apply_train_mode

    loaded = load_base("tiny")
    vision = loaded.model.vision_model
    wrapped = apply_train_mode(loaded.model, load_config(None, ["train.mode=lora-lm+qformer+vit"]))
    assert vision_model_of(wrapped) is vision
