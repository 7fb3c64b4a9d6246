"""The model card: the README.md beside a saved or merged model, in Hugging Face model-card form (base, data,
hyperparameters, metrics, how to load it, limitations), of a captioner or, after a `data.task: vqa` run, of a model
that answers questions about images."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from captune.config import Config, training_mode
from captune.model import BUILT_IN, LoadedModel
from captune.peft_methods import METHODS, is_mutating_init
from captune.twins import RETRIEVAL_TWINS, TWINS

CARD_FILE = "README.md"
QUESTION = "what is in the picture?"
"""The example question of a VQA model's usage lines."""


@dataclass(frozen=True)
class TaskWords:
    """What a card says that depends on the run's `data.task`."""

    title: str
    pipeline_tag: str
    """Hugging Face's names: the pipeline and the task's tag."""
    tag: str
    verb: str
    """What the model does to an image: `captions`, `answers`."""
    output: str
    """What it writes: `caption`, `answer`."""
    article: str
    """The output's indefinite article."""
    model: str
    """What it is: `captioner`, `VQA model`."""
    trained_on: str
    cli: str
    """The captune command that uses it."""
    arguments: str
    """That command's arguments in the usage section, before `--model-dir`."""
    best_by: str
    """The val metric best/ is chosen by."""
    held_out: str
    """What `captune eval --split test` does."""
    prompt: str
    """What the run's text before the output is called."""


TASK_WORDS = {
    "caption": TaskWords(
        title="BLIP-2 image captioner fine-tuned with captune",
        pipeline_tag="image-to-text",
        tag="image-captioning",
        verb="captions",
        output="caption",
        article="a",
        model="captioner",
        trained_on="image-caption pairs",
        cli="captune caption",
        arguments="photo.jpg",
        best_by="CIDEr",
        held_out="scores held-out images",
        prompt="prompt",
    ),
    "vqa": TaskWords(
        title="BLIP-2 visual question answering fine-tuned with captune",
        pipeline_tag="visual-question-answering",
        tag="visual-question-answering",
        verb="answers",
        output="answer",
        article="an",
        model="VQA model",
        trained_on="questions about images and their annotators' answers",
        cli="captune ask",
        arguments=f"photo.jpg --question {json.dumps(QUESTION)}",
        best_by=(
            "VQA accuracy (the official VQA evaluation's, in percent: `vqa_accuracy` overall, "
            "`vqa_accuracy_<answer type>` per answer type)"
        ),
        held_out="answers held-out questions",
        prompt="question template",
    ),
    "retrieval": TaskWords(
        title="BLIP-2 image-text retrieval model fine-tuned with captune",
        pipeline_tag="zero-shot-image-classification",
        tag="image-text-retrieval",
        verb="embeds",
        output="ranking",
        article="a",
        model="retrieval model",
        trained_on="image-caption pairs (contrastive and matching losses)",
        cli="captune eval --task retrieval",
        arguments="--data synthetic --split test",
        best_by="r_mean (the mean of R@1, R@5 and R@10, image->text and text->image, in percent)",
        held_out="scores held-out images and captions",
        prompt="settings",
    ),
}
"""By `data.task`."""


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
    words = TASK_WORDS[config.data.task]
    is_adapter = mode.lora and merged_from is None
    in_full = not mode.lora and merged_from is None  # weights trained in full, beside a named base
    base = config.model.name
    front = ["---", f"library_name: {'peft' if is_adapter else 'transformers'}"]
    if base not in BUILT_IN and not Path(base).expanduser().exists():
        front.append(f"base_model: {base}")  # a hub id; local paths and the tiny model mean nothing on the Hub
    method = config.lora.method if mode.lora else "lora"
    front += [f"pipeline_tag: {words.pipeline_tag}", f"tags: [captune, blip-2, {words.tag}, {method}]", "---", ""]
    if merged_from is None:
        what = mode.card + (f" {_adapter_words(config)}" if mode.lora else "")
    else:
        what = (
            f"This directory holds a standalone `Blip2ForConditionalGeneration`: `{merged_from}` merged into the base "
            "weights (a LoRA adapter through PEFT's `merge_and_unload`, no adapter layers at inference; or the "
            f"weights it trained in full), weights in {str(loaded.model.dtype).removeprefix('torch.')}. "
            "`generation_config.json` holds the run's generation settings; `captune.json` the provenance. In fp32 it "
            f"{words.verb} exactly as the directory it was made from; in bf16 or fp16 the merged weights are rounded "
            f"once, so {words.article} {words.output} can now and then differ."
        )
    lines = [*front, f"# {words.title}", "", what, ""]
    lines += _base_section(loaded, config, is_adapter, in_full)
    lines += _data_section(config, words, val_images)
    lines += _hyperparameter_section(config, words)
    lines += _metrics_section(metrics, metrics_source, words)
    lines += _usage_section(config, words, is_adapter, in_full)
    lines += _limitations_section(config, words)
    return "\n".join(lines)


