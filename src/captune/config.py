"""Run configuration: typed dataclasses, their checks (`validate`), saved beside the outputs.

`captune.config_loading` fills a `Config` from YAML and `key=value` arguments; `captune.training_modes` is the table
of `train.mode`s that the checks read.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from captune.errors import CaptuneError
from captune.training_modes import TRAINING_MODES, TrainingMode

if TYPE_CHECKING:
    from captune.data import ReadOptions
    from captune.data.vqa import VqaReadOptions


@dataclass
class ModelConfig:
    name: str = "tiny"
    """Hub id (`Salesforce/blip2-opt-2.7b`, `Salesforce/blip2-flan-t5-xl`) or local directory, loaded with
    `from_pretrained`; `tiny` (OPT), `tiny-vqa` (OPT, its tokenizer knowing the synthetic questions' words) and
    `tiny-t5` (T5) build a small random BLIP-2 from config in code (tests and the demos; nothing to download);
    `twin-blip2-opt-2.7b`, `twin-blip2-opt-6.7b`, `twin-blip2-opt-2.7b-coco`, `twin-blip2-flan-t5-xl` and
    `twin-blip2-flan-t5-xxl` build a twin of that checkpoint (its tokenizer, processor, ids and config at hidden sizes
    32-64, random weights: what runs here like the real model, except caption quality)."""
    dtype: str = "auto"
    """Weight dtype: `auto` (bf16 on a GPU that supports it, fp32 on CPU), `bf16`, `fp16` or `fp32`."""
    quantization: str = "none"
    """`4bit` (QLoRA: NF4, double quantisation, bf16 compute) or `8bit` loads the language model quantised with
    bitsandbytes (vision encoder, Q-Former, projection and LM head stay in `dtype`); needs a CUDA GPU and the
    bitsandbytes package. `none`: no quantisation."""
    image_size: int | None = None
    """Train and caption at this image size (pixels, square) instead of the checkpoint's (224 for every BLIP-2):
    the vision encoder's position embeddings are interpolated once when the model loads (bicubic, as LAVIS's
    `interpolate_pos_embed`; `captune.model.resize_images`) and the processor resizes images to it. LAVIS's caption
    fine-tune (`caption_coco_ft.yaml`) trains the ViT at 364; a multiple of the patch size (14 for ViT-g, 4 for the
    tiny captioners). More pixels cost more: ViT-g's work grows with the number of patches, (364/224)^2 = 2.6x. A
    model directory records it and loads at the size it was trained at. Unset: the checkpoint's size."""
    cudnn_attention: bool = False
    """Let PyTorch's attention use cuDNN's kernels in training (the feature pass, forward and backward). Off: flash,
    memory-efficient or math kernels; cuDNN builds a plan for every new input shape, which made an H100 epoch of
    packed rows 1.6x slower in a fresh process (see benchmarks/README.md)."""


