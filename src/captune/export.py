"""Merge a fine-tuned model into standalone BLIP-2 weights for serving.

`merge_model_dir` folds the LoRA adapter of a saved model directory (`RUN/best`, `RUN/final`, a checkpoint) into the
base weights with PEFT's `merge_and_unload` (a mode without LoRA has its trained weights in place already): the result
is a plain `Blip2ForConditionalGeneration` directory that `from_pretrained` loads without PEFT and that runs no adapter
layers per token, with the run's generation settings, its provenance and a model card.
"""

from __future__ import annotations

import json
import re
import shutil
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch

from captune.card import CARD_FILE, model_card
from captune.config import to_dict
from captune.errors import CaptuneError
from captune.files import replace_dir
from captune.model import LoadedModel, resolve_dtype
from captune.model_dir import MERGED_KEY, META_FILE, load_model_dir, save_base, saved_config
from captune.training_modes import TRAINED_FILE

DTYPES = ("auto", "bf16", "fp16", "fp32")


def merge_model_dir(model_dir: Path, output: Path, *, dtype: str = "auto", overwrite: bool = False) -> Path:
    """Writes base + adapter of `model_dir` as one standalone BLIP-2 directory.

    The output holds `model.safetensors`, `config.json`, `generation_config.json` (the run's beam width, caption
    lengths and repetition penalty), the processor, `captune.json` (provenance and the run's config, so `captune
    caption` uses the run's prompt and settings) and a model card. It is written under a temporary name and renamed
    into place.

    Args:
        dtype: Weight dtype of the output: `bf16`, `fp16`, `fp32`, or `auto`, which is captune's `auto` on the CPU
            where the merge runs: fp32, every bit of the merge kept. The merge itself runs in fp32 and the result is
            rounded once.
        overwrite: Replace an existing non-empty output directory.

    Returns:
        The output directory.

    Raises:
        CaptuneError: `model_dir` is missing or holds no adapter, the output exists (without `overwrite`) or is
            `model_dir` itself, or the adapter's weights are not finite.
    """
    model_dir, output = Path(model_dir).expanduser(), Path(output).expanduser()
    _check_paths(model_dir, output, overwrite)
    if dtype not in DTYPES:
        raise CaptuneError(f"dtype {dtype!r}: use {', '.join(DTYPES)}")
    config = saved_config(model_dir)

    # 1. Merge at full precision: W + (alpha / r) B A is computed in fp32 and rounded to the output dtype once.
    loaded = load_model_dir(model_dir, torch.float32, device="cpu", merge=True)
    merged = loaded.model  # (a mode without LoRA: the trained weights were already in place)
    _untie_a_trained_output_layer(merged)
    target = resolve_dtype(dtype, torch.device("cpu"))
    merged.to(target)

    # 2. The run's generation settings (as `captune caption` passes them), for
    # `model.generate(**inputs, generation_config=model.generation_config)`.
    gen = config.generate
    lm_generation = merged.language_model.generation_config  # what the language model's own generate stops at
    merged.generation_config.update(
        eos_token_id=lm_generation.eos_token_id,
        pad_token_id=lm_generation.pad_token_id,
        num_beams=gen.num_beams,
        min_new_tokens=gen.min_new_tokens,
        do_sample=False,
        max_new_tokens=gen.max_new_tokens,
        repetition_penalty=gen.repetition_penalty,
        **({"cache_implementation": "static"} if gen.static_cache else {}),
    )
    # Decoder-only models caption a batch with left padding, so every prompt ends where generation starts.
    if not merged.config.text_config.is_encoder_decoder:
        loaded.processor.tokenizer.padding_side = "left"

    # 3. Everything into a temporary directory, renamed into place when complete.
    result = LoadedModel(merged.eval(), loaded.processor, str(output))
    tmp = output.with_name(f".tmp-{output.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    save_base(tmp, result)
    # save_pretrained writes the dtype of the first parameter into config.json; say the one chosen, which is what
    # from_pretrained(dtype="auto") will load.
    merged.config.dtype = target
    merged.config.save_pretrained(tmp)
    meta = {
        MERGED_KEY: str(model_dir.resolve()),
        "base_model": config.model.name,
        "merged_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "dtype": str(target).removeprefix("torch."),
        "versions": {name: version(name) for name in ("captune", "transformers", "peft", "torch")},
        "config": to_dict(config),
    }
    (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
    metrics, source = run_metrics(model_dir) or (None, None)
    (tmp / CARD_FILE).write_text(
        model_card(
            result, config, metrics, metrics_source=source, merged_from=model_dir, val_images=_val_images(model_dir)
        )
    )
    replace_dir(tmp, output)
    return output


def _untie_a_trained_output_layer(merged: Any) -> None:
    """An output layer trained apart from the input embeddings it was tied to (`lora.modules_to_save` naming
    `language_model.lm_head`) is its own weight after the merge: the config then says so, or loading the directory
    would tie the two again and drop one of them."""
    lm = merged.language_model
    output, embeddings = lm.get_output_embeddings(), lm.get_input_embeddings()
    if output is None or output.weight is embeddings.weight or torch.equal(output.weight, embeddings.weight):
        return
    for config in (merged.config, merged.config.text_config):
        if getattr(config, "tie_word_embeddings", False):
            config.tie_word_embeddings = False


def _check_paths(model_dir: Path, output: Path, overwrite: bool) -> None:
    """Everything that can be refused is refused before the model is loaded."""
    if not model_dir.is_dir():
        raise CaptuneError(f"--model-dir {model_dir}: no such directory; give a saved model such as RUN/best")
    trained = (model_dir / "adapter_config.json").is_file() or (model_dir / TRAINED_FILE).is_file()
    if not trained or not (model_dir / META_FILE).is_file():
        raise CaptuneError(
            f"--model-dir {model_dir}: nothing to merge (adapter_config.json or {TRAINED_FILE}, with {META_FILE}, "
            "are what `captune train` saves in RUN/best, RUN/final and checkpoints); a plain or merged BLIP-2 is "
            "already standalone"
        )
    if output.resolve() == model_dir.resolve():
        raise CaptuneError(f"--output {output} is the model directory itself; choose another directory")
    if output.exists() and not output.is_dir():
        raise CaptuneError(f"--output {output} is a file; give a directory")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise CaptuneError(f"--output {output} exists and is not empty; choose another directory or pass --overwrite")


def run_metrics(model_dir: Path) -> tuple[dict[str, float], str] | None:
    """The val metrics of a saved model and where they were read, or None when the run recorded none.

    `metrics.json` in the directory comes first (`best/metrics.json` holds every metric after training); otherwise
    the run's `results.json` history at the directory's step (`best`: the best step, `step-N`: step N, else the last).
    """
    own = model_dir / "metrics.json"
    if own.is_file():
        return json.loads(own.read_text()), f"{model_dir.name}/metrics.json (val split)"
    run_dir = _run_dir(model_dir)
    if run_dir is None or not (run_dir / "results.json").is_file():
        return None
    results = json.loads((run_dir / "results.json").read_text())
    history = results.get("history") or []
    numbered = re.fullmatch(r"step-(\d+)", model_dir.name)
    step = results.get("best_step") if model_dir.name == "best" else int(numbered[1]) if numbered else None
    entries = [e for e in history if e["step"] == step] if step is not None else history[-1:]
    if not entries:
        return None
    return entries[-1]["metrics"], f"results.json, val split at step {entries[-1]['step']}"


def _run_dir(model_dir: Path) -> Path | None:
    """The training run a model directory belongs to: RUN for RUN/best and RUN/final, RUN for RUN/checkpoints/step-N."""
    for candidate in (model_dir.parent, model_dir.parent.parent):
        if (candidate / "results.json").is_file() or (candidate / "val" / "references.json").is_file():
            return candidate
    return None


def _val_images(model_dir: Path) -> int | None:
    run_dir = _run_dir(model_dir)
    references = run_dir / "val" / "references.json" if run_dir else None
    return len(json.loads(references.read_text())["images"]) if references and references.is_file() else None
