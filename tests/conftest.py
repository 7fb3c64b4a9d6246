"""Shared fixtures: the tiny BLIP-2 built from config, a small synthetic dataset, image files made on the fly, and a
saved run's model directory (the merge and the model card)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a hub lookup without it hangs for minutes before failing
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import json  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from captune.config import Config, training_mode  # noqa: E402
from captune.config_loading import load_config  # noqa: E402
from captune.data.synthetic import SyntheticSpec, generate_synthetic  # noqa: E402
from captune.model import LoadedModel, apply_train_mode, build_tiny  # noqa: E402
from captune.model_dir import save_base, save_model_dir  # noqa: E402

SMALL_SPEC = SyntheticSpec(train=24, val=6, test=6, seed=1)
METRICS = {"Bleu_4": 0.1234, "CIDEr": 0.5678}

# Tiny models only: a second thread gains nothing and spins when the machine is busy (see captune.demo).
torch.set_num_threads(1)


@pytest.fixture
def tiny() -> LoadedModel:
    """A fresh tiny BLIP-2 (random weights, seed 0) and its processor; cheap enough to build per test."""
    return build_tiny(0)


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic dataset (24/6/6 images), written once per session; tests must not modify it."""
    path = tmp_path_factory.mktemp("synthetic")
    generate_synthetic(path, SMALL_SPEC)
    return path


def write_image(path: Path, colour: tuple[int, int, int] = (200, 30, 30), size: int = 24, fmt: str = "JPEG") -> Path:
    """Writes a small solid-colour image and returns its path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), colour).save(path, fmt)
    return path


def write_truncated_jpeg(path: Path) -> Path:
    """A JPEG cut in half: Pillow opens it and fails only when decoding the pixels."""
    write_image(path, size=64)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def save_run(root: Path, overrides: list[str]) -> tuple[LoadedModel, Config, Path]:
    """A run directory as `captune train` leaves it (tiny base, `best/`), with LoRA and modules_to_save weights made
    random: LoRA B starts at zero, and an adapter that changes nothing would hide a merge that drops it."""
    config = load_config(None, ["num_beams=1", "min_new_tokens=1", "max_new_tokens=8", *overrides])
    loaded = build_tiny(0)
    save_base(root / "base-model", loaded)
    loaded.model = apply_train_mode(loaded.model, config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in loaded.model.named_parameters():
            if ".lora_B." in name:
                param.copy_(torch.randn(param.shape, generator=generator))
            elif ".modules_to_save." in name or (not training_mode(config).lora and param.requires_grad):
                param.add_(torch.randn(param.shape, generator=generator))
    loaded.model.eval()
    save_model_dir(root / "best", loaded, config, root / "base-model")
    return loaded, config, root / "best"


@pytest.fixture
def run(tmp_path: Path) -> tuple[LoadedModel, Config, Path]:
    """Default LoRA (language model q_proj, v_proj), saved with val metrics as training writes them."""
    loaded, config, best = save_run(tmp_path / "run", [])
    (best / "metrics.json").write_text(json.dumps(METRICS))
    return loaded, config, best