@dataclass
class LoraConfig:
    method: str = "lora"
    """The PEFT method (`captune.peft_methods.METHODS`), each through PEFT's own config class on the same target
    layers: `lora` (LoRA; with `use_dora`, `use_rslora`, `init_lora_weights`), `adalora` (AdaLoRA: ranks pruned
    from 1.5 r to an average of `r` over the run, by importance scores updated every optimizer step), `ia3` (IA³: a
    learned scaling vector per layer; no r, alpha or dropout), `loha` (LoHa) or `lokr` (LoKr) (no input dropout:
    `rank_dropout` and `module_dropout` in `options`). Every method trains, checkpoints, saves, loads and merges."""
    r: int = 8
    """Rank (LoRA, LoHa, LoKr; AdaLoRA: the average rank its budget ends at, `target_r`)."""
    alpha: int = 32
    """Scaling numerator (scale = alpha / r; with `use_rslora` alpha / sqrt(r))."""
    dropout: float = 0.1
    """Dropout on the adapter's input (LoRA, AdaLoRA)."""
    use_dora: bool = False
    """DoRA (`method: lora`): the update split into a magnitude vector and a LoRA direction; slower steps."""
    use_rslora: bool = False
    """rsLoRA (`method: lora`): scale alpha / sqrt(r) instead of alpha / r, so high ranks still learn."""
    init_lora_weights: str = "true"
    """How the adapter starts (`method: lora`; PEFT's `init_lora_weights`): `true` (A Kaiming-uniform, B zero),
    `false` (both random: the adapter changes the model from the start; tests only), `gaussian`, `orthogonal`,
    `pissa` / `pissa_niter_N` (PiSSA: the top singular vectors of each weight; N fast-SVD iterations) or `olora`
    (OLoRA: a QR decomposition). PiSSA and OLoRA move their start out of the base weights, so a saved adapter is
    converted to a plain LoRA of rank 2 r that applies to the unchanged base. `adalora`: `true` or `false`."""
    options: dict[str, Any] = field(default_factory=dict)
    """Further fields of the method's PEFT config class, e.g. `{init_r: 12, tinit: 10, tfinal: 20, deltaT: 1}` for
    AdaLoRA, `{rank_dropout: 0.1, module_dropout: 0.0}` for LoHa/LoKr, `{decompose_factor: 4}` for LoKr; on the
    command line as YAML, `lora.options="{tinit: 10}"`. Fields captune sets (r, alpha, targets, total_step, ...)
    are refused, named with the key that sets them."""
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    """Language-model linear layers that get LoRA (OPT: `q_proj`, `k_proj`, `v_proj`, `out_proj`, `fc1`, `fc2`).
    Matched inside `language_model` only (the Q-Former and the vision encoder have keys of their own)."""
    qformer_target_modules: list[str] = field(default_factory=list)
    """Q-Former linear layers that get LoRA as well (e.g. `query`, `value`); empty for none (`train.mode`
    `lora-lm+qformer` and `lora-lm+qformer+vit` fill in `query`, `value`)."""
    vit_target_modules: list[str] = field(default_factory=list)
    """Vision-encoder linear layers that get LoRA as well, with `train.mode=lora-lm+qformer+vit` only: `qkv` (query,
    key and value in one layer), `projection` (the attention's output), `fc1`, `fc2`. Empty: `qkv` (why:
    `captune.training_modes.VIT_LORA_DEFAULT`)."""
    modules_to_save: list[str] = field(default_factory=list)
    """Modules trained in full and saved with the adapter (e.g. `language_projection`)."""


TASKS = ("caption", "vqa", "retrieval")
"""What a run's rows are and what its model learns: `caption` (image -> caption), `vqa` (image + question ->
answer), `retrieval` (image-caption pairs -> embeddings that find one from the other: BLIP-2's stage-1 model, a
`Blip2ForImageTextRetrieval`, trained with the contrastive and matching losses; see `captune.retrieval`)."""

RETRIEVAL_MODES = ("qformer", "vit+qformer")
"""The `train.mode`s a `task: retrieval` run takes: the model has no language model to put LoRA on."""

VQA_ANSWERS = ("most-frequent", "weighted")
"""How a VQA question's annotator answers become training rows (`data.vqa_answers`)."""

VQA_FORMATS = ("vqav2", "okvqa", "aokvqa", "manifest", "hf", "synthetic")
"""`data.format` values with `task: vqa` (the readers of `captune.data.vqa.VQA_FORMATS`)."""

VQA_GENERATE = {"min_new_tokens": 1, "max_new_tokens": 10}
"""The `generate` values a `task: vqa` run takes where its config does not set them: answers are a few words (LAVIS
answers VQAv2 with 1 to 10 tokens), not captions of 8 to 30."""


