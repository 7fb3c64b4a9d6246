"""The model card: the README.md beside a saved or merged model, in Hugging Face model-card form (base, data,
hyperparameters, metrics, how to load it, limitations)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from captune.config import Config, training_mode
from captune.model import BUILT_IN, LoadedModel
from captune.tiny import TINY_MODELS
from captune.twins import TWINS

CARD_FILE = "README.md"


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
    mode = training_mode(config)
    is_adapter = mode.lora and merged_from is None
    in_full = not mode.lora and merged_from is None  # weights trained in full, beside a named base
    base = config.model.name
    front = ["---", f"library_name: {'peft' if is_adapter else 'transformers'}"]
    if base not in BUILT_IN and not Path(base).expanduser().exists():
        front.append(f"base_model: {base}")  # a hub id; local paths and the tiny model mean nothing on the Hub
    front += ["pipeline_tag: image-to-text", "tags: [captune, blip-2, image-captioning, lora]", "---", ""]
    if merged_from is None:
        what = mode.card
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
        trained_in_full = training_mode(config).in_full
        trained = sum(p.numel() for n, p in loaded.model.named_parameters() if n.startswith(trained_in_full))
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
    if training_mode(config).lora:  # LoRA settings mean nothing when nothing has LoRA
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
            load.append(f'model.load_state_dict(load_file("MODEL_DIR/{training_mode(config).saves}"), strict=False)')
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
