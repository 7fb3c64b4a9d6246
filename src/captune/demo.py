"""The embedded default: train -> evaluate -> caption on the built-in synthetic data with the tiny BLIP-2; with
`task="vqa"`, train -> evaluate -> answer on its questions; with `task="retrieval"`, train the tiny retrieval model
and rank held-out images and captions (Recall@K).

It runs the same code a user's fine-tune runs (`training.recipe.train`, `evaluation.evaluate_records` or
`evaluation.evaluate_questions`, `generation.files.caption_paths`); the extra trainable modules it uses come from
`configs/demo.yaml` (VQA: `configs/demo-vqa.yaml`).
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from captune.config import Config
from captune.config_loading import load_config
from captune.data import ReadOptions, Record, read
from captune.data.synthetic import SyntheticSpec, attribute_accuracy, generate_synthetic
from captune.data.vqa import read_vqa
from captune.evaluation import (
    VqaEvaluation,
    evaluate_questions,
    evaluate_records,
    write_evaluation,
    write_vqa_evaluation,
)
from captune.files import write_json
from captune.generation.files import caption_paths
from captune.model import LoadedModel, load_configured_base
from captune.model_dir import load_model_dir
from captune.retrieval import RetrievalModel, evaluate_retrieval, load_retrieval
from captune.training.recipe import train, trained_model_dir, vqa_metrics

log = logging.getLogger(__name__)

DEMO_CONFIG = Path(__file__).parent / "configs" / "demo.yaml"
DEMO_VQA_CONFIG = Path(__file__).parent / "configs" / "demo-vqa.yaml"
DEMO_RETRIEVAL_CONFIG = Path(__file__).parent / "configs" / "demo-retrieval.yaml"
DEMO_CONFIGS = {"caption": DEMO_CONFIG, "vqa": DEMO_VQA_CONFIG, "retrieval": DEMO_RETRIEVAL_CONFIG}
RETRIEVAL_TEST_IMAGES = 48
"""The retrieval demo's held-out images, each of its own colour, shape, size and position
(`SyntheticSpec.distinct_test`): with repeats, a caption would fit several images and R@1 could not tell a model
that sees from one that guesses."""


@dataclass
class DemoResult:
    before: dict[str, float]
    after: dict[str, float]
    samples: list[tuple[str, str]]
    """(image file, caption) of a few held-out images, captioned by the saved model; VQA: (image file: question,
    answer) of a few held-out questions."""


def run_demo(
    output_dir: Path, spec: SyntheticSpec | None = None, overrides: list[str] | None = None, task: str = "caption"
) -> DemoResult:
    """Writes output_dir/data (the synthetic images), run/ (the training run), model/ (the fine-tuned model,
    loadable by `captune caption --model-dir`), eval-before/, eval-after/ and metrics.json = {before, after}: the
    COCO metrics and the share of held-out captions naming each attribute right (`colour_right`, `shape_right`,
    `size_right`, `position_right`, `size_named`: `captune.data.synthetic.attribute_accuracy`) (`task="vqa"`: VQA
    accuracy in percent on the test split's questions)."""
    # The tiny model's matrices gain nothing from a second CPU thread, and a second thread spins whenever the cores
    # are busy: one thread ran the whole demo in 1 min 36 s against 2 min 24 s with two, same numbers.
    torch.set_num_threads(1)
    data_dir = output_dir / "data"
    spec = spec or SyntheticSpec()
    if task == "retrieval" and not spec.distinct_test:
        spec = dataclasses.replace(spec, test=min(spec.test, RETRIEVAL_TEST_IMAGES), distinct_test=True)
    generate_synthetic(data_dir, spec)
    config: Config = load_config(
        DEMO_CONFIGS[task], [f"data.data_dir={data_dir}", f"train.output_dir={output_dir / 'run'}", *(overrides or [])]
    )
    if config.data.task == "vqa":
        return _run_vqa_demo(output_dir, config)
    if config.data.task == "retrieval":
        return _run_retrieval_demo(output_dir, config)
    test = read("synthetic", data_dir, ReadOptions()).split("test")

    # 1. Before: the untrained base model on the held-out split.
    base = load_configured_base(config)
    before = evaluate_records(base.model, base.processor, test, config.generate, config.data.prompt)
    write_evaluation(output_dir / "eval-before", before, test)
    log.info("before fine-tuning: CIDEr %.3f", before.result.metrics["CIDEr"])

    # 2. Fine-tune with the user-facing recipe, then keep its best checkpoint as the demo's model.
    train(config)
    model_dir = output_dir / "model"
    shutil.rmtree(model_dir, ignore_errors=True)
    shutil.copytree(trained_model_dir(output_dir / "run"), model_dir)

    # 3. After: reload the saved model from disk, as `captune caption` would, and score the same split.
    tuned = load_model_dir(model_dir)
    after = evaluate_records(tuned.model, tuned.processor, test, config.generate, config.data.prompt)
    write_evaluation(output_dir / "eval-after", after, test)
    metrics = {"before": before.result.metrics, "after": after.result.metrics}
    for name, evaluation in (("before", before), ("after", after)):  # what the captions say, against the drawings
        named = {record.image_id: evaluation.predictions[record.image_id] for record in test}
        metrics[name] |= attribute_accuracy(data_dir, named)
    write_json(output_dir / "metrics.json", metrics)

    paths = [r.image_path for r in test[:4]]
    samples = [(Path(r.image).name, r.caption or "") for r in caption_paths(tuned.model, tuned.processor, paths,
                                                                             config.generate)]  # fmt: skip
    return DemoResult(metrics["before"], metrics["after"], samples)


def _run_vqa_demo(output_dir: Path, config: Config) -> DemoResult:
    """`run_demo`'s steps for VQA: the test split's questions answered before and after fine-tuning."""
    test = read_vqa("synthetic", config.data.data_dir).split("test")
    template = config.data.question_template

    def evaluated(loaded: LoadedModel, name: str) -> VqaEvaluation:
        evaluation = evaluate_questions(loaded.model, loaded.processor, test, config.generate, template)
        write_vqa_evaluation(output_dir / name, evaluation, test)
        return evaluation

    # 1. Before: the untrained base model on the held-out questions.
    before = vqa_metrics(evaluated(load_configured_base(config), "eval-before").accuracy)
    log.info("before fine-tuning: VQA accuracy %.1f%%", before["vqa_accuracy"])

    # 2. Fine-tune with the user-facing recipe; keep its best checkpoint (by val VQA accuracy) as the demo's model.
    train(config)
    model_dir = output_dir / "model"
    shutil.rmtree(model_dir, ignore_errors=True)
    shutil.copytree(trained_model_dir(output_dir / "run"), model_dir)

    # 3. After: reload the saved model from disk and answer the same questions.
    answered = evaluated(load_model_dir(model_dir), "eval-after")
    after = vqa_metrics(answered.accuracy)
    write_json(output_dir / "metrics.json", {"before": before, "after": after})
    samples = [(f"{q.image_id}: {q.question}", answered.answers[q.question_id]) for q in test[:5]]
    return DemoResult(before, after, samples)


def _run_retrieval_demo(output_dir: Path, config: Config) -> DemoResult:
    """`run_demo`'s steps for retrieval: Recall@K of the test images and their captions before and after
    fine-tuning (after the matching head re-ranked the top `train.val_k_test`; `itc_*`: the contrastive scores)."""
    test = read("synthetic", config.data.data_dir, ReadOptions()).split("test")
    k_test = config.train.val_k_test

    def evaluated(model: RetrievalModel, name: str) -> dict[str, float]:
        metrics = evaluate_retrieval(model, test, k_test=k_test or None).metrics()
        write_json(output_dir / name / "metrics.json", metrics)
        return metrics

    # 1. Before: the untrained base model on the held-out images and captions.
    before = evaluated(load_retrieval(config.model.name), "eval-before")
    log.info("before fine-tuning: text->image R@1 %.1f%%", before["img_r1"])

    # 2. Fine-tune with the user-facing recipe; keep its best checkpoint (by val r_mean) as the demo's model.
    train(config)
    model_dir = output_dir / "model"
    shutil.rmtree(model_dir, ignore_errors=True)
    shutil.copytree(trained_model_dir(output_dir / "run"), model_dir)

    # 3. After: reload the saved model from disk and rank the same images and captions.
    tuned = load_retrieval(str(model_dir))
    after = evaluated(tuned, "eval-after")
    write_json(output_dir / "metrics.json", {"before": before, "after": after})
    return DemoResult(before, after, _best_images(tuned, test))


def _best_images(loaded: RetrievalModel, records: list[Record], queries: int = 4) -> list[tuple[str, str]]:
    """(caption, the image it ranks first, marked right or wrong) for the first caption of a few test images."""
    evaluation = evaluate_retrieval(loaded, records, k_test=None)
    samples = []
    for i, record in enumerate(records[:queries]):
        column = evaluation.text_image.index(i)  # the image's first caption
        best = int(evaluation.scores[:, column].argmax())
        mark = "right" if best == i else f"wrong, it shows: {records[best].captions[0]}"
        samples.append((record.captions[0], f"{records[best].image_path.name} ({mark})"))
    return samples