@dataclass
class DataConfig:
    task: str = "caption"
    """`caption`, `vqa` or `retrieval` (`TASKS`); a YAML file may write it at the top level (`task: vqa`). Retrieval
    reads the caption layouts and trains a `Blip2ForImageTextRetrieval` (`model.name`: `tiny-retrieval`,
    `twin-blip2-itm-vit-g`, `Salesforce/blip2-itm-vit-g` or a directory) with `train.mode=qformer`."""
    format: str = "synthetic"
    """Dataset layout: `flickr8k`, `flickr8k-kaggle`, `karpathy`, `coco`, `manifest`, `hf` or `synthetic` (built in,
    generated on first use); with `task: vqa`: `vqav2`, `okvqa`, `aokvqa`, `manifest`, `hf` or `synthetic` (its
    five questions an image)."""
    data_dir: str = "data/synthetic"
    """Folder holding the dataset (`~` is expanded); `manifest` also takes the manifest file, `hf` a dataset name."""
    images_dir: str | None = None
    """Override the image folder (relative to data_dir, or absolute)."""
    annotations: str | None = None
    """Override the annotation file name (e.g. which `dataset_*.json` of a Karpathy folder)."""
    split_seed: int = 0
    """Seed of the image-level split for layouts without split files (Kaggle Flickr8k, manifests and Hugging Face
    datasets without a split column)."""
    val_fraction: float = 0.125
    """Share of images in val for layouts without a val split (Kaggle Flickr8k, manifests and datasets without split
    columns)."""
    test_fraction: float = 0.125
    """Share of images in test for layouts without a test split (as above; COCO: the share of its val images)."""
    restval: str = "train"
    """Karpathy COCO `restval` images: `train` (joined to train, the usual practice) or `none` (left out)."""
    image_column: str = "image"
    """Image column of a `manifest` or `hf` dataset."""
    caption_column: str = "caption"
    """Caption column of a `manifest` or `hf` dataset (a string, or a list of strings)."""
    split_column: str = "split"
    """Split column of a `manifest` or `hf` dataset, used when present."""
    question_column: str = "question"
    """With `task: vqa`: the question column of a `manifest` or `hf` dataset."""
    answers_column: str = "answers"
    """With `task: vqa`: the column of a question's annotator answers in a `manifest` or `hf` dataset (a list, or
    one string of answers separated by `answer_separator`)."""
    answer_column: str = "answer"
    """With `task: vqa`: the column of one answer a row, for `manifest` or `hf` data with one answer per row (the
    rows of one question add up)."""
    answer_separator: str = "|"
    """With `task: vqa`: what separates the answers in a string of `answers_column`; empty: the string is one
    answer."""
    vqa_answers: str = "most-frequent"
    """With `task: vqa`, what a question trains on: `most-frequent`, its most frequent annotator answer (ties: the
    one given first), one row a question; `weighted`, each distinct answer a row, weighted in the loss by its VQA
    soft score min(1, annotators who gave it / 3), the loss the weighted mean of the rows' losses (as LAVIS and
    BLIP weight VQAv2's answers)."""
    skip_bad_images: bool = False
    """Train on the usable images when some are missing or unreadable (they are counted and reported)."""
    prompt: str = ""
    """Text put before every caption (e.g. `a photo of`); masked out of the loss and stripped from outputs."""
    question_template: str = "Question: {} Answer:"
    """With `task: vqa`, the text before each answer, `{}` the question: the BLIP-2 paper's by default; its
    zero-shot protocol's is `Question: {} Short answer:`. Masked out of the loss like `prompt`."""
    max_caption_tokens: int = 40
    """Longer captions (with `task: vqa`, answers) are cut to this many tokens before the end-of-sequence token."""
    num_workers: int = 0
    """DataLoader worker processes that decode images (0 decodes in the training process)."""
    feature_workers: int | None = None
    """Worker processes decoding images for the one-time image-feature pass (train.cache_image_features), when
    nothing else runs. None: the machine's cores shared among the local training processes (at least
    `num_workers`), or 0 when `num_workers` is 0."""
    prefetch_factor: int = 2
    """Batches each worker decodes ahead of the training step (with num_workers > 0); bounds the memory used."""


