"""`captune eval --task vqa` on VQA runs of the twins of blip2-opt-2.7b and blip2-flan-t5-xl, on a manifest of eight
questions about two images whose annotators agree with plain transformers' answer or not: the results are
transformers' answers, and metrics.json's accuracies are the means of per_question.jsonl's."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from captune.cli import main

from .. import vqa_twins
from ..vqa_twins import IMAGES, QUESTIONS, TwinRun, assert_no_end_text

twin_run = vqa_twins.twin_run

TYPES = ["yes/no", "number", "other"]


def _manifest(run: TwinRun, folder: Path) -> tuple[Path, list[tuple[str, str]], list[float]]:
    """The manifest (a test split), its (image, question) pairs in order, and each question's accuracy by design:
    every third question's ten annotators give transformers' answer (100), the others another one (0)."""
    pairs = [(image, question) for image in IMAGES for question in QUESTIONS]
    rows, accuracy = [], []
    for i, (image, question) in enumerate(pairs):
        shutil.copyfile(run.folder / image, folder / image)
        agree = i % 3 == 0
        answers = [run.expected[image, question] if agree else "a teapot"] * 10
        rows.append({"question_id": 100 + i, "image": image, "question": question, "answers": answers,
                     "answer_type": TYPES[i % 3], "split": "test"})  # fmt: skip
        accuracy.append(100.0 if agree else 0.0)
    path = folder / "questions.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path, pairs, accuracy


def test_eval_vqa_answers_the_manifest_as_transformers_and_its_accuracy_is_the_per_question_mean(
    twin_run: TwinRun, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest, pairs, accuracy = _manifest(twin_run, tmp_path)
    output = tmp_path / "eval"
    assert main(["eval", "--task", "vqa", "--model-dir", str(twin_run.model_dir), "--data", "manifest", "--data-dir",
                 str(manifest), "--output-dir", str(output), "--device", "cpu", "--workers", "0"]) == 0  # fmt: skip
    results = json.loads((output / "results.json").read_text())
    assert [r["question_id"] for r in results] == [100 + i for i in range(len(pairs))]
    answers = [r["answer"] for r in results]
    assert answers == [twin_run.expected[pair] for pair in pairs]
    assert_no_end_text(twin_run.name, answers)
    rows = [json.loads(line) for line in (output / "per_question.jsonl").read_text().splitlines()]
    by_id = {r["question_id"]: r for r in rows}
    assert [by_id[100 + i]["accuracy"] for i in range(len(pairs))] == accuracy
    assert [by_id[100 + i]["answer"] for i in range(len(pairs))] == answers
    metrics = json.loads((output / "metrics.json").read_text())
    assert metrics["overall"] == pytest.approx(sum(r["accuracy"] for r in rows) / len(rows)) == 37.5  # 3 of 8
    for kind in TYPES:
        kept = [r["accuracy"] for r in rows if r["answer_type"] == kind]
        assert metrics["perAnswerType"][kind] == pytest.approx(sum(kept) / len(kept))
    assert f"overall  {metrics['overall']:.4f}  (8 questions)" in capsys.readouterr().out
