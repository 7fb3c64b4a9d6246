"""Captioning image files in bulk (`caption_paths`) on the plain path: files in order with their errors, worker
processes, whole batches, and how command-line inputs become image paths (`expand_inputs`)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from captune.config import GenerateConfig
from captune.data.images import load_rgb
from captune.generation import files
from captune.generation.core import generate_captions
from captune.generation.files import caption_paths, expand_inputs
from captune.model import LoadedModel

from ..conftest import write_image, write_truncated_jpeg
from .conftest import GREEDY, _files, _text_named_jpg


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


def test_worker_processes_keep_order_and_errors(tiny: LoadedModel, tmp_path: Path) -> None:
    paths = _files(tmp_path, 5)
    paths.insert(2, _text_named_jpg(tmp_path / "bad.jpg"))
    options = GenerateConfig(num_beams=1, min_new_tokens=1, max_new_tokens=6, batch_size=2)
    serial = [(r.image, r.caption, r.error) for r in caption_paths(tiny.model, tiny.processor, paths, options)]
    workers = [(r.image, r.caption, r.error) for r in caption_paths(tiny.model, tiny.processor, paths, options, "", 2)]
    assert workers == serial and serial[2][1] is None and serial[2][2] is not None


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


def test_regrouped_keeps_order_and_sizes() -> None:
    from captune.data.images import rebatched

    chunks = [[(i, None, None) for i in range(start, min(start + 3, 11))] for start in range(0, 11, 3)]
    groups = list(rebatched(chunks, 4, lambda parts: [item for part in parts for item in part]))
    assert [[item[0] for item in group] for group in groups] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10]]


def _truncated(path: Path) -> Path:
    return write_truncated_jpeg(path)


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