@dataclass
class TrainConfig:
    output_dir: str = "runs/default"
    """Run directory: config, TensorBoard events, checkpoints/, best/, final/."""
    mode: str = "lora-lm"
    """What trains. `lora-lm`: LoRA on the language model (`lora.target_modules`), plus `lora.modules_to_save`.
    `lora-lm+qformer`: LoRA on the Q-Former as well (`lora.qformer_target_modules`, default query and value).
    `lora-lm+qformer+vit`: LoRA on the vision encoder's attention as well (`lora.vit_target_modules`, default `qkv`),
    its weights frozen: the image side adapts at a small fraction of `vit+qformer`'s trained parameters and optimizer
    memory (no cached image features). `qformer`: the LAVIS caption fine-tune, no LoRA: the Q-Former, its query
    tokens and `language_projection` train in full, the language model and the vision encoder stay frozen (`lora.*`
    is not used); the saved directory holds those weights (`trained.safetensors`) and names the base model.
    `vit+qformer`: the same with the vision encoder trained in full too (LAVIS's `freeze_vit: False`; no cached image
    features). With `task: retrieval`: `qformer` (the Q-Former, query tokens, text embeddings, projections, matching
    head and temperature) or `vit+qformer`."""
    batch_size: int = 8
    """Samples (image-caption pairs) per device per forward pass; with `pack_captions`, whole images making about
    that many (batch_size / captions per image images, rounded)."""
    grad_accum: int = 1
    """Forward passes per optimizer step."""
    lr: float = 1e-4
    """Peak learning rate of AdamW."""
    lr_scales: dict[str, float] = field(default_factory=dict)
    """Learning-rate multipliers by part of the model: a module path of the BLIP-2 (`vision_model`, `qformer`,
    `query_tokens`, `language_projection`, `language_model`, or deeper, e.g. `language_model.lm_head`) -> a factor on
    `lr` for the trainable parameters under it (their own AdamW parameter group, the same warm-up and decay);
    the longest matching path wins, the rest train at `lr`. A path under which nothing trains is an error. On the
    command line as YAML: `train.lr_scales="{vision_model: 0.1, qformer: 0.1}"`. The demo trains its vision
    encoder at a tenth and its Q-Former at a third of the language side's rate: at the full rate they forget where
    in the image the shape is, which they tell apart at the start (benchmarks/LOG.md)."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    warmup_steps: int = 100
    """Linear warm-up optimizer steps before the cosine decay."""
    epochs: int = 5
    """Passes over the training captions (ignored when max_steps is set)."""
    max_steps: int | None = None
    """Stop after this many optimizer steps."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm (0 disables clipping)."""
    seed: int = 42
    """Seed of initialisation, shuffling and dropout."""
    log_every: int = 10
    """Optimizer steps between TensorBoard scalars."""
    save_every: int = 0
    """Optimizer steps between checkpoints (0: only at the end of each epoch)."""
    keep_checkpoints: int = 2
    """Most recent step checkpoints kept on disk (best/ and final/ are kept apart)."""
    validate: bool = True
    """Caption and score the val split at each epoch end, and keep best/ by CIDEr (with `task: vqa`: answer its
    questions and keep best/ by VQA accuracy)."""
    val_max_images: int | None = None
    """Validate on the first N val images only (with `task: vqa`, their questions; None: all)."""
    val_num_beams: int | None = None
    """Beams of the validation at each epoch end, which picks best/; None: `generate.num_beams`. Fewer (1: greedy,
    1.7x the captions/s of beam 5 at batch 64 on an H200) make each validation faster; best/ is then captioned once
    more at the end with `generate.*` and scored with every metric, so best/metrics.json holds the numbers of the
    `generate` setting (the LAVIS protocol's beam 5 in the shipped configs)."""
    val_k_test: int = 128
    """With `task: retrieval`: validation re-ranks each query's top `val_k_test` candidates with the matching head
    (LAVIS's `k_test`, 128 for COCO), after the contrastive scores ranked all; 0 ranks by the contrastive scores only.
    best/ is kept by `r_mean`, the mean of R@1, R@5 and R@10 in both directions."""
    val_metrics: str = "fast"
    """`fast`: BLEU, ROUGE-L and CIDEr at each validation (no METEOR JVM start, ~5 s saved each time) and every
    metric for the best step at the end; `full`: every metric at each validation."""
    resume_from: str | None = None
    """Checkpoint directory to continue from, or `latest` for the newest in output_dir/checkpoints."""
    cache_image_features: str = "auto"
    """`auto`: compute each training image's projected Q-Former output once and reuse it for all its captions and
    epochs, when nothing upstream of the language model trains (else the full path; OPT and T5 alike); `on`:
    the same, an error where it cannot apply; `off`: run the vision encoder and Q-Former at every step."""
    feature_batch_size: int = 64
    """Images per forward pass of the image-feature pass."""
    feature_cache_dir: str | None = None
    """Folder that keeps cached image features between runs (`auto`: ~/.cache/captune/features, or
    $CAPTUNE_CACHE_DIR/features): one file per base model (its weight files), image processor, dtype and set of train
    images (paths, sizes, modification times), so a second run on the same data (a sweep, a restart) skips the
    feature pass; any change makes a new file, and a file that cannot be read is computed and written
    again. None: the features live for this run only."""
    pack_captions: bool = True
    """A batch holds whole images (`batch_size` / captions per image of them), and each image's captions share one
    pass of its image: the vision side runs once per image on the full path, and the language model reads one row
    per image, `image tokens + BOS + prompt` once and then every caption, each attending to that prefix and to its own
    earlier tokens only (a block mask; position ids restart after the prefix). The same loss and gradients as one row
    per caption, with ~2.3x fewer tokens on Flickr8k (33 prefix tokens once instead of 5 times); the only difference
    is that LoRA dropout draws one mask for the shared prefix. Flan-T5: each image's prompt is encoded once for all
    its captions. `task: vqa` with OPT: a row per image holds its image tokens once and then each question as
    BOS + prompt + answer + END, each attending to the image tokens and to itself (T5 encodes each question with its
    image, so its VQA rows are not packed). `false`: one row per caption, batches of captions of different images."""
    group_by_length: bool = True
    """Batch captions (packed: images, by their captions' total length) of similar length together (shuffled in
    groups of 50 batches), so padding wastes little."""
    caption_logits_only: bool = True
    """Decoder-only LMs: run the LM head and the loss on caption positions only, in chunks recomputed in the backward
    pass (same loss; no float32 logits of the whole batch)."""
    fused_optimizer: bool = True
    """Use PyTorch's fused AdamW on CUDA."""
    compile: bool = False
    """torch.compile the language model's decoder layers."""
    gradient_checkpointing: bool = False
    """Recompute the language model's activations in the backward pass (non-reentrant), and the vision encoder's
    where it trains (`train.mode` vit+qformer, lora-lm+qformer+vit): less memory, more time (blip2-opt-2.7b, batch
    256, H100, LoRA on the LM: peak 26.3 -> 10.1 GiB, 1,428 -> 740 samples/s; the ViT-g trained, H200, batch 64:
    47.0 -> 15.3 GiB, 177 -> 122 samples/s, `benchmarks/README.md`)."""


