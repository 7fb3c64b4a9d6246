"""Answering in bulk: `caption_paths` with a question per item (each image decoded and its image side computed once,
the static loops' answers those of plain `generate`, bad images in their place), and `captune.evaluation`'s
`answer_questions` / `evaluate_questions` on the synthetic questions."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch

from captune.config import GenerateConfig
from captune.data.images import PixelFiles, load_rgb
from captune.data.synthetic import generate_synthetic
from captune.data.vqa import Question, read_vqa
from captune.evaluation import answer_questions, evaluate_questions, write_vqa_evaluation
from captune.generation.core import generate_captions
from captune.generation.files import caption_paths
from captune.model import LoadedModel
from captune.vqa_accuracy import vqa_accuracy

from ..conftest import SMALL_SPEC
from .conftest import _files, _text_named_jpg

ANSWER = GenerateConfig(num_beams=1, min_new_tokens=1, max_new_tokens=4, batch_size=3)
TEMPLATE = "Question: {} Answer:"
ASKED = ["what colour is it?", "which shape?", "is there a circle in the picture?", "where?", "how big?"]


def _items(tmp_path: Path) -> tuple[list[Path], list[str]]:
    """Five questions about three images: two about the first, one about the second, two about the third."""
    images = _files(tmp_path, 3)
    paths = [images[0], images[0], images[1], images[2], images[2]]
    return paths, [TEMPLATE.format(q) for q in ASKED]


@pytest.fixture
def decoded(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Every image file the bulk path's loader decodes, in order."""
    seen: list[Path] = []
    real = PixelFiles.__getitem__

    def recording(self: PixelFiles, index: int) -> Any:
        seen.append(self.paths[index])
        return real(self, index)

    monkeypatch.setattr(PixelFiles, "__getitem__", recording)
    return seen


def _alone(tiny: LoadedModel, paths: list[Path], prompts: list[str], options: GenerateConfig) -> list[str]:
    pairs = zip(paths, prompts, strict=True)
    return [generate_captions(tiny.model, tiny.processor, [load_rgb(p)], options, p_)[0] for p, p_ in pairs]


@pytest.mark.parametrize("static_cache", [False, True])
def test_each_item_gets_its_own_questions_answer_and_each_image_is_decoded_once(
    tiny: LoadedModel, tmp_path: Path, decoded: list[Path], static_cache: bool
) -> None:
    paths, prompts = _items(tmp_path)
    options = GenerateConfig(**{**vars(ANSWER), "static_cache": static_cache})
    results = list(caption_paths(tiny.model, tiny.processor, paths, options, prompts))
    assert decoded == list(dict.fromkeys(paths))  # three images for five questions
    assert [r.image for r in results] == [str(p) for p in paths]
    plain = GenerateConfig(**{**vars(ANSWER), "static_cache": False})
    assert [r.caption for r in results] == _alone(tiny, paths, prompts, plain)
    assert len({r.caption for r in results}) > 1


