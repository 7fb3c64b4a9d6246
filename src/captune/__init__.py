"""captune: fine-tune BLIP-2 for image captioning with LoRA, caption images, score captions.

The public API, shared by the CLI, notebooks and (later) the server::

    from captune import load_config, train, load_model_dir, caption_paths

    config = load_config("configs/blip2-opt-2.7b-flickr8k.yaml", ["data.data_dir=~/data/flickr8k"])
    train(config)
    tuned = load_model_dir("runs/blip2-opt-2.7b-flickr8k/best")
    for result in caption_paths(tuned.model, tuned.processor, paths, config.generate):
        print(result.image, result.caption)

The names load on first use (PEP 562), so `import captune.metrics` or a process that only scores captions does not
import torch and transformers.
"""

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from captune.card import model_card
    from captune.config import Config, GenerateConfig, read_options
    from captune.config_loading import load_config
    from captune.data import CaptionSet, ReadOptions, Record, check_images, read
    from captune.data.synthetic import SyntheticSpec, generate_synthetic
    from captune.errors import CaptuneError
    from captune.evaluation import evaluate_records, predict_records
    from captune.export import merge_model_dir
    from captune.generation.core import CaptionResult, generate_captions
    from captune.generation.files import caption_paths
    from captune.metrics import EvalResult, evaluate_files, score_captions
    from captune.model import LoadedModel, apply_lora, load_base, trainable_summary
    from captune.model_dir import load_model_dir
    from captune.report import write_report
    from captune.retrieval import RetrievalModel, evaluate_retrieval, load_retrieval
    from captune.search import SearchIndex, index_captions, index_images
    from captune.training.recipe import train, trained_model_dir

# Public name -> the module that defines it.
_EXPORTS = {
    "CaptionResult": "captune.generation.core",
    "CaptionSet": "captune.data",
    "CaptuneError": "captune.errors",
    "Config": "captune.config",
    "EvalResult": "captune.metrics",
    "GenerateConfig": "captune.config",
    "LoadedModel": "captune.model",
    "ReadOptions": "captune.data",
    "Record": "captune.data",
    "SyntheticSpec": "captune.data.synthetic",
    "apply_lora": "captune.model",
    "caption_paths": "captune.generation.files",
    "check_images": "captune.data",
    "evaluate_files": "captune.metrics",
    "evaluate_records": "captune.evaluation",
    "generate_captions": "captune.generation.core",
    "generate_synthetic": "captune.data.synthetic",
    "load_base": "captune.model",
    "load_config": "captune.config_loading",
    "load_model_dir": "captune.model_dir",
    "merge_model_dir": "captune.export",
    "model_card": "captune.card",
    "predict_records": "captune.evaluation",
    "read": "captune.data",
    "read_options": "captune.config",
    "score_captions": "captune.metrics",
    "train": "captune.training.recipe",
    "trainable_summary": "captune.model",
    "trained_model_dir": "captune.training.recipe",
    "write_report": "captune.report",
    "RetrievalModel": "captune.retrieval",
    "evaluate_retrieval": "captune.retrieval",
    "load_retrieval": "captune.retrieval",
    "SearchIndex": "captune.search",
    "index_captions": "captune.search",
    "index_images": "captune.search",
}

__all__ = [
    "Config",
    "GenerateConfig",
    "load_config",
    "CaptionSet",
    "ReadOptions",
    "Record",
    "check_images",
    "read",
    "read_options",
    "SyntheticSpec",
    "generate_synthetic",
    "CaptuneError",
    "evaluate_records",
    "predict_records",
    "merge_model_dir",
    "model_card",
    "CaptionResult",
    "generate_captions",
    "caption_paths",
    "EvalResult",
    "evaluate_files",
    "score_captions",
    "LoadedModel",
    "apply_lora",
    "load_base",
    "load_model_dir",
    "trainable_summary",
    "write_report",
    "train",
    "trained_model_dir",
    "RetrievalModel",
    "evaluate_retrieval",
    "load_retrieval",
    "SearchIndex",
    "index_captions",
    "index_images",
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'captune' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
