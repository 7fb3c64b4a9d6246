"""`captune ask` on VQA runs of the twins of blip2-opt-2.7b and blip2-flan-t5-xl (their tokenizers, end tokens and
padding sides): one image's questions, and a file of questions about two images, each batched with questions of
other lengths, get plain transformers' answer to each question alone, cut where the checkpoint ends a text and
without the end token's text."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from captune.cli import main
from captune.generation import files

from .. import vqa_twins
from ..vqa_twins import IMAGES, QUESTIONS, TwinRun, assert_no_end_text

twin_run = vqa_twins.twin_run


def _ask(run: TwinRun, *args: str) -> int:
    return main(["ask", *args, "--model-dir", str(run.model_dir), "--device", "cpu", "--workers", "0"])


def test_ask_prints_each_answer_about_one_image_as_transformers_gives_it_alone(
    twin_run: TwinRun, capsys: pytest.CaptureFixture[str]
) -> None:
    asked = [arg for question in QUESTIONS for arg in ("--question", question)]
    assert _ask(twin_run, str(twin_run.folder / "red.png"), *asked) == 0
    printed = capsys.readouterr().out.splitlines()  # an answer keeping "\n" would print a line more
    assert printed == [twin_run.expected["red.png", q] for q in QUESTIONS]
    assert_no_end_text(twin_run.name, printed)


@pytest.mark.parametrize("static_cache", [False, True])
def test_ask_answers_a_file_of_questions_about_two_images_as_transformers_answers_each_alone(
    twin_run: TwinRun, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, static_cache: bool
) -> None:
    # Images alternating, every question length in one generate call (16 rows on a CPU); OPT through captune's own
    # loop with --static-cache, T5 through generate's static cache.
    calls: list[int] = []
    real = files.generate_from_pixels

    def recording(model: Any, processor: Any, pixels: torch.Tensor, *rest: Any, **named: Any) -> list[str]:
        calls.append(len(pixels))
        return real(model, processor, pixels, *rest, **named)

    monkeypatch.setattr(files, "generate_from_pixels", recording)
    pairs = [(image, question) for question in QUESTIONS for image in IMAGES]
    questions = tmp_path / "questions.jsonl"
    rows = [{"image": str(twin_run.folder / image), "question": q, "question_id": i} for i, (image, q) in
            enumerate(pairs)]  # fmt: skip
    questions.write_text("".join(json.dumps(row) + "\n" for row in rows))
    output = tmp_path / "answers.jsonl"
    flags = ["--static-cache"] if static_cache else ["--no-static-cache"]
    assert _ask(twin_run, "--questions", str(questions), "--output", str(output), *flags) == 0
    written = [json.loads(line) for line in output.read_text().splitlines()]
    assert len(calls) == 1 and calls[0] >= len(pairs)  # (a static cache fills the batch up)
    assert [r["question_id"] for r in written] == list(range(len(pairs)))
    answers = [r["answer"] for r in written]
    assert answers == [twin_run.expected[pair] for pair in pairs]
    assert_no_end_text(twin_run.name, answers)
