"""Batched captioning: one caption per image, batch invariance, prompt handling, files in order with their errors,
and how command-line inputs become image paths."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from captune.config import GenerateConfig
from captune.data.images import load_rgb
from captune.generation import core, files
from captune.generation import static as static_entry
from captune.generation.core import generate_captions
from captune.generation.files import caption_paths, expand_inputs
from captune.generation.inputs import text_inputs
from captune.generation.static import attention, decoder, linears, loops
from captune.model import LoadedModel

from .conftest import write_image, write_truncated_jpeg

GREEDY = GenerateConfig(num_beams=1, min_new_tokens=1, max_new_tokens=6)
COLOURS = [(200, 20, 20), (20, 180, 40), (30, 40, 220), (230, 210, 30), (120, 120, 120)]


def _images() -> list[Image.Image]:
    return [Image.new("RGB", (40, 30), colour) for colour in COLOURS[:3]]


# --- generate_captions on the tiny model -----------------------------------------------------------------------


def test_one_caption_string_per_image(tiny: LoadedModel) -> None:
    captions = generate_captions(tiny.model, tiny.processor, _images(), GREEDY)
    assert len(captions) == 3
    assert all(isinstance(c, str) and c for c in captions)


def test_captions_are_deterministic(tiny: LoadedModel) -> None:
    images, options = _images(), GenerateConfig(num_beams=3, min_new_tokens=1, max_new_tokens=6)
    first = generate_captions(tiny.model, tiny.processor, images, options)
    assert generate_captions(tiny.model, tiny.processor, images, options) == first


def test_captions_differ_between_images(tiny: LoadedModel) -> None:
    # Guards the batch tests below: identical captions for every image would make them pass vacuously.
    assert len(set(generate_captions(tiny.model, tiny.processor, _images(), GREEDY))) > 1


@pytest.mark.parametrize("num_beams", [1, 3])
def test_an_image_gets_the_same_caption_alone_and_in_a_batch(tiny: LoadedModel, num_beams: int) -> None:
    options = GenerateConfig(num_beams=num_beams, min_new_tokens=1, max_new_tokens=6)
    images = _images()
    batched = generate_captions(tiny.model, tiny.processor, images, options, prompt="a picture of")
    alone = [generate_captions(tiny.model, tiny.processor, [im], options, prompt="a picture of")[0] for im in images]
    assert batched == alone


def test_min_and_max_new_tokens_bound_the_caption_length(tiny: LoadedModel) -> None:
    options = GenerateConfig(num_beams=1, min_new_tokens=4, max_new_tokens=4)
    captions = generate_captions(tiny.model, tiny.processor, _images(), options)
    # Every word of the tiny vocabulary is one token.
    assert [len(c.split()) for c in captions] == [4, 4, 4]


def test_a_model_in_training_mode_is_left_in_training_mode(tiny: LoadedModel) -> None:
    tiny.model.train()
    generate_captions(tiny.model, tiny.processor, _images()[:1], GREEDY)
    assert tiny.model.training


# --- prompt handling, with a stand-in whose continuation is known ----------------------------------------------


class _FixedContinuation(torch.nn.Module):
    """Stands in for a decoder-only BLIP-2: `generate` returns the input ids followed by the same new words."""

    def __init__(self, tiny: LoadedModel, words: str):
        super().__init__()
        self.config = tiny.model.config
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.new_ids = tiny.processor.tokenizer(words, add_special_tokens=False).input_ids

    def generate(self, input_ids: torch.Tensor, **_: object) -> torch.Tensor:
        new = torch.tensor(self.new_ids).expand(len(input_ids), -1)
        return torch.cat([input_ids, new], dim=1)


@pytest.mark.parametrize(
    ("prompt", "continuation", "expected"),
    [
        ("", "a red circle", "a red circle"),
        ("a picture of", "a red circle", "a red circle"),
        ("a picture of", "a picture of a red circle", "a red circle"),
        ("  a   picture of ", "a picture of a red circle", "a red circle"),
        ("a", "at the top", "at the top"),
        ("a picture", "a picture", ""),
    ],
    ids=[
        "no-prompt",
        "prompt-not-returned",
        "repeated-prompt-stripped",
        "prompt-spacing",
        "whole-words-only",
        "only-the-prompt",
    ],  # fmt: skip
)
def test_prompt_is_fed_and_not_returned(tiny: LoadedModel, prompt: str, continuation: str, expected: str) -> None:
    model = _FixedContinuation(tiny, continuation)
    assert generate_captions(model, tiny.processor, _images()[:2], GREEDY, prompt=prompt) == [expected, expected]


# --- caption_paths ---------------------------------------------------------------------------------------------


def _files(folder: Path, count: int) -> list[Path]:
    return [write_image(folder / f"img{i}.png", COLOURS[i], fmt="PNG") for i in range(count)]


def test_caption_paths_matches_generate_captions_across_batches(tiny: LoadedModel, tmp_path: Path) -> None:
    paths = _files(tmp_path, 5)
    options = GenerateConfig(num_beams=1, min_new_tokens=1, max_new_tokens=6, batch_size=2)
    results = list(caption_paths(tiny.model, tiny.processor, paths, options))
    expected = generate_captions(tiny.model, tiny.processor, [load_rgb(p) for p in paths], GREEDY)
    assert [(r.image, r.caption, r.error) for r in results] == [
        (str(p), c, None) for p, c in zip(paths, expected, strict=True)
    ]


@pytest.mark.parametrize("num_beams", [1, 3])
def test_caption_paths_gives_plain_generates_tokens(tiny: LoadedModel, tmp_path: Path, num_beams: int) -> None:
    """The fast path (pixels from workers, text inputs built without the processor) equals the usual loop:
    `processor(images, text)` then `model.generate`, decoded, token for token in fp32."""
    paths = _files(tmp_path, 5)
    options = GenerateConfig(num_beams=num_beams, min_new_tokens=2, max_new_tokens=6, batch_size=3)
    ours = [r.caption for r in caption_paths(tiny.model, tiny.processor, paths, options, "a picture of", 2)]
    tokenizer = tiny.processor.tokenizer
    tokenizer.padding_side = "left"
    inputs = tiny.processor(images=[load_rgb(p) for p in paths], text=["a picture of"] * 5, return_tensors="pt")
    with torch.no_grad():
        output = tiny.model.generate(**inputs, num_beams=num_beams, min_new_tokens=2, max_new_tokens=6,
                                     do_sample=False)  # fmt: skip
    plain = tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert ours == [" ".join(text.split()) for text in plain]


@pytest.mark.parametrize("num_beams", [1, 3])
def test_a_static_cache_gives_the_same_captions(tiny: LoadedModel, num_beams: int) -> None:
    options = GenerateConfig(num_beams=num_beams, min_new_tokens=2, max_new_tokens=6)
    static = GenerateConfig(num_beams=num_beams, min_new_tokens=2, max_new_tokens=6, static_cache=True)
    expected = generate_captions(tiny.model, tiny.processor, _images(), options)
    assert generate_captions(tiny.model, tiny.processor, _images(), static) == expected


@pytest.mark.parametrize("beams", [1, 4])
@pytest.mark.parametrize(("prompt", "min_new"), [("", 1), ("a picture of", 0), ("a picture of", 3)])
def test_captunes_static_loops_give_generates_captions(
    tiny: LoadedModel, prompt: str, min_new: int, beams: int
) -> None:
    dynamic = GenerateConfig(num_beams=beams, min_new_tokens=min_new, max_new_tokens=10)
    static = GenerateConfig(num_beams=beams, min_new_tokens=min_new, max_new_tokens=10, static_cache=True)
    expected = generate_captions(tiny.model, tiny.processor, _images(), dynamic, prompt)
    assert generate_captions(tiny.model, tiny.processor, _images(), static, prompt) == expected
    assert any(expected)


@pytest.mark.parametrize("beams", [1, 3])
def test_captunes_static_loops_run_the_adapter(tiny: LoadedModel, beams: int) -> None:
    from captune.config import load_config
    from captune.model import apply_lora

    model = apply_lora(tiny.model, load_config(None, []).lora)
    torch.manual_seed(1)
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            parameter.data.normal_(0, 0.5)  # an adapter that changes the captions
    options = GenerateConfig(num_beams=beams, min_new_tokens=2, max_new_tokens=8)
    static = GenerateConfig(num_beams=beams, min_new_tokens=2, max_new_tokens=8, static_cache=True)
    with_adapter = generate_captions(model, tiny.processor, _images(), options)
    assert generate_captions(model, tiny.processor, _images(), static) == with_adapter
    with model.disable_adapter():
        assert generate_captions(model, tiny.processor, _images(), options) != with_adapter


def test_captunes_static_greedy_loop_ends_rows_at_eos_and_stops_early(
    tiny: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:

    lm = tiny.model.language_model
    eos = lm.generation_config.eos_token_id
    bonus = torch.zeros(lm.config.vocab_size)
    bonus[eos] = 1e4  # EOS wins wherever it is allowed: after min_new_tokens
    lm.lm_head.register_forward_hook(lambda module, inputs, output: output + bonus)
    monkeypatch.setattr(loops, "STATIC_CHECK_EVERY", 2)
    options = GenerateConfig(num_beams=1, min_new_tokens=3, max_new_tokens=12, static_cache=True)
    pixels = tiny.processor.image_processor(_images(), return_tensors="pt")["pixel_values"]
    ids = torch.tensor([[tiny.model.config.image_token_id] * 8 + [lm.config.bos_token_id]] * len(pixels))
    tokens = loops.static_greedy(tiny.model, ids, pixels, options)
    assert tokens.shape[1] == 4  # 3 tokens, EOS, then the check after step 4 finds every row ended
    assert (tokens[:, 3] == eos).all() and not (tokens[:, :3] == eos).any()
    plain = GenerateConfig(num_beams=1, min_new_tokens=3, max_new_tokens=12)
    assert generate_captions(tiny.model, tiny.processor, _images(), options) == generate_captions(
        tiny.model, tiny.processor, _images(), plain
    )


def _favour_eos(tiny: LoadedModel, bonus: float) -> Any:
    """Adds `bonus` to the EOS logit, so that beams end at different steps (0: the model as it is)."""
    lm = tiny.model.language_model
    extra = torch.zeros(lm.config.vocab_size)
    extra[lm.generation_config.eos_token_id] = bonus
    return lm.lm_head.register_forward_hook(lambda module, inputs, output: output + extra)


ENDINGS = [(0.0, False, 1.0), (0.5, False, 1.0), (0.5, False, 2.0), (0.5, True, 1.0), (0.5, "never", 1.0),
           (0.5, "never", 2.0), (1.0, "never", 1.0), (1.0, False, -1.0)]  # fmt: skip
"""EOS logit bonus, early_stopping, length_penalty: beams ending at many lengths (checked against generate on CPU)."""


@pytest.mark.parametrize(("bonus", "early_stopping", "length_penalty"), ENDINGS)
def test_captunes_beam_search_scores_ended_beams_as_generate_does(
    tiny: LoadedModel, monkeypatch: pytest.MonkeyPatch, bonus: float, early_stopping: Any, length_penalty: float
) -> None:
    """Beams that end at different lengths: the finished set, the length penalty and each early_stopping mode."""
    config = tiny.model.language_model.generation_config
    monkeypatch.setattr(config, "early_stopping", early_stopping)
    monkeypatch.setattr(config, "length_penalty", length_penalty)
    hook = _favour_eos(tiny, bonus)
    try:
        images = _images() + [Image.new("RGB", (40, 30), colour) for colour in COLOURS[3:]]
        dynamic = GenerateConfig(num_beams=3, min_new_tokens=2, max_new_tokens=12)
        static = GenerateConfig(num_beams=3, min_new_tokens=2, max_new_tokens=12, static_cache=True)
        expected = generate_captions(tiny.model, tiny.processor, images, dynamic)
        assert generate_captions(tiny.model, tiny.processor, images, static) == expected
    finally:
        hook.remove()
    if bonus:  # the case is one of beams ending early
        assert any(len(caption.split()) < 12 for caption in expected)


def test_captunes_beam_search_stops_at_a_check_with_generates_tokens(
    tiny: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With early stopping every image's beams are done after 2 tokens + EOS: the loop stops at the next check
    (not at max_new_tokens) and returns generate's tokens, EOS and then padding."""

    monkeypatch.setattr(tiny.model.language_model.generation_config, "early_stopping", True)
    monkeypatch.setattr(loops, "STATIC_CHECK_EVERY", 2)
    steps: list[int] = []
    real_step = decoder.StaticDecoder.step
    monkeypatch.setattr(
        decoder.StaticDecoder, "step", lambda self, tokens, i: steps.append(i) or real_step(self, tokens, i)
    )
    hook = _favour_eos(tiny, 1e4)
    try:
        pixels = tiny.processor.image_processor(_images(), return_tensors="pt")["pixel_values"]
        lm = tiny.model.language_model
        ids = torch.tensor([[tiny.model.config.image_token_id] * 8 + [lm.config.bos_token_id]] * len(pixels))
        options = GenerateConfig(num_beams=3, min_new_tokens=2, max_new_tokens=12, static_cache=True)
        tokens = loops.static_beam(tiny.model, ids, pixels, options)
        output = tiny.model.generate(input_ids=ids, pixel_values=pixels, attention_mask=torch.ones_like(ids),
                                     num_beams=3, min_new_tokens=2, max_new_tokens=12, do_sample=False)  # fmt: skip
    finally:
        hook.remove()
    new = output[:, ids.shape[1] :]
    assert (
        torch.equal(tokens[:, : new.shape[1]], new)
        and (tokens[:, new.shape[1] :] == lm.generation_config.pad_token_id).all()
    )
    assert (tokens[:, 2] == lm.generation_config.eos_token_id).all()
    assert steps == [0, 1, 2]  # tokens 0-2 fed; after token 3 (a check) every image is done


