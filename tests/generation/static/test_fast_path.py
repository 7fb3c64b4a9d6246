"""What a model's fast path keeps between calls (held caches, the compiled image side), the order of a small
batch's work, and the compiled parts within the compiler's recompile limit."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from PIL import Image

from captune.config import GenerateConfig
from captune.generation import static as static_entry
from captune.generation.core import generate_captions
from captune.generation.inputs import text_inputs
from captune.generation.static import StaticOptions, decoder, fast_path
from captune.model import LoadedModel, build_tiny

from ..conftest import _images
from .conftest import _traced_compiles


def test_a_model_and_its_peft_wrapper_share_one_fast_path_with_the_default_options(tiny: LoadedModel) -> None:
    from captune.config_loading import load_config
    from captune.model import apply_lora

    path = fast_path(tiny.model)
    assert fast_path(tiny.model) is path and path.options == StaticOptions()
    assert fast_path(apply_lora(tiny.model, load_config(None, []).lora)) is path
    assert fast_path(build_tiny(0).model) is not path


def test_a_small_static_batch_starts_its_compiled_image_side_before_the_text_inputs(
    tiny: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    # On a GPU the compiled image side is launched first, so that the GPU works while the host builds the text inputs
    # and the decoder; here it is a stand-in (CPU: nothing compiles) that records when it ran.

    calls: list[str] = []
    real_text_inputs = text_inputs
    on_gpu = iter([True])  # generate_from_pixels asks first; the decoder's later questions get False (CPU)

    def image_side(blip: Any) -> Any:
        def run(pixels: torch.Tensor) -> torch.Tensor:
            calls.append("image side")
            return blip.get_image_features(pixel_values=pixels, return_dict=True).pooler_output

        return run

    monkeypatch.setattr(decoder, "compiles", lambda blip, device: next(on_gpu, False))
    monkeypatch.setattr(decoder, "compiled_image_side", image_side)
    monkeypatch.setattr(
        static_entry, "text_inputs", lambda *a, **k: calls.append("text inputs") or real_text_inputs(*a, **k)
    )
    real_embedded = decoder.embedded_inputs
    monkeypatch.setattr(decoder, "embedded_inputs", lambda *a: calls.append("embedded") or real_embedded(*a))
    options = GenerateConfig(num_beams=1, min_new_tokens=2, max_new_tokens=6)
    expected = generate_captions(tiny.model, tiny.processor, _images(), options)
    calls.clear()
    static = GenerateConfig(num_beams=1, min_new_tokens=2, max_new_tokens=6, static_cache=True)
    assert generate_captions(tiny.model, tiny.processor, _images(), static) == expected
    assert calls == ["image side", "text inputs", "embedded"]


@pytest.mark.usefixtures("fresh_compiles")
def test_a_servers_mix_of_sizes_beams_and_lengths_stays_within_the_compilers_recompile_limit(
    tiny: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A server's requests come with 1-32 images, 1-5 beams and their own max_new_tokens: every compiled part of the
    # static loops (the decode step, the compiled prefill and image side, beam search's cache reorder) must settle on
    # graphs with dynamic sizes before dynamo's recompile limit, past which it would run that part uncompiled. Here
    # dynamo traces as on a GPU (CUDA graphs aside) and is made to fail at the limit instead.
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    lm = tiny.model.language_model
    asked = _traced_compiles(monkeypatch)
    monkeypatch.setattr(decoder, "compiles", lambda blip, device: True)
    monkeypatch.setattr(torch._dynamo.config, "fail_on_recompile_limit_hit", True)
    images = [Image.new("RGB", (40, 30), (i * 40 % 255, 20 + i, 200)) for i in range(8)]
    torch._dynamo.reset()
    try:
        for new in (6, 10, 20, 12):
            for beams in (1, 2, 3):
                for size in (1, 2, 3, 8):
                    options = GenerateConfig(num_beams=beams, min_new_tokens=2, max_new_tokens=new, static_cache=True)
                    assert len(generate_captions(tiny.model, tiny.processor, images[:size], options)) == size
        reorder_graphs = len(_debug_get_cache_entry_list(decoder._reorder_rows.__code__))
    finally:
        torch._dynamo.reset()
        fast_path(tiny.model).image_side = None  # the shared tiny model as it was
        for name in ("_compiled_call", "_last_compile_config"):
            vars(lm).pop(name, None)
    assert len(asked) == 4  # the decode step, the prefill, the image side, the reorder: each compiled once
    assert reorder_graphs <= 4  # dynamic from the start: far from the limit (static first, it reached 8)


def test_single_captions_reuse_their_static_caches_emptied(tiny: LoadedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    """Calls without caches (a single caption, a server's request) keep small static caches on the model: the next
    call decodes into the same tensors (no allocation; CUDA graphs replay at their addresses), emptied first, so
    every caption is that of fresh caches; a call of more rows than `StaticOptions.held_cache_rows` keeps none."""

    path = fast_path(tiny.model)
    path.caches.clear()
    emptied: list[int] = []
    real_reset = decoder._reset
    monkeypatch.setattr(decoder, "_reset", lambda cache: emptied.append(id(cache)) or real_reset(cache))
    options = GenerateConfig(num_beams=1, min_new_tokens=2, max_new_tokens=6)
    static = GenerateConfig(num_beams=1, min_new_tokens=2, max_new_tokens=6, static_cache=True)
    addresses = []
    for image in _images():
        assert generate_captions(tiny.model, tiny.processor, [image], static) == generate_captions(
            tiny.model, tiny.processor, [image], options
        )
        cache = path.caches["prefill"][1]
        addresses.append([layer.keys.data_ptr() for layer in cache.layers])
    assert addresses[0] == addresses[1] == addresses[2]
    assert emptied == [id(path.caches["prefill"][1])] * 2  # before the 2nd and the 3rd caption
    monkeypatch.setattr(path, "options", StaticOptions(held_cache_rows=2))
    held = dict(path.caches)
    generate_captions(tiny.model, tiny.processor, _images(), static)  # 3 rows
    assert path.caches == held
