"""The embedded default: train -> evaluate -> caption on the built-in synthetic data with the tiny BLIP-2.

It runs the same code a user's fine-tune runs (`training.recipe.train`, `evaluation.evaluate_records`,
`generation.files.caption_paths`); the extra trainable modules it uses come from `configs/demo.yaml`.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from captune.config import Config
from captune.config_loading import load_config
from captune.data import ReadOptions, read
from captune.data.synthetic import SyntheticSpec, generate_synthetic
from captune.evaluation import evaluate_records, write_evaluation
from captune.generation.files import caption_paths
from captune.model import load_base
from captune.model_dir import load_model_dir
from captune.training.recipe import train, trained_model_dir

log = logging.getLogger(__name__)

DEMO_CONFIG = Path(__file__).parent / "configs" / "demo.yaml"


@dataclass
class DemoResult:
    before: dict[str, float]
    after: dict[str, float]
    samples: list[tuple[str, str]]
    """(image file, caption) of a few held-out images, captioned by the saved model."""


def run_demo(output_dir: Path, spec: SyntheticSpec | None = None, overrides: list[str] | None = None) -> DemoResult:
    """Writes output_dir/data (the synthetic images), run/ (the training run), model/ (the fine-tuned model,
    loadable by `captune caption --model-dir`), eval-before/, eval-after/ and metrics.json = {before, after}."""
    # The tiny model's matrices gain nothing from a second CPU thread, and a second thread spins whenever the cores
    # are busy: one thread ran the whole demo in 1 min 36 s against 2 min 24 s with two, same numbers.
    torch.set_num_threads(1)
    data_dir = output_dir / "data"
    generate_synthetic(data_dir, spec or SyntheticSpec())
    config: Config = load_config(
        DEMO_CONFIG, [f"data.data_dir={data_dir}", f"train.output_dir={output_dir / 'run'}", *(overrides or [])]
    )
    test = read("synthetic", data_dir, ReadOptions()).split("test")

    # 1. Before: the untrained base model on the held-out split.
    base = load_base(config.model.name, seed=config.train.seed)
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
    (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))

    paths = [r.image_path for r in test[:4]]
    samples = [(Path(r.image).name, r.caption or "") for r in caption_paths(tuned.model, tuned.processor, paths,
                                                                             config.generate)]  # fmt: skip
    return DemoResult(metrics["before"], metrics["after"], samples)