def _table(rows: list[tuple[str, Any]]) -> list[str]:
    return ["| setting | value |", "|---|---|", *(f"| {key} | `{value}` |" for key, value in rows), ""]


def _base_section(loaded: LoadedModel, config: Config, is_adapter: bool, in_full: bool) -> list[str]:
    params = sum(p.numel() for p in loaded.model.parameters())
    markers = (*METHODS[config.lora.method].markers, "modules_to_save")
    adapter = sum(p.numel() for n, p in loaded.model.named_parameters() if any(m in n for m in markers))
    name = config.model.name
    if name in BUILT_IN:
        where = "merged into the weights in this directory"
        if is_adapter or in_full:
            where = f"stored in `base/` beside the {'adapter' if is_adapter else 'trained weights'}"
        twins = TWINS | RETRIEVAL_TWINS
        what = f"twin of `{twins[name]}` (its tokenizer, ids and config)" if name in twins else "BLIP-2"
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


def _data_section(config: Config, words: TaskWords, val_images: int | None) -> list[str]:
    data = config.data
    rows: list[tuple[str, Any]] = [("format", data.format), ("data_dir", data.data_dir)]
    rows += [(name, getattr(data, name)) for name in ("images_dir", "annotations") if getattr(data, name)]
    rows.append(("split_seed", data.split_seed))
    if data.task == "vqa":
        rows += [
            ("question_template", json.dumps(data.question_template)),
            ("vqa_answers", data.vqa_answers),
            ("max_caption_tokens (answer tokens)", data.max_caption_tokens),
        ]
    else:
        rows += [("prompt", json.dumps(data.prompt)), ("max_caption_tokens", data.max_caption_tokens)]
    if val_images is not None:
        rows.append(("val images (scored in training)", val_images))
    return ["## Data", "", f"Fine-tuned on {words.trained_on} of the train split of:", "", *_table(rows)]


def _hyperparameter_section(config: Config, words: TaskWords) -> list[str]:
    lora, train = config.lora, config.train
    rows: list[tuple[str, Any]] = [("train.mode", train.mode)]
    if training_mode(config).lora:  # LoRA settings mean nothing when nothing has LoRA
        rows.append(("lora.method", lora.method))
        rows += [(f"lora.{key}", getattr(lora, key)) for key in METHODS[lora.method].uses]
        rows += [(f"lora.options.{key}", value) for key, value in lora.options.items()]
        rows += [
            ("lora.target_modules (language model)", ", ".join(lora.target_modules) or "none"),
            ("lora.qformer_target_modules", ", ".join(lora.qformer_target_modules) or "none"),
            ("lora.vit_target_modules (vision encoder)", ", ".join(lora.vit_target_modules) or "none"),
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
        f"Generation (validation and `{words.cli}` defaults): num_beams {gen.num_beams}, {gen.min_new_tokens}-"
        f"{gen.max_new_tokens} new tokens, repetition_penalty {gen.repetition_penalty}."
    )
    if config.data.task == "retrieval":
        rows.append(("train.val_k_test (candidates the matching head re-ranks)", train.val_k_test))
        generation = (
            "Losses: image-text contrastive (learnable temperature, every caption of an image a positive) plus "
            "image-text matching on hard negatives sampled from the contrastive similarities."
        )
    return [
        "## Training",
        "",
        f"AdamW with linear warm-up and cosine decay; {_vision_encoder(config)}.",
        "",
        *_table(rows),
        generation,
        "",
    ]


def _adapter_words(config: Config) -> str:
    """What the adapter is (`lora.method`), and how a PiSSA or OLoRA adapter was saved."""
    lora = config.lora
    words = f"The adapter is {METHODS[lora.method].card} (`lora.method={lora.method}`"
    words += ", DoRA" * lora.use_dora + ", rsLoRA" * lora.use_rslora + ")."
    if is_mutating_init(lora):
        words += (
            f" It was trained from `init_lora_weights={lora.init_lora_weights}`, which takes its start out of the base "
            f"weights; it is saved converted to a plain LoRA of rank {2 * lora.r} (the trained update minus its "
            "start) that applies to the unchanged base."
        )
    return words


def _vision_encoder(config: Config) -> str:
    """What the run did to the vision encoder, in words."""
    mode = training_mode(config)
    if "vision_model." in mode.in_full:
        return "the vision encoder trained in full"
    if mode.lora and mode.lora_on_vit:
        return (f"the vision encoder's weights frozen, LoRA on its {', '.join(config.lora.vit_target_modules)} layers "
                "trained")  # fmt: skip
    return "the vision encoder is frozen"