@dataclass
class GenerateConfig:
    num_beams: int = 5
    """Beam width (1 is greedy)."""
    min_new_tokens: int = 8
    """Shortest caption in tokens (`task: vqa` runs: 1 unless set, see `VQA_GENERATE`)."""
    max_new_tokens: int = 30
    """Longest caption in tokens (`task: vqa` runs: 10 unless set: answers are short)."""
    repetition_penalty: float = 1.0
    """Penalty on repeated tokens (1.0 is none)."""
    batch_size: int | None = None
    """Images per generate call. None: captune picks it (`captune.generation.choice`): 512 greedy and 128 with beams
    on the static loops, 256 and 64 through transformers' generate on a GPU, 16 on a CPU; at most what half the free
    GPU memory holds and the run's images (rounded up to a power of two)."""
    static_cache: bool | None = None
    """Generate with a static KV cache. None: captune decides (`captune.generation.choice`, logged in one line): on
    a GPU, for OPT-style models without a repetition penalty, from 10,000 images greedy and 6,000 with beams (the
    runs long enough to earn the compiling warm-up), and always in `captune serve`; never on a CPU. OPT-style models
    run captune's own loops (`generate.static_greedy` and `generate.static_beam`: the decode step compiled on CUDA
    into CUDA graphs, beam search's bookkeeping on the GPU, the GPU read only every 8 tokens to see whether
    generation ended; short batches of `captune caption` filled up to the batch size so one compilation serves all);
    a repetition penalty and Flan-T5 use transformers' static cache. Compiling takes ~35-130 s per batch size and
    beam width on an H200; in float32 the captions are `generate`'s, in bf16 they can differ where two tokens score
    within rounding (different attention kernels)."""
    cudnn_attention: bool = False
    """Let PyTorch's attention use cuDNN's kernels while captioning. Off: flash, memory-efficient or math kernels
    (cuDNN's took 200 us per layer and step in the static-cache decode step at batch 256 on an H100)."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)


def training_mode(config: Config) -> TrainingMode:
    """The row of `config.train.mode` (which `validate` has checked)."""
    return TRAINING_MODES[config.train.mode]


def validate(config: Config) -> None:
    """Rejects values no run can use, naming the field: one check per section, all before any work starts.

    Raises:
        CaptuneError: `invalid config: <section>.<field> ...`, saying what the field takes.
    """
    for check in (_check_model, _check_lora, _check_data, _check_train, _check_generate):
        for ok, message in check(config):
            if not ok:
                raise CaptuneError(f"invalid config: {message}")


def _check_model(config: Config) -> list[tuple[bool, str]]:
    model = config.model
    return [
        (model.dtype in ("auto", "bf16", "fp16", "fp32"), "model.dtype must be auto, bf16, fp16 or fp32"),
        (model.quantization in ("none", "4bit", "8bit"), "model.quantization must be none, 4bit or 8bit"),
        (
            model.image_size is None or model.image_size >= 1,
            f"model.image_size={model.image_size}: must be a number of pixels (e.g. 364), or unset for the "
            "checkpoint's",
        ),
    ]


def _check_lora(config: Config) -> list[tuple[bool, str]]:
    from captune.peft_methods import check_lora  # here: it reads PEFT's config classes (torch), for LoRA modes only

    lora = config.lora
    # An unknown mode (which _check_train refuses) is checked as one with LoRA anywhere.
    mode = TRAINING_MODES.get(config.train.mode, TrainingMode(lora=True, lora_on_qformer=True, lora_on_vit=True))
    return [
        (lora.r >= 1, f"lora.r={lora.r}: the rank must be >= 1 (8 or 16 are usual)"),
        (lora.alpha >= 1, f"lora.alpha={lora.alpha}: must be >= 1 (the scale is alpha / r; 0 makes LoRA do nothing)"),
        (0 <= lora.dropout < 1, f"lora.dropout={lora.dropout}: must be in [0, 1)"),
        (
            not mode.lora or mode.lora_on_qformer or not lora.qformer_target_modules,
            f"lora.qformer_target_modules is set but train.mode is {config.train.mode} (the language model only): "
            "set train.mode=lora-lm+qformer, or lora.qformer_target_modules= (empty)",
        ),
        (
            not mode.lora or mode.lora_on_vit or not lora.vit_target_modules,
            f"lora.vit_target_modules is set but train.mode is {config.train.mode} (no LoRA on the vision encoder): "
            "set train.mode=lora-lm+qformer+vit, or lora.vit_target_modules= (empty)",
        ),
        (
            not mode.lora or bool(lora.target_modules or lora.qformer_target_modules or lora.vit_target_modules),
            "lora: no target modules given",
        ),
        *(check_lora(lora, config.model.quantization) if mode.lora else []),
    ]


def read_options(data: DataConfig) -> ReadOptions:
    """The reader options a run's `data` config section asks for."""
    from captune.data import ReadOptions  # here: captune.data imports torch, which reading a config does not need

    return ReadOptions(
        seed=data.split_seed,
        val_fraction=data.val_fraction,
        test_fraction=data.test_fraction,
        images_dir=data.images_dir,
        annotations=data.annotations,
        restval=data.restval,
        image_column=data.image_column,
        caption_column=data.caption_column,
        split_column=data.split_column,
    )


