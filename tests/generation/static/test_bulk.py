"""`caption_paths` through the static loops: batches filled to one size, one set of caches for a run, and each
batch's image side made ahead of its decoding."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from captune.config import GenerateConfig
from captune.data.images import load_rgb
from captune.generation import core, files
from captune.generation.core import generate_captions
from captune.generation.files import caption_paths
from captune.generation.static import decoder
from captune.model import LoadedModel

from ..conftest import _files, _text_named_jpg


def test_static_cache_batches_are_filled_to_one_size(tiny: LoadedModel, tmp_path: Path, sizes: list[int]) -> None:
    paths = _files(tmp_path, 4)
    paths.insert(1, _text_named_jpg(tmp_path / "bad.jpg"))
    plain = GenerateConfig(num_beams=1, min_new_tokens=1, max_new_tokens=6, batch_size=2)
    static = GenerateConfig(num_beams=1, min_new_tokens=1, max_new_tokens=6, batch_size=2, static_cache=True)
    expected = [(r.image, r.caption, r.error) for r in caption_paths(tiny.model, tiny.processor, paths, plain)]
    assert sizes == [1, 2, 1]  # the bad file leaves the first batch one image short; 5 files make a short last batch
    sizes.clear()
    filled = [(r.image, r.caption, r.error) for r in caption_paths(tiny.model, tiny.processor, paths, static)]
    assert sizes == [2, 2, 2] and filled == expected


@pytest.mark.parametrize("beams", [1, 2])
def test_a_run_keeps_its_static_caches_from_batch_to_batch(
    tiny: LoadedModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, beams: int
) -> None:
    """Every batch of a `caption_paths` run decodes into the same cache tensors (CUDA graphs replay at the addresses
    they recorded), emptied in between: the captions are those of fresh caches, batch by batch."""

    used: list[list[int]] = []
    real = decoder._static_cache

    def recording(held: Any, role: str, shape: tuple, config: Any) -> Any:
        cache = real(held, role, shape, config)
        used.append([id(cache), role])
        return cache

    monkeypatch.setattr(decoder, "_static_cache", recording)
    paths = _files(tmp_path, 5)
    static = GenerateConfig(num_beams=beams, min_new_tokens=1, max_new_tokens=6, batch_size=2, static_cache=True)
    kept = [r.caption for r in caption_paths(tiny.model, tiny.processor, paths, static)]
    roles = ["prefill"] if beams == 1 else ["prefill", "beams"]
    assert len(used) == 3 * len(roles)  # 3 batches (the last filled up to 2 images)
    for role in roles:
        assert len({cache for cache, r in used if r == role}) == 1, role
    fresh = [generate_captions(tiny.model, tiny.processor, [load_rgb(p)], static)[0] for p in paths]
    assert kept == fresh


def test_a_static_run_makes_each_batchs_image_features_once_ahead_of_its_decoding(
    tiny: LoadedModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The static path computes a batch's image side before the previous batch decodes (on a GPU, on a second
    stream) and hands the features to the loop: the image side runs once per batch, and the model ends in the mode
    it started in."""

    events: list[str] = []
    real_features = tiny.model.get_image_features
    monkeypatch.setattr(tiny.model, "get_image_features",
                        lambda **kwargs: events.append("features") or real_features(**kwargs))  # fmt: skip
    real_generate = core.generate_from_pixels

    def decoding(model: Any, processor: Any, pixels: torch.Tensor, *rest: Any, **named: Any) -> list[str]:
        assert rest[-1] is not None  # the features made ahead
        events.append("decode")
        return real_generate(model, processor, pixels, *rest, **named)

    monkeypatch.setattr(files, "generate_from_pixels", decoding)
    was_training = tiny.model.training
    tiny.model.train()
    static = GenerateConfig(num_beams=1, min_new_tokens=1, max_new_tokens=6, batch_size=2, static_cache=True)
    results = list(caption_paths(tiny.model, tiny.processor, _files(tmp_path, 5), static))
    assert events == ["features", "features", "decode", "features", "decode", "decode"]
    ended_training = tiny.model.training
    tiny.model.train(was_training)
    assert ended_training and all(r.caption for r in results)
