"""Caption a split and score it, or answer a split's questions and score the answers: the shared step of
`captune eval`, validation during training and the demo."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from transformers import Blip2Processor

from captune.config import GenerateConfig
from captune.data import Record
from captune.data.vqa import Question, QuestionId
from captune.errors import CaptuneError
from captune.files import atomic_open, write_json
from captune.generation.files import caption_paths
from captune.metrics import EvalResult, per_image_rows, score_captions, write_metrics, write_per_image
from captune.model import Blip2Like
from captune.vqa_accuracy import VqaAccuracy, vqa_accuracy
from captune.vqa_files import write_vqa_metrics


def references_of(records: list[Record]) -> dict[str, list[str]]:
    """Image id -> reference captions, the shape `score_captions` takes."""
    return {r.image_id: list(r.captions) for r in records}


def predict_records(
    model: Blip2Like,
    processor: Blip2Processor,
    records: list[Record],
    options: GenerateConfig,
    prompt: str = "",
    num_workers: int = 0,
) -> dict[str, str]:
    """Captions every record's image in batches (decoded by `num_workers` processes); keys are the records' image ids.

    Raises:
        CaptuneError: an image cannot be read (callers check the images first).
    """
    predictions: dict[str, str] = {}
    results = caption_paths(model, processor, [r.image_path for r in records], options, prompt, num_workers)
    for record, result in zip(records, results, strict=True):
        if result.caption is None:
            raise CaptuneError(result.error or f"{record.image_path}: not captioned")
        predictions[record.image_id] = result.caption
    return predictions


@dataclass
class ModelEvaluation:
    """Predictions of one model on one split, and their scores."""

    predictions: dict[str, str]
    result: EvalResult


def evaluate_records(
    model: Blip2Like,
    processor: Blip2Processor,
    records: list[Record],
    options: GenerateConfig,
    prompt: str = "",
    num_workers: int = 0,
) -> ModelEvaluation:
    """Captions the records and scores the captions against their references."""
    predictions = predict_records(model, processor, records, options, prompt, num_workers)
    return ModelEvaluation(predictions, score_captions(references_of(records), predictions, per_image=True))


def write_evaluation(output_dir: Path, evaluation: ModelEvaluation, records: list[Record]) -> None:
    """Writes metrics.json, predictions.json (COCO results format), references.json (COCO captions format) and
    per_image.jsonl (BLEU-4 and CIDEr of each image, worst CIDEr first)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    write_metrics(output_dir / "metrics.json", evaluation.result)
    rows = per_image_rows(references_of(records), evaluation.predictions, evaluation.result)
    write_per_image(output_dir / "per_image.jsonl", rows)
    predictions = [{"image_id": k, "caption": v} for k, v in evaluation.predictions.items()]
    write_json(output_dir / "predictions.json", predictions)
    write_references(output_dir / "references.json", records)


def write_references(path: Path, records: list[Record]) -> None:
    """The records' captions in COCO captions format; `file_name` is the image's absolute path."""
    references = {
        "images": [{"id": r.image_id, "file_name": str(r.image_path)} for r in records],
        "annotations": [{"image_id": r.image_id, "caption": c} for r in records for c in r.captions],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, references)


def answer_questions(
    model: Blip2Like,
    processor: Blip2Processor,
    questions: list[Question],
    options: GenerateConfig,
    template: str,
    num_workers: int = 0,
) -> dict[QuestionId, str]:
    """Answers every question about its image (the prompt: `template.format(question)`, e.g. the config's
    `data.question_template`), in batches through `caption_paths`; the questions of one image are answered
    together, so that it is decoded and its image side computed once.

    Returns:
        Question id -> answer, in the order of `questions`.

    Raises:
        CaptuneError: an image cannot be read (callers check the images first).
    """
    first: dict[Path, int] = {}
    for q in questions:
        first.setdefault(q.image_path, len(first))
    ordered = sorted(questions, key=lambda q: first[q.image_path])  # stable: each image's questions in their order
    prompts = [template.format(q.question) for q in ordered]
    results = caption_paths(model, processor, [q.image_path for q in ordered], options, prompts, num_workers)
    answers: dict[QuestionId, str] = {}
    for question, result in zip(ordered, results, strict=True):
        if result.caption is None:
            raise CaptuneError(result.error or f"{question.image_path}: not answered")
        answers[question.question_id] = result.caption
    return {q.question_id: answers[q.question_id] for q in questions}


@dataclass
class VqaEvaluation:
    """Answers of one model to one split's questions, and their VQA accuracy."""

    answers: dict[QuestionId, str]
    accuracy: VqaAccuracy


def evaluate_questions(
    model: Blip2Like,
    processor: Blip2Processor,
    questions: list[Question],
    options: GenerateConfig,
    template: str,
    num_workers: int = 0,
) -> VqaEvaluation:
    """Answers the questions (`answer_questions`) and scores the answers against the annotators' (`vqa_accuracy`).

    Raises:
        CaptuneError: a question without annotator answers (a test split: score its answers on the official
            server instead), or an image that cannot be read.
    """
    unanswered = [q for q in questions if not q.answers]
    if unanswered:
        raise CaptuneError(f"{len(unanswered)} question(s) have no annotator answers (the first: question_id "
                           f"{unanswered[0].question_id!r}, split {unanswered[0].split!r}); VQA accuracy needs them: "
                           "choose an annotated split")  # fmt: skip
    answers = answer_questions(model, processor, questions, options, template, num_workers)
    return VqaEvaluation(answers, vqa_accuracy(answers, questions))


def write_vqa_evaluation(output_dir: Path, evaluation: VqaEvaluation, questions: list[Question]) -> None:
    """Writes metrics.json (the official evaluation's shape: `VqaAccuracy.as_json`), results.json (the official
    results list, `[{"question_id", "answer"}]`) and per_question.jsonl (each question, its answer, the annotators'
    answers and its accuracy in percent, worst first)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    write_vqa_metrics(output_dir / "metrics.json", evaluation.accuracy)
    write_json(output_dir / "results.json", [{"question_id": k, "answer": v} for k, v in evaluation.answers.items()])
    score = evaluation.accuracy.per_question
    rows = sorted(questions, key=lambda q: score[q.question_id])  # stable: ties in question order
    with atomic_open(output_dir / "per_question.jsonl", encoding="utf-8") as out:
        for q in rows:
            row = {"question_id": q.question_id, "image": str(q.image_path), "question": q.question,
                   "answer": evaluation.answers[q.question_id], "answers": list(q.answers),
                   "accuracy": score[q.question_id], "answer_type": q.answer_type}  # fmt: skip
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