def vqa_read_options(data: DataConfig) -> VqaReadOptions:
    """The VQA reader options a `task: vqa` run's `data` section asks for: `read_options` and the question and answer
    columns."""
    from captune.data.vqa import VqaReadOptions

    return VqaReadOptions(
        **dataclasses.asdict(read_options(data)),
        question_column=data.question_column,
        answers_column=data.answers_column,
        answer_column=data.answer_column,
        answer_separator=data.answer_separator,
    )


def _check_data(config: Config) -> list[tuple[bool, str]]:
    data = config.data
    try:
        read_options(data)  # the reader options' own checks: split fractions, restval
        options_error = ""
    except CaptuneError as err:
        options_error = f"data.{err}"
    vqa = data.task == "vqa"
    vqa_only = [name for name in VQA_FORMATS if name not in ("manifest", "hf", "synthetic")]
    return [
        (data.task in TASKS, f"data.task is {data.task!r}; use one of {', '.join(TASKS)}"),
        (
            not vqa or data.format in VQA_FORMATS,
            f"data.format={data.format} is a caption layout, but task is vqa; use one of {', '.join(VQA_FORMATS)} "
            "(or task: caption)",
        ),
        (
            vqa or data.format not in vqa_only,
            f"data.format={data.format} is a VQA layout, but task is {data.task}; set task: vqa (task=vqa)",
        ),
        (
            data.vqa_answers in VQA_ANSWERS,
            f"data.vqa_answers is {data.vqa_answers!r}; use one of {', '.join(VQA_ANSWERS)}",
        ),
        (
            data.question_template.count("{}") == 1,
            f"data.question_template is {data.question_template!r}; it must hold the question's place, {{}}, once",
        ),
        (not options_error, options_error),
        (data.max_caption_tokens >= 1, "data.max_caption_tokens must be >= 1"),
        (data.num_workers >= 0, "data.num_workers must be >= 0"),
        (data.feature_workers is None or data.feature_workers >= 0, "data.feature_workers must be >= 0"),
        (data.prefetch_factor >= 1, "data.prefetch_factor must be >= 1"),
    ]


