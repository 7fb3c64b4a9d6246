"""Merge a fine-tuned model into standalone BLIP-2 weights for serving, and the model card of saved models.

`merge_model_dir` folds the LoRA adapter of a saved model directory (`RUN/best`, `RUN/final`, a checkpoint) into the
base weights with PEFT's `merge_and_unload`: the result is a plain `Blip2ForConditionalGeneration` directory that
`from_pretrained` loads without PEFT and that runs no adapter layers per token. `model_card` writes the README.md
beside a saved or merged model: base, data, hyperparameters, metrics, how to load it, limitations.
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
from peft import PeftModel

from captune.config import Config, to_dict
from captune.errors import CaptuneError
from captune.files import replace_dir
from captune.model import (
    BUILT_IN,
    MERGED_KEY,
    META_FILE,
    QFORMER_TRAINED,
    TINY_MODELS,
    TRAINED_FILE,
    LoadedModel,
    load_model_dir,
    resolve_dtype,
    save_base,
    saved_config,
)
from captune.twins import TWINS

CARD_FILE = "README.md"
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
    merged = loaded.model  # (train.mode=qformer: the trained weights were already in place)
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


def model_card(
    loaded: LoadedModel,
    config: Config,
    metrics: dict[str, float] | None = None,
    *,
    metrics_source: str | None = None,
    merged_from: Path | None = None,
    val_images: int | None = None,
) -> str:
    """The README.md of a saved model directory (adapter) or a merged one, in Hugging Face model-card form.

    Args:
        loaded: The model as saved: a `PeftModel` (adapter directory) or the merged `Blip2ForConditionalGeneration`.
        config: The run's config (base model, data, LoRA, training and generation settings).
        metrics: Val metrics of this model, if known.
        metrics_source: Where the metrics were read, said under the table (default: the val split in training).
        merged_from: The adapter directory a merged model was made from; None for an adapter directory.
        val_images: Number of val images the metrics were computed on, if known.
    """
    is_adapter = isinstance(loaded.model, PeftModel)
    in_full = not is_adapter and merged_from is None  # train.mode=qformer: trained weights beside a named base
    base = config.model.name
    front = ["---", f"library_name: {'peft' if is_adapter else 'transformers'}"]
    if base not in BUILT_IN and not Path(base).expanduser().exists():
        front.append(f"base_model: {base}")  # a hub id; local paths and the tiny model mean nothing on the Hub
    front += ["pipeline_tag: image-to-text", "tags: [captune, blip-2, image-captioning, lora]", "---", ""]
    if is_adapter:
        what = (
            "This directory holds a LoRA adapter (PEFT) for the base model below, its processor and "
            "`captune.json` (base model and the run's config). Load it with the base model, or make a standalone "
            "model with `captune merge --model-dir MODEL_DIR --output MERGED_DIR`."
        )
    elif in_full:
        what = (
            "This directory holds the Q-Former, its query tokens and the language projection, trained in full (the "
            "LAVIS caption fine-tune, `train.mode=qformer`), as `trained.safetensors`, with the processor and "
            "`captune.json` (base model and the run's config). They replace the base model's own weights of those "
            "names; `captune merge --model-dir MODEL_DIR --output MERGED_DIR` writes a standalone model."
        )
    else:
        what = (
            f"This directory holds a standalone `Blip2ForConditionalGeneration`: `{merged_from}` merged into the base "
            "weights (a LoRA adapter through PEFT's `merge_and_unload`, no adapter layers at inference; or the "
            f"weights it trained in full), weights in {str(loaded.model.dtype).removeprefix('torch.')}. "
            "`generation_config.json` holds the run's generation settings; `captune.json` the provenance. In fp32 it "
            "captions exactly as the directory it was made from; in bf16 or fp16 the merged weights are rounded "
            "once, so a caption can now and then differ."
        )
    lines = [*front, "# BLIP-2 image captioner fine-tuned with captune", "", what, ""]
    lines += _base_section(loaded, config, is_adapter, in_full)
    lines += _data_section(config, val_images)
    lines += _hyperparameter_section(config)
    lines += _metrics_section(metrics, metrics_source)
    lines += _usage_section(config, is_adapter, in_full)
    lines += _limitations_section(config)
    return "\n".join(lines)


def _table(rows: list[tuple[str, Any]]) -> list[str]:
    return ["| setting | value |", "|---|---|", *(f"| {key} | `{value}` |" for key, value in rows), ""]


def _base_section(loaded: LoadedModel, config: Config, is_adapter: bool, in_full: bool) -> list[str]:
    params = sum(p.numel() for p in loaded.model.parameters())
    adapter = sum(p.numel() for n, p in loaded.model.named_parameters() if "lora_" in n or "modules_to_save" in n)
    name = config.model.name
    if name in BUILT_IN:
        where = "merged into the weights in this directory"
        if is_adapter or in_full:
            where = f"stored in `base/` beside the {'adapter' if is_adapter else 'trained weights'}"
        what = "BLIP-2" if name in TINY_MODELS else f"twin of `{TWINS[name]}` (its tokenizer, ids and config)"
        base = f"`{name}`: captune's built-in {what} at hidden sizes 32-64 with **random weights**, {where}."
    else:
        base = f"`{config.model.name}` (loaded with `from_pretrained`)."
    size = f"{params:,} parameters"
    if is_adapter:
        size = f"{params - adapter:,} base parameters; the adapter adds {adapter:,}"
    elif in_full:
        trained = sum(p.numel() for n, p in loaded.model.named_parameters() if n.startswith(QFORMER_TRAINED))
        size = f"{params:,} parameters, of which {trained:,} trained in full"
    return ["## Base model", "", f"{base} {size}. Weight dtype in training: `{config.model.dtype}`.", ""]


def _data_section(config: Config, val_images: int | None) -> list[str]:
    data = config.data
    rows: list[tuple[str, Any]] = [("format", data.format), ("data_dir", data.data_dir)]
    rows += [(name, getattr(data, name)) for name in ("images_dir", "annotations") if getattr(data, name)]
    rows += [
        ("split_seed", data.split_seed),
        ("prompt", json.dumps(data.prompt)),
        ("max_caption_tokens", data.max_caption_tokens),
    ]
    if val_images is not None:
        rows.append(("val images (scored in training)", val_images))
    return ["## Data", "", "Fine-tuned on image-caption pairs of the train split of:", "", *_table(rows)]


def _hyperparameter_section(config: Config) -> list[str]:
    lora, train = config.lora, config.train
    rows: list[tuple[str, Any]] = [("train.mode", train.mode)]
    if train.mode != "qformer":  # LoRA settings mean nothing when nothing has LoRA
        rows += [
            ("lora.r", lora.r),
            ("lora.alpha", lora.alpha),
            ("lora.dropout", lora.dropout),
            ("lora.target_modules (language model)", ", ".join(lora.target_modules) or "none"),
            ("lora.qformer_target_modules", ", ".join(lora.qformer_target_modules) or "none"),
            ("lora.modules_to_save", ", ".join(lora.modules_to_save) or "none"),
        ]
    rows += [
        ("train.batch_size x grad_accum (per device)", f"{train.batch_size} x {train.grad_accum}"),
        ("train.lr / weight_decay / warmup_steps", f"{train.lr} / {train.weight_decay} / {train.warmup_steps}"),
        ("train.epochs / max_steps", f"{train.epochs} / {train.max_steps}"),
        ("train.max_grad_norm", train.max_grad_norm),
        ("train.seed", train.seed),
    ]
    gen = config.generate
    generation = (
        f"num_beams {gen.num_beams}, {gen.min_new_tokens}-{gen.max_new_tokens} new tokens, "
        f"repetition_penalty {gen.repetition_penalty}"
    )
    return [
        "## Training",
        "",
        "AdamW with linear warm-up and cosine decay; the vision encoder is frozen.",
        "",
        *_table(rows),
        f"Generation (validation and `captune caption` defaults): {generation}.",
        "",
    ]


def _metrics_section(metrics: dict[str, float] | None, source: str | None) -> list[str]:
    if not metrics:
        absent = (
            "No validation metrics were recorded with this model when this card was written (see `metrics.json` "
            "beside it, if any); score a split with `captune eval --model-dir MODEL_DIR`."
        )
        return ["## Metrics", "", absent, ""]
    rows = ["| metric | value |", "|---|---|", *(f"| {name} | {value:.4f} |" for name, value in metrics.items())]
    note = (
        f"From {source or 'the val split, scored during training'}. best/ is chosen by val CIDEr, so val scores are "
        "optimistic; `captune eval --split test` scores held-out images."
    )
    return ["## Metrics", "", *rows, "", note, ""]


def _usage_section(config: Config, is_adapter: bool, in_full: bool) -> list[str]:
    prompt = config.data.prompt
    captune = ["```bash", "captune caption photo.jpg --model-dir MODEL_DIR", "```", ""]
    if is_adapter or in_full:
        base = "MODEL_DIR/base" if config.model.name in BUILT_IN else config.model.name
        load = [f'model = Blip2ForConditionalGeneration.from_pretrained("{base}").eval()']
        if is_adapter:
            imports = ["from peft import PeftModel"]
            load[0] = load[0].replace("model = ", "base = ").replace(".eval()", "")
            load.append('model = PeftModel.from_pretrained(base, "MODEL_DIR").eval()')
        else:
            imports = ["from safetensors.torch import load_file"]
            load.append(f'model.load_state_dict(load_file("MODEL_DIR/{TRAINED_FILE}"), strict=False)')
        gen = config.generate
        call = (
            f"out = model.generate(**inputs, num_beams={gen.num_beams}, min_new_tokens={gen.min_new_tokens}, "
            f"max_new_tokens={gen.max_new_tokens}, repetition_penalty={gen.repetition_penalty})"
        )
    else:
        load = ['model = Blip2ForConditionalGeneration.from_pretrained("MODEL_DIR", dtype="auto").eval()']
        # BLIP-2's generate hands over to its language model, which does not read generation_config.json itself.
        call = "out = model.generate(**inputs, generation_config=model.generation_config)"
        imports = []
    python = [
        "```python",
        "from PIL import Image",
        *imports,
        "from transformers import Blip2ForConditionalGeneration, Blip2Processor",
        "",
        'processor = Blip2Processor.from_pretrained("MODEL_DIR")',
        *load,
        'image = Image.open("photo.jpg").convert("RGB")',
        f'inputs = processor(images=[image], text=[{json.dumps(prompt)}], return_tensors="pt")',
        call,
        'print(processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True))',
        "```",
        "",
    ]
    return [
        "## How to load",
        "",
        "`MODEL_DIR` is this directory. With captune (the run's prompt and generation settings are the defaults):",
        "",
        *captune,
        "With transformers alone:",
        "",
        *python,
    ]


def _limitations_section(config: Config) -> list[str]:
    items = []
    if config.model.name in BUILT_IN:
        items.append(
            f"The base is captune's built-in `{config.model.name}` with **random weights**: it demonstrates the "
            "training path, not caption quality. It is not a usable captioner."
        )
    items += [
        f"It captions like its training data (`{config.data.format}`); on other kinds of images expect the base "
        "model's behaviour or worse, and the biases of both the base model's pre-training data and these captions.",
        "Captions are in the language of the training captions, at most `generate.max_new_tokens` tokens long.",
    ]
    return ["## Limitations", "", *(f"- {item}" for item in items), ""]
