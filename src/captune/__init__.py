"""captune: fine-tune BLIP-2 for image captioning with LoRA, caption images, score captions.

The public API, shared by the CLI, notebooks and (later) the server::

    from captune import load_config, train, load_model_dir, caption_paths

    config = load_config("configs/blip2-opt-2.7b-flickr8k.yaml", ["data.data_dir=~/data/flickr8k"])
    train(config)
    tuned = load_model_dir("runs/blip2-opt-2.7b-flickr8k/best")
    for result in caption_paths(tuned.model, tuned.processor, paths, config.generate):
        print(result.image, result.caption)
"""

from captune.config import Config, GenerateConfig, load_config
from captune.data import CaptionSet, ReadOptions, Record, check_images, read, read_options
from captune.data.synthetic import SyntheticSpec, generate_synthetic
from captune.errors import CaptuneError
from captune.evaluation import evaluate_records, predict_records
from captune.export import merge_model_dir, model_card
from captune.generation.core import CaptionResult, generate_captions
from captune.generation.files import caption_paths
from captune.metrics import EvalResult, evaluate_files, score_captions
from captune.model import LoadedModel, apply_lora, load_base, load_model_dir, trainable_summary
from captune.report import write_report
from captune.training.recipe import train, trained_model_dir

__all__ = [
    "CaptionResult",
    "CaptionSet",
    "ReadOptions",
    "Record",
    "SyntheticSpec",
    "apply_lora",
    "check_images",
    "generate_synthetic",
    "read",
    "read_options",
    "trainable_summary",
    "trained_model_dir",
    "write_report",
    "CaptuneError",
    "Config",
    "EvalResult",
    "GenerateConfig",
    "LoadedModel",
    "caption_paths",
    "evaluate_files",
    "evaluate_records",
    "generate_captions",
    "load_base",
    "load_config",
    "load_model_dir",
    "merge_model_dir",
    "model_card",
    "predict_records",
    "score_captions",
    "train",
]