def _check_train(config: Config) -> list[tuple[bool, str]]:
    train = config.train
    return [
        (train.batch_size >= 1, "train.batch_size must be >= 1"),
        (train.grad_accum >= 1, "train.grad_accum must be >= 1"),
        (
            math.isfinite(train.lr) and 0 < train.lr <= 1,
            f"train.lr={train.lr}: must be a number in (0, 1] (1e-4 is usual)",
        ),
        (
            math.isfinite(train.weight_decay) and train.weight_decay >= 0,
            f"train.weight_decay={train.weight_decay}: must be a finite number >= 0 (0.01 is usual)",
        ),
        (
            math.isfinite(train.max_grad_norm) and train.max_grad_norm >= 0,
            f"train.max_grad_norm={train.max_grad_norm}: must be a finite number > 0, or 0 to turn clipping off",
        ),
        (
            isinstance(train.lr_scales, dict)
            and all(isinstance(k, str) and k for k in train.lr_scales)
            and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
                for v in train.lr_scales.values()
            ),
            f"train.lr_scales={train.lr_scales!r}: must map module paths to numbers > 0, e.g. "
            '"{vision_model: 0.1, qformer: 0.1}"',
        ),  # fmt: skip
        (train.epochs >= 1 or bool(train.max_steps), "train.epochs must be >= 1 (or set train.max_steps)"),
        (train.max_steps is None or train.max_steps >= 1, "train.max_steps must be >= 1"),
        (train.mode in TRAINING_MODES, f"train.mode must be one of {', '.join(TRAINING_MODES)}"),
        (train.warmup_steps >= 0, "train.warmup_steps must be >= 0"),
        (train.log_every >= 1, "train.log_every must be >= 1"),
        (train.save_every >= 0, "train.save_every must be >= 0 (0: only at epoch ends)"),
        (train.keep_checkpoints >= 1, "train.keep_checkpoints must be >= 1"),
        (train.val_max_images is None or train.val_max_images >= 1, "train.val_max_images must be >= 1"),
        (train.val_metrics in ("fast", "full"), "train.val_metrics must be fast or full"),
        (train.val_k_test >= 0, "train.val_k_test must be >= 0 (0: the contrastive scores alone)"),
        (
            config.data.task != "retrieval" or train.mode in RETRIEVAL_MODES,
            f"train.mode={train.mode} with task retrieval: a retrieval model has no language model for LoRA; use "
            f"train.mode={' or '.join(RETRIEVAL_MODES)} (the Q-Former, its query tokens, embeddings, projections, "
            "matching head and temperature in full, as LAVIS fine-tunes it)",
        ),
        (train.val_num_beams is None or train.val_num_beams >= 1, "train.val_num_beams must be >= 1"),
        (train.cache_image_features in ("auto", "on", "off"), "train.cache_image_features: auto, on or off"),
        (train.feature_batch_size >= 1, "train.feature_batch_size must be >= 1"),
    ]