def test_the_static_pipeline_computes_each_images_side_once(
    tiny: LoadedModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Batches of 3 questions over the items: [img0, img0, img1] and [img2, img2] filled to 3 rows."""
    rows: list[int] = []
    real = type(tiny.model).get_image_features

    def counting(self: Any, pixel_values: torch.Tensor, **kwargs: Any) -> Any:
        rows.append(len(pixel_values))
        return real(self, pixel_values=pixel_values, **kwargs)

    monkeypatch.setattr(type(tiny.model), "get_image_features", counting)
    paths, prompts = _items(tmp_path)
    static = GenerateConfig(**{**vars(ANSWER), "static_cache": True})
    list(caption_paths(tiny.model, tiny.processor, paths, static, prompts))
    assert rows == [2, 1]


def test_an_unreadable_image_fails_each_of_its_questions_and_the_others_are_answered(
    tiny: LoadedModel, tmp_path: Path
) -> None:
    paths, prompts = _items(tmp_path)
    bad = _text_named_jpg(tmp_path / "bad.jpg")
    paths[2] = paths[3] = bad  # the third and fourth questions are about an unreadable file
    for static_cache in (False, True):
        options = GenerateConfig(**{**vars(ANSWER), "static_cache": static_cache})
        results = list(caption_paths(tiny.model, tiny.processor, paths, options, prompts))
        assert [r.caption is None for r in results] == [False, False, True, True, False]
        assert all(str(bad) in (r.error or "") for r in results[2:4])
        good = [0, 1, 4]
        expected = _alone(tiny, [paths[i] for i in good], [prompts[i] for i in good], ANSWER)
        assert [results[i].caption for i in good] == expected


def test_the_choice_line_counts_questions(tiny: LoadedModel, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    paths, prompts = _items(tmp_path)
    with caplog.at_level(logging.INFO, logger="captune.generation.choice"):
        short = GenerateConfig(min_new_tokens=1, max_new_tokens=2)
        list(caption_paths(tiny.model, tiny.processor, paths, short, prompts))
    assert "answering: transformers generate (on cpu" in caplog.text and "batch 16 (CPU)" in caplog.text
    with pytest.raises(ValueError, match="4 prompts for 5 rows"):
        list(caption_paths(tiny.model, tiny.processor, paths, ANSWER, prompts[:4]))


@pytest.fixture(scope="module")
def synthetic_questions(tmp_path_factory: pytest.TempPathFactory) -> list[Question]:
    data_dir = tmp_path_factory.mktemp("vqa")
    generate_synthetic(data_dir, SMALL_SPEC)
    return read_vqa("synthetic", data_dir).split("test")


def test_answer_questions_answers_each_question_with_the_template(
    tiny: LoadedModel, synthetic_questions: list[Question]
) -> None:
    questions = synthetic_questions[::-1]  # an image's questions apart from each other: answered together anyway
    answers = answer_questions(tiny.model, tiny.processor, questions, ANSWER, TEMPLATE)
    assert list(answers) == [q.question_id for q in questions]
    prompts = [TEMPLATE.format(q.question) for q in questions]
    assert list(answers.values()) == _alone(tiny, [q.image_path for q in questions], prompts, ANSWER)


def test_evaluate_questions_scores_the_answers_and_writes_the_official_files(
    tiny: LoadedModel, synthetic_questions: list[Question], tmp_path: Path
) -> None:
    import json

    evaluation = evaluate_questions(tiny.model, tiny.processor, synthetic_questions, ANSWER, TEMPLATE)
    assert evaluation.accuracy == vqa_accuracy(evaluation.answers, synthetic_questions)
    write_vqa_evaluation(tmp_path, evaluation, synthetic_questions)
    assert json.loads((tmp_path / "metrics.json").read_text()) == evaluation.accuracy.as_json()
    results = json.loads((tmp_path / "results.json").read_text())
    assert results == [{"question_id": k, "answer": v} for k, v in evaluation.answers.items()]
    rows = [json.loads(line) for line in (tmp_path / "per_question.jsonl").read_text().splitlines()]
    assert len(rows) == len(synthetic_questions)
    assert [r["accuracy"] for r in rows] == sorted(evaluation.accuracy.per_question.values())


def test_evaluate_questions_refuses_questions_without_answers(
    tiny: LoadedModel, synthetic_questions: list[Question]
) -> None:
    import dataclasses

    from captune.errors import CaptuneError

    unanswered = [dataclasses.replace(q, answers=()) for q in synthetic_questions[:2]]
    with pytest.raises(CaptuneError, match="2 question\\(s\\) have no annotator answers"):
        evaluate_questions(tiny.model, tiny.processor, unanswered, ANSWER, TEMPLATE)


@pytest.mark.parametrize("beams", [1, 3])
def test_the_opt_twin_answers_in_bulk_through_the_static_loops_as_through_generate(tmp_path: Path, beams: int) -> None:
    """The real checkpoint's tokenizer and ids: static batches of mixed-length questions, images asked twice."""
    from captune.model import load_base

    twin = load_base("twin-blip2-opt-2.7b")
    paths, prompts = _items(tmp_path)
    options = GenerateConfig(num_beams=beams, min_new_tokens=1, max_new_tokens=5, batch_size=3)
    plain = [r.caption for r in caption_paths(twin.model, twin.processor, paths, options, prompts)]
    static = GenerateConfig(**{**vars(options), "static_cache": True})
    assert [r.caption for r in caption_paths(twin.model, twin.processor, paths, static, prompts)] == plain
    assert len(set(plain)) > 1
