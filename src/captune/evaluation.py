"""Caption a split and score it: the shared step of `captune eval`, validation during training and the demo."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from transformers import Blip2Processor

from captune.config import GenerateConfig
from captune.data import Record
from captune.errors import CaptuneError
from captune.generation.files import caption_paths
from captune.metrics import EvalResult, per_image_rows, score_captions, write_metrics, write_per_image
from captune.model import Blip2Like


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
    (output_dir / "predictions.json").write_text(json.dumps(predictions, indent=2))
    write_references(output_dir / "references.json", records)


def write_references(path: Path, records: list[Record]) -> None:
    """The records' captions in COCO captions format; `file_name` is the image's absolute path."""
    references = {
        "images": [{"id": r.image_id, "file_name": str(r.image_path)} for r in records],
        "annotations": [{"image_id": r.image_id, "caption": c} for r in records for c in r.captions],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(references, indent=2))