def _check_generate(config: Config) -> list[tuple[bool, str]]:
    generate = config.generate
    return [
        (generate.num_beams >= 1, "generate.num_beams must be >= 1"),
        (generate.batch_size is None or generate.batch_size >= 1, "generate.batch_size must be >= 1"),
        (generate.max_new_tokens >= 1, "generate.max_new_tokens must be >= 1"),
        (
            0 <= generate.min_new_tokens <= generate.max_new_tokens,
            "generate: need 0 <= min_new_tokens <= max_new_tokens",
        ),
        (
            math.isfinite(generate.repetition_penalty) and generate.repetition_penalty > 0,
            f"generate.repetition_penalty={generate.repetition_penalty} (--repetition-penalty): must be a finite "
            "number > 0 (1.0 is none; above 1 discourages repeats)",
        ),
    ]


def to_dict(config: Config) -> dict[str, Any]:
    """The config as plain data (for YAML, JSON and TensorBoard)."""
    return dataclasses.asdict(config)


def save_config(config: Config, path: Path) -> None:
    """Writes the resolved config as YAML, with the command that reproduces the run on top."""
    header = f"# captune train --config {path.name}\n"
    path.write_text(header + yaml.safe_dump(to_dict(config), sort_keys=False))


def describe() -> str:
    """Every config key with its default and docstring, for `--help-config` and the docs."""
    import inspect
    import re

    lines = []
    for section in dataclasses.fields(Config):
        cls = typing.get_type_hints(Config)[section.name]
        source = inspect.getsource(cls)
        docs = dict(re.findall(r"^    (\w+):.*?\n    \"\"\"(.*?)\"\"\"", source, flags=re.S | re.M))
        lines.append(f"{section.name}:")
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            lines.append(f"  {f.name} = {default!r}\n      {' '.join(docs.get(f.name, '').split())}")
    return "\n".join(lines)