def _metrics_section(metrics: dict[str, float] | None, source: str | None, words: TaskWords) -> list[str]:
    if not metrics:
        absent = (
            "No validation metrics were recorded with this model when this card was written (see `metrics.json` "
            "beside it, if any); score a split with `captune eval --model-dir MODEL_DIR`."
        )
        return ["## Metrics", "", absent, ""]
    rows = ["| metric | value |", "|---|---|", *(f"| {name} | {value:.4f} |" for name, value in metrics.items())]
    note = (
        f"From {source or 'the val split, scored during training'}. best/ is chosen by val {words.best_by}, so val "
        f"scores are optimistic; `captune eval --split test` {words.held_out}."
    )
    return ["## Metrics", "", *rows, "", note, ""]


def _usage_section(config: Config, words: TaskWords, is_adapter: bool, in_full: bool) -> list[str]:
    captune = ["```bash", f"{words.cli} {words.arguments} --model-dir MODEL_DIR", "```", ""]
    if config.data.task == "retrieval":
        return _retrieval_usage(config, captune)
    # The text as captune builds it: for a VQA model the run's question template around the question.
    text = json.dumps(config.data.prompt)
    if config.data.task == "vqa":
        text = f"{json.dumps(config.data.question_template)}.format({json.dumps(QUESTION)})"
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
        f'inputs = processor(images=[image], text=[{text}], return_tensors="pt")',
        call,
        'print(processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True))',
        "```",
        "",
    ]
    return [
        "## How to load",
        "",
        f"`MODEL_DIR` is this directory. With captune (the run's {words.prompt} and generation settings are the "
        "defaults):",
        "",
        *captune,
        "With transformers alone:",
        "",
        *python,
    ]


def _retrieval_usage(config: Config, captune: list[str]) -> list[str]:
    """How to load a retrieval model: with captune (`captune.retrieval.load_retrieval`), or transformers alone."""
    base = "MODEL_DIR/base" if config.model.name in BUILT_IN else config.model.name
    python = [
        "```python",
        "import torch",
        "from PIL import Image",
        "from safetensors.torch import load_file",
        "from transformers import AutoTokenizer, Blip2ForImageTextRetrieval, BlipImageProcessor",
        "",
        f'model = Blip2ForImageTextRetrieval.from_pretrained("{base}").eval()',
        f'model.load_state_dict(load_file("MODEL_DIR/{training_mode(config).saves}"), strict=False)',
        'tokenizer = AutoTokenizer.from_pretrained("MODEL_DIR")',
        'images = BlipImageProcessor.from_pretrained("MODEL_DIR")',
        'pixels = images(Image.open("photo.jpg").convert("RGB"), return_tensors="pt").pixel_values',
        'text = tokenizer(["a dog on the beach"], return_tensors="pt")',
        "with torch.no_grad():",
        "    out = model(pixel_values=pixels, **text, use_image_text_matching_head=False)",
        "print(out.logits_per_image)  # the best of the 32 query-text cosines",
        "```",
        "",
    ]
    return [
        "## How to load",
        "",
        "`MODEL_DIR` is this directory. With captune (`captune.retrieval.load_retrieval(MODEL_DIR)` in Python; "
        "the weights named `temperature.value` only scale the training loss and are left out of the load below):",
        "",
        *captune,
        "With transformers alone:",
        "",
        *python,
    ]


def _limitations_section(config: Config, words: TaskWords) -> list[str]:
    items = []
    if config.model.name in BUILT_IN:
        items.append(
            f"The base is captune's built-in `{config.model.name}` with **random weights**: it demonstrates the "
            f"training path, not {words.output} quality. It is not a usable {words.model}."
        )
    if config.data.task == "retrieval":
        items.append(
            f"It ranks images and texts like its training data (`{config.data.format}`); on other kinds of images or "
            "descriptions expect the base model's behaviour or worse, and the biases of both the base model's "
            "pre-training data and these captions."
        )
    elif config.data.task == "vqa":
        items += [
            f"It answers like its training data (`{config.data.format}`): short answers to the kinds of questions "
            "asked there; on other images or questions expect the base model's behaviour or worse, and the biases "
            "of both the base model's pre-training data and these questions and answers.",
            "Answers are in the language of the training answers, at most `generate.max_new_tokens` tokens long.",
        ]
    else:
        items += [
            f"It captions like its training data (`{config.data.format}`); on other kinds of images expect the base "
            "model's behaviour or worse, and the biases of both the base model's pre-training data and these "
            "captions.",
            "Captions are in the language of the training captions, at most `generate.max_new_tokens` tokens long.",
        ]
    return ["## Limitations", "", *(f"- {item}" for item in items), ""]
