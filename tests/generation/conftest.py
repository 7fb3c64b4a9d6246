"""Images, image files and a call recorder shared by the captioning tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from captune.config import GenerateConfig
from captune.generation import core, files

from ..conftest import write_image

GREEDY = GenerateConfig(num_beams=1, min_new_tokens=1, max_new_tokens=6)


COLOURS = [(200, 20, 20), (20, 180, 40), (30, 40, 220), (230, 210, 30), (120, 120, 120)]


def _images() -> list[Image.Image]:
    return [Image.new("RGB", (40, 30), colour) for colour in COLOURS[:3]]


def _files(folder: Path, count: int) -> list[Path]:
    return [write_image(folder / f"img{i}.png", COLOURS[i], fmt="PNG") for i in range(count)]


def _text_named_jpg(path: Path) -> Path:
    path.write_text("not an image")
    return path


@pytest.fixture
def sizes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The batch size of every `generate_from_pixels` call that `caption_paths` makes, in order."""

    seen: list[int] = []
    real = core.generate_from_pixels

    def recording(model: Any, processor: Any, pixels: torch.Tensor, *rest: Any, **named: Any) -> list[str]:
        seen.append(len(pixels))
        return real(model, processor, pixels, *rest, **named)

    monkeypatch.setattr(files, "generate_from_pixels", recording)
    return seen
