"""Shared fixtures: the tiny BLIP-2 built from config, a small synthetic dataset, and image files made on the fly."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a hub lookup without it hangs for minutes before failing
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from captune.data.synthetic import SyntheticSpec, generate_synthetic  # noqa: E402
from captune.model import LoadedModel, build_tiny  # noqa: E402

SMALL_SPEC = SyntheticSpec(train=24, val=6, test=6, seed=1)

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
