"""Load BLIP-2 (hub id, local directory, the built-in tiny models and the twins of real checkpoints), make it
trainable as `train.mode` says (LoRA through PEFT, or named weights in full: see
`captune.training_modes.TRAINING_MODES`), and the helpers that reach into a BLIP-2 (its embeddings, stop tokens,
attention kernels, eval mode).

Saving and loading fine-tuned model directories is `captune.model_dir`; their model card `captune.card`; the tiny
models' tokenizer, processor and config `captune.tiny`.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel, get_peft_model
from safetensors import SafetensorError, safe_open
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import (
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2Processor,
)
from transformers.models.blip_2.modeling_blip_2 import Blip2VisionEmbeddings, Blip2VisionModel

from captune.config import Config, LoraConfig, training_mode
from captune.errors import CaptuneError
from captune.peft_methods import FEEDFORWARD, is_mutating_init, peft_config
from captune.retrieval import TINY_RETRIEVAL, load_retrieval_base, retrieval_base_name
from captune.tiny import TINY, TINY_MODELS, TINY_T5, VOCABULARIES, build_tiny_processor, draw_tiny_inputs, tiny_config
from captune.twins import RETRIEVAL_TWINS, TWINS, write_checkpoint

log = logging.getLogger(__name__)

BUILT_IN = (*TINY_MODELS, TINY_RETRIEVAL, *TWINS, *RETRIEVAL_TWINS)
"""Every model built here rather than loaded: the tiny models (captioning and retrieval) and the twins of the real
checkpoints (`twin-blip2-opt-2.7b`, ...: the checkpoint's tokenizer, ids and config at tiny hidden sizes, random
weights; see captune.twins). A run saves such a base inside its model directories, so they stand alone."""

# Blip2ForConditionalGeneration, or a PeftModel / accelerate wrapper around one: these wrappers forward attributes
# dynamically, so a precise static type would be a fiction.
Blip2Like = Any


@dataclass
class LoadedModel:
    """A BLIP-2 with its processor, ready to train or caption."""

    model: Blip2Like
    """`Blip2ForConditionalGeneration`, or a `PeftModel` around one; with `task: retrieval` a
    `Blip2ForImageTextRetrieval`."""
    processor: Any
    """`Blip2Processor`; a retrieval model's `RetrievalProcessor` (tokenizer and image processor)."""
    base_name: str
    """What `captune.json` records as the base: a hub id, a local directory, or `tiny`."""


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto` is bf16 on a GPU that has it and fp32 elsewhere; explicit names map to torch dtypes."""
    if name == "auto":
        bf16_ok = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if bf16_ok else torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def build_tiny(seed: int = 0, name: str = TINY) -> LoadedModel:
    """A built-in tiny BLIP-2 (`tiny`, `tiny-vqa` or `tiny-t5`) with random weights
    (`captune.tiny.draw_tiny_inputs`), deterministic for a seed."""
    t5 = name == TINY_T5
    processor = build_tiny_processor(t5=t5, words=VOCABULARIES[name])
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Blip2ForConditionalGeneration(tiny_config(processor, t5=t5))
        draw_tiny_inputs(model)
    return LoadedModel(model.eval(), processor, name)


def load_base(name: str, dtype: torch.dtype = torch.float32, seed: int = 0, quantization: str = "none") -> LoadedModel:
    """Loads a BLIP-2 and its processor by hub id or local directory (the same `from_pretrained` path), or builds a
    built-in one (`tiny`, `tiny-vqa`, `tiny-t5`, or a twin such as `twin-blip2-opt-2.7b`: written as the hub has the
    checkpoint, with random weights, and loaded from there).

    Args:
        quantization: `4bit` or `8bit` loads the language model quantised with bitsandbytes (see `ModelConfig`).

    Raises:
        CaptuneError: the name is neither a local directory nor a model that can be loaded (offline, no cache), or
            quantisation is asked where it cannot run.
    """
    extra = _quantization_kwargs(quantization, dtype, name)
    if retrieval_base_name(name):  # a retrieval BLIP-2 (`task: retrieval`): no language model to quantise
        retrieval = load_retrieval_base(name, seed)
        retrieval.model.to(dtype)  # type: ignore[arg-type]  # transformers' stubs of .to
        return LoadedModel(retrieval.model, retrieval.processor, name)
    if name in TINY_MODELS:
        loaded = build_tiny(seed, name)
        loaded.model.to(dtype)
        return loaded
    if name in TWINS:
        with tempfile.TemporaryDirectory(prefix="captune-twin-") as tmp:
            loaded = load_base(str(write_checkpoint(TWINS[name], Path(tmp) / name, seed=seed)), dtype, seed,
                               quantization)  # fmt: skip
        return LoadedModel(loaded.model, loaded.processor, name)
    local = Path(name).expanduser()
    if not local.is_dir() and (local.is_absolute() or name.startswith((".", "~")) or name.count("/") > 1):
        raise CaptuneError(f"model {name!r}: no such directory (a hub id looks like `Salesforce/blip2-opt-2.7b`)")
    name = str(local) if local.is_dir() else name
    try:
        processor = Blip2Processor.from_pretrained(name)
        model = Blip2ForConditionalGeneration.from_pretrained(name, dtype=dtype, **extra)
    except SafetensorError as err:
        raise CaptuneError(f"{_damaged_weight_file(Path(name))} cannot be read ({err}): it is cut short or not a "
                           "safetensors file; copy the model's files again") from None  # fmt: skip
    except (OSError, ValueError) as err:
        raise CaptuneError(
            f"could not load BLIP-2 model {name!r}: {err}\n"
            "Give a hub id that is in the local Hugging Face cache (download it once while online, e.g. "
            "`hf download Salesforce/blip2-opt-2.7b`) or a local directory with config.json and weights."
        ) from None
    check_image_tokens(processor, model.config, name)
    return LoadedModel(model.eval(), processor, name)


def _damaged_weight_file(folder: Path) -> Path:
    """The first safetensors file of a model folder whose header does not match its size (else the folder)."""
    for file in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(file), "pt"):
                pass
        except (SafetensorError, OSError):
            return file
    return folder


def _quantization_kwargs(quantization: str, dtype: torch.dtype, name: str) -> dict[str, Any]:
    """`from_pretrained` arguments for a quantised language model, after checking that quantisation can run here."""
    if quantization == "none":
        return {}
    if name in TINY_MODELS:
        raise CaptuneError(f"model.quantization={quantization}: the built-in {name} model is built in code, not "
                           "loaded; quantise a model loaded by hub id or directory")  # fmt: skip
    if not torch.cuda.is_available():
        raise CaptuneError(f"model.quantization={quantization} needs a CUDA GPU (bitsandbytes' kernels); this machine "
                           "has none. Train without quantisation (model.quantization=none) on the CPU")  # fmt: skip
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError:
        raise CaptuneError(f"model.quantization={quantization} needs the bitsandbytes package: "
                           "pip install bitsandbytes") from None  # fmt: skip
    # Only the language model is quantised: the frozen ViT and the small Q-Former keep their precision, as the
    # image side matters for captions and takes a third of the memory of blip2-opt-2.7b.
    keep = ["vision_model", "qformer", "language_projection", "lm_head"]
    if quantization == "4bit":
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                    bnb_4bit_compute_dtype=dtype, llm_int8_skip_modules=keep)  # fmt: skip
    else:
        config = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=keep)
    return {"quantization_config": config, "device_map": {"": torch.cuda.current_device()}}


def check_image_tokens(processor: Blip2Processor, config: Blip2Config, name: str) -> None:
    """Puts the image tokens where the model reads them, or refuses a processor that does not match the model.

    Snapshots not updated for current transformers (blip2-opt-6.7b, the `-coco` models) have no `num_query_tokens`
    in their processor files, so the processor would add no image tokens and the model would silently ignore the
    image, and no `image_token_index` in their config, though the processor adds `<image>` to the tokenizer: both
    are taken from the other side, as the hub's update did."""
    tokenizer = processor.tokenizer
    if processor.num_query_tokens is None:
        log.warning("%s: processor has no num_query_tokens; using the model's %d", name, config.num_query_tokens)
        processor.num_query_tokens = config.num_query_tokens
    image_id = tokenizer.convert_tokens_to_ids(processor.image_token.content)
    if config.image_token_index is None:
        log.warning("%s: config has no image_token_index (an old snapshot); using the tokenizer's %s, id %d", name,
                    processor.image_token.content, image_id)  # fmt: skip
        config.image_token_index = image_id
    rows = config.get_text_config().vocab_size
    if image_id == tokenizer.unk_token_id or image_id >= rows:
        raise CaptuneError(
            f"{name}: the tokenizer has no {processor.image_token.content} token of its own (id {image_id}; unknown "
            f"{tokenizer.unk_token_id}, embedding rows {rows}); use the processor saved with this model"
        )
    if processor.num_query_tokens != config.num_query_tokens or image_id != config.image_token_index:
        raise CaptuneError(
            f"{name}: processor and model disagree (num_query_tokens {processor.num_query_tokens} vs "
            f"{config.num_query_tokens}, <image> id {image_id} vs {config.image_token_index}); "
            "use the processor saved with this model"
        )


def stop_token_ids(model: Blip2Like) -> list[int]:
    """The tokens at which generation ends a caption: the language model's generation config's EOS, which its
    `generate` and captune's own loops stop at (blip2-opt: 50118, OPT's "\\n"; Flan-T5 and the tiny models: `</s>`)."""
    eos = blip_of(model).language_model.generation_config.eos_token_id
    return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)


def caption_end_id(model: Blip2Like, tokenizer: Any) -> int:
    """The token each training caption ends with: one that generation stops at (the tokenizer's EOS when it is one
    of them, else the first), so that a fine-tuned model's captions end where its training captions did. For
    blip2-opt that is "\\n" (50118), not the tokenizer's `</s>` (2), as LAVIS ends its OPT captions.

    Raises:
        CaptuneError: generation stops at no token, or at one the tokenizer or the embedding does not have: what
            training would end captions with and what generation stops at cannot agree.
    """
    stops = stop_token_ids(model)
    rows = blip_of(model).language_model.get_output_embeddings().weight.shape[0]
    usable = [i for i in stops if 0 <= i < min(len(tokenizer), rows)]
    if not usable:
        raise CaptuneError(
            f"generation stops at {stops or 'no token'} (the language model's generation config, eos_token_id) and "
            f"the tokenizer ends a text with {tokenizer.eos_token_id}: training captions would end with a token "
            f"generation does not stop at ({len(tokenizer)} tokens, {rows} embedding rows). Set eos_token_id in "
            "the model's generation_config.json to the token its captions should end with"
        )
    return tokenizer.eos_token_id if tokenizer.eos_token_id in usable else usable[0]


_T5_NAMES = {"q_proj": ["q"], "k_proj": ["k"], "v_proj": ["v"], "out_proj": ["o"], "fc1": ["wi"], "fc2": ["wo"]}
_T5_GATED_NAMES = _T5_NAMES | {"fc1": ["wi_0", "wi_1"]}
"""OPT's layer names as T5's: Flan-T5's feed-forward is gated (`gated-gelu`: two input layers, wi_0 and wi_1)."""


def _lora_targets(lora: LoraConfig) -> list[tuple[str, list[str], str]]:
    """Each `lora.*` key of target names with its names and the part of BLIP-2 they are matched in."""
    return [("target_modules", lora.target_modules, "language_model."),
            ("qformer_target_modules", lora.qformer_target_modules, "qformer."),
            ("vit_target_modules", lora.vit_target_modules, "vision_model.")]  # fmt: skip


def _target_regex(lora: LoraConfig, only: tuple[str, ...] | None = None) -> str:
    """A regex over module names that keeps each key's LoRA inside its part (the language model; the Q-Former and
    the vision encoder when asked): PEFT's defaults or bare names would match layers of the other parts too (`fc1`
    is in the language model and the ViT). `only`: the targets among those names (IA³'s feed-forward layers); a
    regex that matches nothing when there are none."""
    chosen = [(prefix, [t for t in targets if only is None or t in only]) for _, targets, prefix in _lora_targets(lora)]
    parts = [rf"{re.escape(prefix)}.*\.({'|'.join(map(re.escape, targets))})" for prefix, targets in chosen if targets]
    return rf"^({'|'.join(parts)})$" if parts else r"^$"


def apply_lora(model: Blip2Like, lora: LoraConfig, total_step: int | None = None) -> PeftModel:
    """Wraps the model with the PEFT method of `lora.method` (LoRA by default) on the configured layers; everything
    else is frozen.

    Args:
        total_step: AdaLoRA's optimizer steps; None until the run knows them (`captune.peft_methods.set_total_step`).

    Raises:
        CaptuneError: a target name matches no layer of this model (names differ between OPT and T5), or PEFT
            refuses the method's options.
    """
    if not model.config.use_decoder_only_language_model:
        # OPT's attention names mean T5's q/k/v/o, so one config (the default q_proj/v_proj) serves both families.
        t5_names = _T5_GATED_NAMES if model.config.get_text_config().is_gated_act else _T5_NAMES
        lora = dataclasses.replace(lora, target_modules=[n for t in lora.target_modules for n in t5_names.get(t, [t])])
    names = [n for n, _ in model.named_modules()]
    linear = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    for key, targets, prefix in _lora_targets(lora):
        leaves = {n.rsplit(".", 1)[-1] for n in linear if n.startswith(prefix)}
        for target in targets:
            if target not in leaves:
                raise CaptuneError(
                    f"lora.{key}: {target!r} matches no linear layer of {prefix.rstrip('.')}; it has "
                    f"{', '.join(sorted(leaves))}"
                )
    for module in lora.modules_to_save:
        if module not in names:
            raise CaptuneError(f"lora.modules_to_save: {module!r} is not a module of this model")
    feedforward = _target_regex(lora, only=FEEDFORWARD)
    config = peft_config(lora, _target_regex(lora), feedforward, total_step)
    peft_model = get_peft_model(model, config)
    if is_mutating_init(lora):  # the adapter's start, to convert what is saved into a plain LoRA (model_dir)
        start = {n: p.clone() for n, p in trainable_weights(peft_model).items()}
        peft_model.initial_adapter = start  # type: ignore[assignment]  # (nn.Module's attributes are typed as modules)
    return peft_model


def apply_train_mode(model: Blip2Like, config: Config) -> torch.nn.Module:
    """Makes trainable what `train.mode` says: LoRA through PEFT (`lora-lm`, `lora-lm+qformer`,
    `lora-lm+qformer+vit`), or the parameters of the mode's `in_full` in full (`qformer`, `vit+qformer`); everything
    else is frozen."""
    mode = training_mode(config)
    if mode.lora:
        return apply_lora(model, config.lora)
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith(mode.in_full))
    return model


@contextmanager
def evaluating(model: torch.nn.Module) -> Iterator[None]:
    """Within it the model is in eval mode; on leaving, also by an exception, in the mode it had."""
    was_training = model.training
    if was_training:  # (a walk over ~1,300 modules of the real model: a millisecond of a single caption)
        model.eval()
    try:
        yield
    finally:
        if was_training:
            model.train()


def trainable_summary(model: torch.nn.Module) -> str:
    """`trainable 12,345 of 3,872,000 parameters (0.32%)` for the run log."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return f"trainable {trainable:,} of {total:,} parameters ({100 * trainable / total:.2f}%)"


def trainable_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's trainable parameters by name, detached, on the CPU."""
    return {name: p.detach().cpu() for name, p in model.named_parameters() if p.requires_grad}


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` is the first GPU when there is one, else the CPU; other names go to torch as they are."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise CaptuneError(f"--device {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CaptuneError(f"--device {name}: no CUDA GPU is available here; use --device cpu")
    return device


# ------------------------------------------------------------------------------------------- model helpers ---
def blip_of(model: nn.Module) -> Blip2ForConditionalGeneration:
    """The BLIP-2 model inside a PEFT wrapper (or the model itself)."""
    get_base_model = getattr(model, "get_base_model", None)
    blip = get_base_model() if callable(get_base_model) else model
    assert isinstance(blip, Blip2ForConditionalGeneration), type(blip)
    return blip


def load_configured_base(config: Config, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """The base model of a run's config as the run trains it: `model.name` (seeded by `train.seed`), quantised as
    `model.quantization` says, at `model.image_size` when set."""
    loaded = load_base(config.model.name, dtype, config.train.seed, config.model.quantization)
    if config.model.image_size:
        resize_images(loaded, config.model.image_size)
    return loaded


def resize_images(loaded: LoadedModel, size: int) -> None:
    """Makes a captioning or retrieval BLIP-2 see `size`-pixel square images, in place: its vision encoder's position
    embeddings interpolated over the new patch grid (bicubic, by transformers' own `interpolate_pos_encoding`: the
    model then computes what the original computes with `interpolate_pos_encoding=True`), its config and its
    processor's resize set to `size`. Nothing changes when `size` is already the model's.

    Raises:
        CaptuneError: `size` is not a multiple of the patch size.
    """
    vision = vision_model_of(loaded.model)
    embeddings = vision.embeddings
    assert isinstance(embeddings, Blip2VisionEmbeddings), type(embeddings)
    if size == embeddings.image_size:
        return
    patch: int = vision.config.patch_size  # type: ignore[assignment]  # an int in every BLIP-2 (ViT-g: 14)
    if size % patch:
        below = size // patch * patch
        raise CaptuneError(f"model.image_size={size}: not a multiple of the vision encoder's patch size {patch}; "
                           f"use {below or patch} or {below + patch}")  # fmt: skip
    old = embeddings.position_embedding
    patches = (size // patch) ** 2
    with torch.no_grad():
        grid = torch.empty(1, patches + 1, old.shape[-1], dtype=old.dtype, device=old.device)
        new = embeddings.interpolate_pos_encoding(grid, size, size).contiguous()
    embeddings.position_embedding = nn.Parameter(new, requires_grad=old.requires_grad)
    embeddings.image_size, embeddings.num_patches, embeddings.num_positions = size, patches, patches + 1
    vision.config.image_size = size
    loaded.model.config.vision_config.image_size = size
    loaded.processor.image_processor.size = {"height": size, "width": size}
    log.info("images at %d px: the vision encoder's position embeddings interpolated to %d patches", size, patches)


def vision_trains(model: nn.Module) -> bool:
    """Whether any parameter of the vision encoder trains (in full or LoRA on it), in a captioning or retrieval
    BLIP-2, wrapped in PEFT or not."""
    return any(p.requires_grad and "vision_model." in name for name, p in model.named_parameters())


def vision_model_of(model: nn.Module) -> Blip2VisionModel:
    """The vision encoder of a captioning or retrieval BLIP-2 (inside a PEFT wrapper or not)."""
    get_base_model = getattr(model, "get_base_model", None)
    inner = get_base_model() if callable(get_base_model) else model
    vision = inner.vision_model
    assert isinstance(vision, Blip2VisionModel), type(vision)
    return vision


def embedding_of(blip: Blip2ForConditionalGeneration) -> nn.Embedding:
    embeddings = blip.get_input_embeddings()
    assert isinstance(embeddings, nn.Embedding), type(embeddings)
    return embeddings


def embedded_inputs(
    blip: Blip2ForConditionalGeneration,
    input_ids: torch.Tensor,
    pixel_values: torch.Tensor | None = None,
    image_features: torch.Tensor | None = None,
) -> torch.Tensor:
    """The language model's input embeddings of `input_ids` with each image's projected Q-Former output in its image
    token positions, as BLIP-2's own forward and generate build them; from pixels unless the features are given."""
    if image_features is None:
        assert pixel_values is not None
        image_features = blip.get_image_features(pixel_values=pixel_values, return_dict=True).pooler_output
    embeds = blip.get_input_embeddings()(input_ids)
    is_image = (input_ids == blip.config.image_token_id).unsqueeze(-1)
    return embeds.masked_scatter(is_image, image_features.to(embeds.dtype))


@contextmanager
def attention_kernels(cudnn: bool = False) -> Iterator[None]:
    """Within it, PyTorch's scaled-dot-product attention may use flash, memory-efficient or plain (math) kernels, and
    cuDNN attention only when `cudnn` is true (`model.cudnn_attention`, `generate.cudnn_attention`).

    On H100s PyTorch picks cuDNN attention first. It builds (and on a fresh machine JIT-compiles) an execution plan
    for every new input shape, and training's packed rows have a new length at nearly every step: measured on an H100
    (benchmarks/README.md), the main thread spent ~6 of the first 15 s of an epoch inside that attention call, and
    the epoch took 40.9 s in a fresh process against 26.3 s in a second one (plans' kernels cached on disk). In the
    compiled decode step its kernel took 200 us per layer at batch 256, 62 % of the step. Wrap forward and backward
    (a checkpointed layer's recomputation must pick the same kernel as its forward)."""
    if cudnn:
        yield
        return
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
        yield