def test_worker_processes_keep_order_and_errors(tiny: LoadedModel, tmp_path: Path) -> None:
    paths = _files(tmp_path, 5)
    paths.insert(2, _text_named_jpg(tmp_path / "bad.jpg"))
    options = GenerateConfig(num_beams=1, min_new_tokens=1, max_new_tokens=6, batch_size=2)
    serial = [(r.image, r.caption, r.error) for r in caption_paths(tiny.model, tiny.processor, paths, options)]
    workers = [(r.image, r.caption, r.error) for r in caption_paths(tiny.model, tiny.processor, paths, options, "", 2)]
    assert workers == serial and serial[2][1] is None and serial[2][2] is not None


@pytest.fixture
def sizes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The batch size of every `generate_from_pixels` call that `caption_paths` makes, in order."""

    seen: list[int] = []
    real = core.generate_from_pixels

    def recording(model: Any, processor: Any, pixels: torch.Tensor, *rest: Any) -> list[str]:
        seen.append(len(pixels))
        return real(model, processor, pixels, *rest)

    monkeypatch.setattr(files, "generate_from_pixels", recording)
    return seen


def test_workers_make_shares_of_a_batch_and_the_model_gets_whole_batches(
    tiny: LoadedModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sizes: list[int]
) -> None:
    # 3 workers each make 2 images of a 5-image batch, so the first batch is ready when each made its first share.

    shares: list[int] = []
    real_loader = files.DataLoader

    def loader(*args: Any, **kwargs: Any) -> Any:
        shares.append(kwargs["batch_size"])
        return real_loader(*args, **kwargs)

    monkeypatch.setattr(files, "DataLoader", loader)
    paths = _files(tmp_path, 4) * 3  # 12 images (the same file may come twice)
    options = GenerateConfig(num_beams=1, min_new_tokens=1, max_new_tokens=6, batch_size=5)
    results = list(caption_paths(tiny.model, tiny.processor, paths, options, "", 3))
    assert shares == [2] and sizes == [5, 5, 2]
    assert [r.image for r in results] == [str(p) for p in paths] and all(r.caption for r in results)


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


def test_regrouped_keeps_order_and_sizes() -> None:
    from captune.data.images import rebatched

    chunks = [[(i, None, None) for i in range(start, min(start + 3, 11))] for start in range(0, 11, 3)]
    groups = list(rebatched(chunks, 4, lambda parts: [item for part in parts for item in part]))
    assert [[item[0] for item in group] for group in groups] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10]]


def _truncated(path: Path) -> Path:
    return write_truncated_jpeg(path)


def _text_named_jpg(path: Path) -> Path:
    path.write_text("not an image")
    return path


def _missing(path: Path) -> Path:
    return path


@pytest.mark.parametrize("make_bad", [_truncated, _text_named_jpg, _missing], ids=["truncated", "text", "missing"])
def test_an_unreadable_file_gets_an_error_in_its_place_and_the_rest_are_captioned(
    tiny: LoadedModel, tmp_path: Path, make_bad: Callable[[Path], Path]
) -> None:
    good = _files(tmp_path, 4)
    bad = make_bad(tmp_path / "bad.jpg")
    paths = [good[0], good[1], bad, good[2], good[3]]
    options = GenerateConfig(num_beams=1, min_new_tokens=1, max_new_tokens=6, batch_size=2)
    results = list(caption_paths(tiny.model, tiny.processor, paths, options))
    assert [r.image for r in results] == [str(p) for p in paths]
    assert results[2].caption is None
    assert results[2].error is not None and results[2].error.startswith(f"{bad}: ")
    assert all(r.caption and r.error is None for i, r in enumerate(results) if i != 2)


def test_caption_paths_with_only_bad_files_yields_only_errors(tiny: LoadedModel, tmp_path: Path) -> None:
    results = list(caption_paths(tiny.model, tiny.processor, [tmp_path / "a.jpg", tmp_path / "b.jpg"], GREEDY))
    assert [(r.caption, r.error is not None) for r in results] == [(None, True), (None, True)]


# --- expand_inputs ---------------------------------------------------------------------------------------------


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """photos/{b.png, a.JPG, notes.txt, nested/c.jpeg, nested/d.webp}, and an empty folder."""
    root = tmp_path / "photos"
    write_image(root / "b.png", fmt="PNG")
    write_image(root / "a.JPG")
    (root / "notes.txt").write_text("not an image")
    write_image(root / "nested" / "c.jpeg")
    write_image(root / "nested" / "d.webp", fmt="WEBP")
    (tmp_path / "empty").mkdir()
    return tmp_path


def test_a_file_is_taken_as_given(tree: Path) -> None:
    # A file named directly is kept whatever its suffix: captioning it reports what is wrong.
    assert expand_inputs([str(tree / "photos" / "notes.txt")]) == ([tree / "photos" / "notes.txt"], [])


def test_a_folder_gives_its_images_recursively_and_sorted(tree: Path) -> None:
    root = tree / "photos"
    paths, failures = expand_inputs([str(root)])
    assert paths == [root / "a.JPG", root / "b.png", root / "nested" / "c.jpeg", root / "nested" / "d.webp"]
    assert failures == []


def test_a_glob_gives_its_matching_files_sorted(tree: Path) -> None:
    root = tree / "photos"
    assert expand_inputs([str(root / "**" / "*.*p*g")]) == ([root / "b.png", root / "nested" / "c.jpeg"], [])


def test_inputs_keep_their_order(tree: Path) -> None:
    root = tree / "photos"
    paths, _ = expand_inputs([str(root / "nested"), str(root / "b.png")])
    assert paths == [root / "nested" / "c.jpeg", root / "nested" / "d.webp", root / "b.png"]


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("photos/absent.jpg", "no such file or folder"),
        ("photos/*.gif", "the pattern matches no file"),
        ("empty", "folder holds no image files"),
    ],
)
def test_a_name_that_gives_no_image_is_a_failure_that_names_it(tree: Path, name: str, reason: str) -> None:
    item = str(tree / name)
    paths, failures = expand_inputs([item, str(tree / "photos" / "b.png")])
    assert paths == [tree / "photos" / "b.png"]
    assert [(f.image, f.caption, f.error) for f in failures] == [(item, None, f"{item}: {reason}")]


def test_the_compiled_cache_reorder_moves_what_the_eager_one_moves() -> None:
    """On a GPU beam search reorders the cache with the compiled `_reorder_rows` (the region grows every step, so
    its end becomes a dynamic size); compiled here on the CPU, it must match the eager function step by step."""

    torch.manual_seed(0)
    compiled = [torch.randn(6, 2, 10, 4) for _ in range(3)]
    eager = [t.clone() for t in compiled]
    for stop in (4, 5, 6):
        sources = torch.randint(0, 6, (6,))
        decoder._reorder_rows(eager, sources, 3, stop)
        decoder._compiled_reorder()(compiled, sources, 3, stop)
        assert all(torch.equal(a, b) for a, b in zip(compiled, eager, strict=True)), stop


def test_static_loops_run_their_one_query_attention_and_give_the_model_back(
    tiny: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The decode steps' attention is captune's (PyTorch's kernels are slow for one query over a masked static
    cache); the captions stay generate's, and the language model leaves on SDPA, also after an error."""

    config = tiny.model.language_model.config
    assert config._attn_implementation == "sdpa"
    queries: list[int] = []
    real = attention._one_query_attention

    rows: list[int] = []

    def counting(module: Any, query: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        queries.append(query.shape[2])
        rows.append(query.shape[0])
        return real(module, query, *args, **kwargs)

    monkeypatch.setattr(attention, "_one_query_attention", counting)
    options = GenerateConfig(num_beams=2, min_new_tokens=2, max_new_tokens=5)
    expected = generate_captions(tiny.model, tiny.processor, _images(), options)
    static = GenerateConfig(num_beams=2, min_new_tokens=2, max_new_tokens=5, static_cache=True)
    assert generate_captions(tiny.model, tiny.processor, _images(), static) == expected
    layers = config.num_hidden_layers
    assert queries.count(1) == 4 * layers and queries.count(9) == layers  # 4 one-token steps, the 9-token prefill
    prefill_rows = {r for q, r in zip(queries, rows, strict=True) if q == 9}
    assert prefill_rows == {3} and set(rows) == {3, 6}  # the prompt prefilled once per image, then 2 beams each
    assert config._attn_implementation == "sdpa"
    monkeypatch.setattr(static_entry, "static_beam", lambda *args: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        generate_captions(tiny.model, tiny.processor, _images(), static)
    assert config._attn_implementation == "sdpa"


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

    def decoding(model: Any, processor: Any, pixels: torch.Tensor, *rest: Any) -> list[str]:
        assert rest[-1] is not None  # the features made ahead
        events.append("decode")
        return real_generate(model, processor, pixels, *rest)

    monkeypatch.setattr(files, "generate_from_pixels", decoding)
    was_training = tiny.model.training
    tiny.model.train()
    static = GenerateConfig(num_beams=1, min_new_tokens=1, max_new_tokens=6, batch_size=2, static_cache=True)
    results = list(caption_paths(tiny.model, tiny.processor, _files(tmp_path, 5), static))
    assert events == ["features", "features", "decode", "features", "decode", "decode"]
    ended_training = tiny.model.training
    tiny.model.train(was_training)
    assert ended_training and all(r.caption for r in results)


# --- when the static loops look, and when to advise them ---------------------------------------------------------


def test_static_loops_look_for_the_end_only_where_a_row_may_have_ended(monkeypatch: pytest.MonkeyPatch) -> None:

    monkeypatch.setattr(loops, "STATIC_CHECK_EVERY", 2)
    looks = [i for i in range(10) if loops._check_at(i, GenerateConfig(min_new_tokens=6, max_new_tokens=10))]
    assert looks == [7, 9]  # EOS is banned for new tokens 0-5: no row can end before number 6
    anywhere = GenerateConfig(min_new_tokens=0, max_new_tokens=10)
    assert [i for i in range(10) if loops._check_at(i, anywhere)] == [1, 3, 5, 7, 9]


@pytest.mark.parametrize(
    ("images", "beams", "static", "device", "own_loop", "advised"),
    [
        (10_000, 1, False, "cuda", True, True),
        (9_999, 1, False, "cuda", True, False),  # too short to pay for the warm-up
        (3_000, 5, False, "cuda", True, True),  # beam search pays sooner
        (2_999, 5, False, "cuda", True, False),
        (50_000, 1, True, "cuda", True, False),  # already on
        (50_000, 1, False, "cpu", True, False),  # nothing is compiled on a CPU
        (50_000, 1, False, "cuda", False, False),  # Flan-T5 or a repetition penalty: transformers' static cache
    ],
)
def test_the_static_cache_is_advised_for_long_gpu_runs_only(
    images: int, beams: int, static: bool, device: str, own_loop: bool, advised: bool
) -> None:
    from captune.generation.core import static_cache_advice

    options = GenerateConfig(num_beams=beams, static_cache=static)
    advice = static_cache_advice(images, options, device, own_loop)
    assert (advice is not None) == advised
    if advice:
        assert f"{images} images" in advice and "--static-cache" in advice


@pytest.fixture
def fresh_compiles() -> Any:
    """captune's compile-once functions emptied before and after the test (which compiles them its own way)."""

    for once in (decoder._compiled_prefill, decoder._compiled_reorder):
        once.cache_clear()
    yield
    for once in (decoder._compiled_prefill, decoder._compiled_reorder):
        once.cache_clear()


def _traced_compiles(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """torch.compile made to trace with dynamo and run the traced graph as is (no CUDA graphs on a CPU), with
    `fullgraph` as asked (a graph break then fails); returns the list of the options each call asked for."""
    asked: list[dict[str, Any]] = []
    real_compile = torch.compile

    def traced(function: Any, **options: Any) -> Any:
        asked.append(options)
        dynamic = {"dynamic": options["dynamic"]} if "dynamic" in options else {}
        return real_compile(function, backend="eager", fullgraph=options["fullgraph"], **dynamic)

    monkeypatch.setattr(torch, "compile", traced)
    return asked


def test_the_compiled_image_side_is_one_graph_that_gives_the_eager_features(
    tiny: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    # On a GPU the static loops run it with CUDA graphs for small batches; here dynamo traces it whole (fullgraph:
    # a graph break would fail) and runs the traced graph as is.

    asked = _traced_compiles(monkeypatch)
    blip = tiny.model
    size = tiny.processor.image_processor.size
    pixels = torch.randn(2, 3, size["height"], size["width"], generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad():
            compiled = decoder.compiled_image_side(blip)
            assert decoder.compiled_image_side(blip) is compiled  # once per model
            eager = blip.get_image_features(pixel_values=pixels, return_dict=True).pooler_output
            assert torch.equal(compiled(pixels), eager)
    finally:
        vars(blip).pop("_captune_image_side", None)  # the shared tiny model as it was
    assert asked == [{"mode": "reduce-overhead", "fullgraph": True}]


@pytest.mark.parametrize("images", [1, 2])
@pytest.mark.usefixtures("fresh_compiles")
def test_the_compiled_prefill_is_one_graph_that_fills_the_cache_as_the_eager_one(
    tiny: LoadedModel, monkeypatch: pytest.MonkeyPatch, images: int
) -> None:
    # On a GPU the static loops prefill small batches with CUDA graphs into a cache allocated ahead; here dynamo
    # traces the prefill whole (fullgraph: a graph break would fail) over such a cache and runs the traced graph.
    import inspect

    from transformers import StaticCache

    from captune.model import blip_of, embedded_inputs

    asked = _traced_compiles(monkeypatch)
    blip = blip_of(tiny.model)
    lm = blip.language_model
    name = "cache" if "cache" in inspect.signature(lm.forward).parameters else "past_key_values"
    inputs = text_inputs(tiny.model, tiny.processor, images, prompt="a picture of")
    size = tiny.processor.image_processor.size
    pixels = torch.randn(images, 3, size["height"], size["width"], generator=torch.Generator().manual_seed(0))
    total = inputs["input_ids"].shape[1] + 4
    mask, positions = torch.ones((images, total), dtype=torch.long), torch.arange(inputs["input_ids"].shape[1])
    filled = []
    with torch.no_grad():
        embeds = embedded_inputs(blip, inputs["input_ids"], pixels)
        for prefill in (decoder._prefill_logits, decoder._compiled_prefill()):
            cache = StaticCache(config=lm.config, max_cache_len=total)
            decoder._initialize(cache, lm.config, images, embeds.dtype, embeds.device)
            allocated = [layer.keys.data_ptr() for layer in cache.layers]
            logits = prefill(lm, embeds, mask, positions, name, cache)
            assert [layer.keys.data_ptr() for layer in cache.layers] == allocated  # written in place
            filled.append((logits, [(layer.keys, layer.values) for layer in cache.layers]))
    (eager_logits, eager_cache), (compiled_logits, compiled_cache) = filled
    assert eager_logits.shape == (images, lm.config.vocab_size)
    assert torch.equal(compiled_logits, eager_logits)
    written = positions.numel()
    for (keys, values), (eager_keys, eager_values) in zip(compiled_cache, eager_cache, strict=True):
        assert torch.equal(keys, eager_keys) and torch.equal(values, eager_values)
        assert keys[:, :, :written].abs().sum() > 0 and keys[:, :, written:].abs().sum() == 0
    assert asked == [{"mode": "reduce-overhead", "fullgraph": True}]


def test_static_loops_project_q_k_and_v_with_one_gemm_over_weights_of_the_moment(
    tiny: LoadedModel, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Within the static loops every OPT attention layer projects q, k and v with one GEMM over its concatenated
    weights, of which the projections' weights become views (nothing copied at a call); captions stay generate's,
    also after the weights change in place between calls or are given new tensors (copied in again, at the same
    address), the layers get their own forward back, and the model saves and loads as before."""
    from transformers import Blip2ForConditionalGeneration
    from transformers.models.opt.modeling_opt import OPTAttention

    layers = [m for m in tiny.model.language_model.modules() if isinstance(m, OPTAttention)]
    assert layers
    fused_calls: list[torch.Tensor] = []
    real_forward = linears._fused_qkv_forward

    def watched(self: Any, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        fused_calls.append(self.captune_qkv_weight)
        assert torch.equal(self.captune_qkv_weight, torch.cat([self.q_proj.weight, self.k_proj.weight,
                                                                 self.v_proj.weight]))  # fmt: skip
        return real_forward(self, hidden_states, *args, **kwargs)

    def viewed(layer: Any) -> bool:  # each projection's weight and bias are their part of the layer's buffers
        for buffer, kind in (("captune_qkv_weight", "weight"), ("captune_qkv_bias", "bias")):
            parts = [getattr(getattr(layer, n), kind) for n in ("q_proj", "k_proj", "v_proj")]
            held = getattr(layer, buffer).split([p.shape[0] for p in parts])
            if any(p.data_ptr() != h.data_ptr() or p.shape != h.shape for p, h in zip(parts, held, strict=True)):
                return False
        return True

    monkeypatch.setattr(linears, "_fused_qkv_forward", watched)
    options = GenerateConfig(num_beams=1, min_new_tokens=2, max_new_tokens=6)
    static = GenerateConfig(num_beams=1, min_new_tokens=2, max_new_tokens=6, static_cache=True)
    before = generate_captions(tiny.model, tiny.processor, _images(), options)
    assert generate_captions(tiny.model, tiny.processor, _images(), static) == before
    assert len(fused_calls) == 6 * len(layers)  # the prefill and 5 steps, every layer
    addresses = {t.data_ptr() for t in fused_calls}
    assert all(viewed(layer) for layer in layers)
    assert all("forward" not in vars(layer) for layer in layers)  # the class's forward again
    assert "captune_qkv_weight" not in tiny.model.state_dict()  # (not saved)
    generator = torch.Generator().manual_seed(3)
    saved = [(layer.v_proj.weight.detach().clone(), layer.q_proj.weight.detach().clone()) for layer in layers]
    try:
        for layer in layers:  # in place, past autograd's version counter, as a merge does it
            layer.v_proj.weight.data += torch.randn(layer.v_proj.weight.shape, generator=generator)
        changed = generate_captions(tiny.model, tiny.processor, _images(), options)
        assert changed != before
        fused_calls.clear()
        assert generate_captions(tiny.model, tiny.processor, _images(), static) == changed
        assert {t.data_ptr() for t in fused_calls} == addresses  # the same buffers
        for layer in layers:  # new tensors, as a safe merge or `.to()` gives them
            layer.q_proj.weight.data = layer.q_proj.weight.detach() + torch.randn(layer.q_proj.weight.shape,
                                                                                 generator=generator)  # fmt: skip
        assert not any(viewed(layer) for layer in layers)
        changed_again = generate_captions(tiny.model, tiny.processor, _images(), options)
        assert changed_again != changed
        fused_calls.clear()
        assert generate_captions(tiny.model, tiny.processor, _images(), static) == changed_again
        assert {t.data_ptr() for t in fused_calls} == addresses  # copied into the same buffers
        assert all(viewed(layer) for layer in layers)
        tiny.model.save_pretrained(tmp_path / "saved")  # shared storage: transformers writes the parts apart
        reloaded = Blip2ForConditionalGeneration.from_pretrained(tmp_path / "saved")
        assert all(torch.equal(v, reloaded.state_dict()[k]) for k, v in tiny.model.state_dict().items())
    finally:
        for layer, (v_weight, q_weight) in zip(layers, saved, strict=True):
            layer.v_proj.weight.data.copy_(v_weight)
            layer.q_proj.weight.data.copy_(q_weight)


def test_only_plain_weights_with_memory_are_fused() -> None:
    """Sharded (DTensor) or meta weights (offloaded) are never made views of a fused buffer."""
    from captune.generation.static.linears import _plain

    assert _plain(torch.nn.Linear(2, 2))
    assert not _plain(torch.nn.Linear(2, 2, device="meta"))


@pytest.mark.parametrize(("rows", "compiling"), [(1, True), (3, True), (1, False)])
def test_the_one_query_attention_is_sdpas_by_reductions_for_few_rows_compiled_and_products_otherwise(
    rows: int, compiling: bool, monkeypatch: pytest.MonkeyPatch
) -> None:

    generator = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(size, generator=generator) for size in ((rows, 4, 1, 8), *[(rows, 4, 6, 8)] * 2))
    mask = torch.tensor([True, True, True, False, True, False]).expand(rows, 1, 1, 6)
    expected = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=0.3)
    expected = expected.transpose(1, 2)
    used: list[str] = []
    for name in ("_reductions", "_batched_products"):
        real = getattr(attention, name)
        monkeypatch.setattr(attention, name, lambda *a, real=real, name=name: used.append(name) or real(*a))
    monkeypatch.setattr(attention, "REDUCTIONS_UP_TO", 2)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: compiling)  # as while dynamo traces the step
    out = attention._by_rows(query, key, value, mask, 0.3)
    assert used == (["_reductions"] if rows <= 2 and compiling else ["_batched_products"])
    assert out.shape == (rows, 1, 4, 8) and out.is_contiguous()
    torch.testing.assert_close(out, expected)


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
        vars(tiny.model).pop("_captune_image_side", None)  # the shared tiny model as it was
        for name in ("_compiled_call", "_last_compile_config"):
            vars(lm).pop(name, None)
    assert len(asked) == 4  # the decode step, the prefill, the image side, the reorder: each compiled once
    assert reorder_graphs <= 4  # dynamic from the start: far from the limit (static first, it reached 8)


# --- session 8: one-row products, caches kept between small calls ------------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
def test_a_gemv_is_the_linear_layers_product(bias: bool) -> None:
    from captune.generation.static.linears import _gemv

    generator = torch.Generator().manual_seed(0)
    x, weight = torch.randn(1, 1, 24, generator=generator), torch.randn(40, 24, generator=generator)
    b = torch.randn(40, generator=generator) if bias else None
    out = _gemv(x, weight, b)
    assert out.shape == (1, 1, 40) and out.dtype == x.dtype
    torch.testing.assert_close(out, torch.nn.functional.linear(x, weight, b))
    half = _gemv(x.bfloat16(), weight.bfloat16(), None if b is None else b.bfloat16())
    assert half.dtype == torch.bfloat16  # summed in float32, returned in the input's dtype


@pytest.mark.parametrize(("rows", "compiling", "expected"), [(1, True, "_gemv"), (2, True, "linear"),
                                                             (1, False, "linear")])  # fmt: skip
def test_linear_layers_take_the_gemv_only_for_few_rows_while_compiling(
    rows: int, compiling: bool, expected: str, monkeypatch: pytest.MonkeyPatch
) -> None:

    used: list[str] = []
    real_gemv, real_linear = linears._gemv, torch.nn.functional.linear
    monkeypatch.setattr(linears, "_gemv", lambda *a: used.append("_gemv") or real_gemv(*a))
    monkeypatch.setattr(torch.nn.functional, "linear", lambda *a: used.append("linear") or real_linear(*a))
    monkeypatch.setattr(linears, "GEMV_UP_TO", 1)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: compiling)
    x, weight = torch.randn(rows, 1, 8), torch.randn(5, 8)
    torch.testing.assert_close(linears._linear(x, weight), real_linear(x, weight))
    assert used == [expected]


@pytest.mark.usefixtures("fresh_compiles")
@pytest.mark.parametrize("up_to", [0, 1])
def test_compiled_one_row_steps_give_generates_captions_by_gemvs_only_when_asked(
    tiny: LoadedModel, monkeypatch: pytest.MonkeyPatch, up_to: int
) -> None:
    # As on a GPU (dynamo traces the compiled parts; CUDA graphs aside): with GEMV_UP_TO 1 the decode step of a
    # single image has no linear layer left in its graph (the products are reductions), the captions stay generate's,
    # and the layers get nn.Linear's forward back (1 is the default); with 0 no layer is touched.
    # The one-row step of reductions is compiled with coordinate descent tuning.

    lm = tiny.model.language_model
    linear_layers = [m for m in lm.modules() if type(m) is torch.nn.Linear]
    graphs: list[torch.fx.GraphModule] = []
    settings: list[bool] = []  # whether the compiler tuned by coordinate descent while each graph was compiled

    def recording(graph: torch.fx.GraphModule, example_inputs: Any) -> Any:
        import torch._inductor.config as inductor

        graphs.append(graph)
        settings.append(inductor.coordinate_descent_tuning)
        return graph.forward

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda f, **o: real_compile(f, backend=recording, fullgraph=o["fullgraph"]))
    monkeypatch.setattr(decoder, "compiles", lambda blip, device: True)
    monkeypatch.setattr(linears, "GEMV_UP_TO", up_to)
    options = GenerateConfig(num_beams=1, min_new_tokens=2, max_new_tokens=6)
    static = GenerateConfig(num_beams=1, min_new_tokens=2, max_new_tokens=6, static_cache=True)
    patched: list[bool] = []
    real_step = decoder.StaticDecoder.step

    def step(self: Any, *args: Any) -> Any:
        patched.append(any("forward" in vars(m) for m in linear_layers))
        return real_step(self, *args)

    monkeypatch.setattr(decoder.StaticDecoder, "step", step)
    torch._dynamo.reset()
    try:
        for image in _images():
            assert generate_captions(tiny.model, tiny.processor, [image], static) == generate_captions(
                tiny.model, tiny.processor, [image], options
            )
    finally:
        torch._dynamo.reset()
        vars(tiny.model).pop("_captune_image_side", None)  # the shared tiny model as it was
        for name in ("_compiled_call", "_last_compile_config"):
            vars(lm).pop(name, None)
    assert patched and all(patched) == bool(up_to) and any(patched) == bool(up_to)
    assert len(graphs) == 3  # the image side, the prefill, the decode step: each traced once for the three images
    assert settings == [False, False, bool(up_to)]  # only the one-row step of reductions is tuned
    calls = [n.target for n in graphs[2].graph.nodes if n.op == "call_function"]
    layers = lm.config.num_hidden_layers
    assert calls.count(torch._C._nn.linear) == (0 if up_to else 4 * layers + 1)  # q/k/v fused, out, fc1, fc2; head
    assert all("forward" not in vars(m) for m in linear_layers)


def test_single_captions_reuse_their_static_caches_emptied(tiny: LoadedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    """Calls without caches (a single caption, a server's request) keep small static caches on the model: the next
    call decodes into the same tensors (no allocation; CUDA graphs replay at their addresses), emptied first, so
    every caption is that of fresh caches; a call of more rows than HELD_CACHE_ROWS keeps none."""
    from captune.model import blip_of

    blip = blip_of(tiny.model)
    vars(blip).pop("_captune_caches", None)
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
        cache = vars(blip)["_captune_caches"]["prefill"][1]
        addresses.append([layer.keys.data_ptr() for layer in cache.layers])
    assert addresses[0] == addresses[1] == addresses[2]
    assert emptied == [id(vars(blip)["_captune_caches"]["prefill"][1])] * 2  # before the 2nd and the 3rd caption
    monkeypatch.setattr(static_entry, "HELD_CACHE_ROWS", 2)
    held = dict(vars(blip)["_captune_caches"])
    generate_captions(tiny.model, tiny.processor, _images(), static)  # 3 rows
    assert vars(blip)["_captune_caches"] == held


def test_emptying_a_static_cache_in_one_launch_is_its_reset(tiny: LoadedModel) -> None:
    from transformers import StaticCache

    from captune.generation.static.decoder import _initialize, _reset

    config = tiny.model.language_model.config
    caches = [StaticCache(config=config, max_cache_len=7) for _ in range(2)]
    for cache in caches:
        _initialize(cache, config, 2, torch.float32, torch.device("cpu"))
        for layer in cache.layers:
            layer.keys.normal_()
            layer.values.normal_()
            layer.cumulative_length.fill_(5)
    never_written = StaticCache(config=config, max_cache_len=7)
    _reset(never_written)  # (nothing to zero: a cache whose call failed before its prefill)
    assert not any(layer.is_initialized for layer in never_written.layers)
    caches[0].reset()
    _reset(caches[1])
    for reset, ours in zip(caches[0].layers, caches[1].layers, strict=True):
        assert ours.keys.abs().sum() == 0 and ours.values.abs().sum() == 0 and int(ours.cumulative_length) == 0
        assert torch.equal(reset.keys, ours.keys) and int(reset.cumulative_length) == 0
