"""Save and load fine-tuned model directories: what `captune train` writes as RUN/best, RUN/final and checkpoints.

A model directory holds the weights its training mode saves (`TrainingMode.saves`: the PEFT adapter, or the weights
trained in full), the processor, a model card and `captune.json`, which names the base model and holds the run's
config. When the base cannot be fetched by name (the tiny model, the twins), its weights are stored in `base/` inside
the directory, so the directory stands alone. Loading checks what can go wrong before it reaches PEFT: a missing or
damaged weight file, NaN weights, a processor that does not match the base, a caption end the base does not stop at.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformers import Blip2Processor

from captune.card import CARD_FILE, model_card
from captune.config import Config, to_dict, training_mode
from captune.config_loading import config_from_dict, load_config
from captune.errors import CaptuneError
from captune.files import read_utf8
from captune.model import (
    Blip2Like,
    LoadedModel,
    apply_lora,
    build_tiny,
    caption_end_id,
    check_image_tokens,
    load_base,
    resize_images,
    resolve_device,
    resolve_dtype,
    stop_token_ids,
    trainable_weights,
)
from captune.peft_methods import is_mutating_init
from captune.retrieval import RetrievalProcessor, is_retrieval, without_temperature
from captune.training_modes import ADAPTER_FILE, TRAINABLE_FILE, TRAINED_FILE

END_KEY = "caption_end_id"
"""The captune.json key of the token a run ended its training captions with (see `caption_end_id`)."""
MERGED_KEY = "merged_from"
"""The captune.json key that marks a `captune merge` output (a plain BLIP-2; the file is provenance only)."""
META_FILE = "captune.json"
BASE_SUBDIR = "base"


def saved_config(model_dir: Path) -> Config:
    """The config a saved model directory was trained with (its captune.json), or the defaults for a plain BLIP-2."""
    meta_file = model_dir / META_FILE
    if not meta_file.is_file():
        return Config()
    meta = read_meta(meta_file)
    return config_from_dict(meta["config"], str(meta_file)) if "config" in meta else Config()


def read_meta(meta_file: Path) -> dict[str, Any]:
    """A model directory's captune.json: an object naming `base_model` (or `merged_from`) and holding `config`.

    Raises:
        CaptuneError: not JSON, or not what `captune train` writes; the message names the file and line.
    """
    try:
        meta = json.loads(read_utf8(meta_file))
    except json.JSONDecodeError as err:
        raise CaptuneError(f"{meta_file}:{err.lineno}: not valid JSON ({err.msg}); copy captune.json again from the "
                           "run that saved this model") from None  # fmt: skip
    if not isinstance(meta, dict) or not (MERGED_KEY in meta or isinstance(meta.get("base_model"), str)):
        raise CaptuneError(f"{meta_file}: not a captune.json (an object with 'base_model' and 'config'); copy it "
                           "again from the run that saved this model")  # fmt: skip
    if MERGED_KEY not in meta and not isinstance(meta.get("config"), dict):
        raise CaptuneError(f"{meta_file}: 'config' is missing or not an object; copy it again from the run that "
                           "saved this model")  # fmt: skip
    return meta


def refuse_nonfinite(weights: dict[str, torch.Tensor], where: str, advice: str) -> None:
    """Raises when a weight holds NaN or inf: a model with them captions nothing (empty captions), so it is never
    saved or loaded.

    Raises:
        CaptuneError: naming `where`, the first such weights and `advice`.
    """
    bad = [name for name, value in weights.items() if value.is_floating_point() and not torch.isfinite(value).all()]
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise CaptuneError(f"{where}: non-finite (NaN or inf) weights in {', '.join(bad[:3])}{more}; {advice}")


DIVERGED_ADVICE = ("the run that saved them diverged: train again with model.dtype=bf16 or fp32 (fp16 overflow is the "
                   "commonest cause) or a lower train.lr")  # fmt: skip


def read_weights(file: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file a model directory or checkpoint holds, all finite.

    Raises:
        CaptuneError: the file is missing, cut short or not safetensors, or holds NaN or inf.
    """
    if not file.is_file():
        raise CaptuneError(f"{file} is missing; copy the whole directory again from the run that saved it")
    try:
        weights = load_file(str(file))
    except (SafetensorError, OSError) as err:
        raise CaptuneError(f"{file} cannot be read ({err}): it is cut short or not a safetensors file; copy it again "
                           "from the run that saved it") from None  # fmt: skip
    refuse_nonfinite(weights, str(file), DIVERGED_ADVICE)
    return weights


def save_model_dir(
    path: Path,
    loaded: LoadedModel,
    config: Config,
    base_dir: Path | None = None,
    metrics: dict[str, float] | None = None,
    trainable: dict[str, torch.Tensor] | None = None,
) -> None:
    """Writes adapter (safetensors), processor, `captune.json` and a model card into `path` (which the caller makes
    atomic).

    Args:
        base_dir: where the tiny base model was saved once per run; copied into `path/base` so the directory stands
            alone. None for bases loadable by name.
        metrics: this model's val metrics, for the model card.
        trainable: the trainable weights by parameter name, when the model's own are sharded (FSDP); None reads them
            from the model.
    """
    trainable = trainable if trainable is not None else trainable_weights(loaded.model)
    refuse_nonfinite(trainable, f"refusing to save {path}", DIVERGED_ADVICE.replace("that saved them ", ""))
    path.mkdir(parents=True, exist_ok=True)
    mode = training_mode(config)
    if mode.lora and is_mutating_init(config.lora):
        save_converted_adapter(path, loaded, trainable)
    elif mode.lora:
        save_base(path, loaded, trainable)  # with a PeftModel, save_pretrained writes the adapter only
    else:  # the weights trained in full, to be loaded onto the base
        save_file({n: v.contiguous() for n, v in trainable.items()}, str(path / mode.saves))
        loaded.processor.save_pretrained(path)
    if mode.lora and (is_mutating_init(config.lora) or config.lora.method == "adalora"):
        # Their adapter file is not what training holds (converted; AdaLoRA's pruned ranks cut out): the weights as
        # they are, to put them back into the model in training (`load_saved_weights`).
        save_file({n: v.contiguous() for n, v in trainable.items()}, str(path / TRAINABLE_FILE))
    base = loaded.base_name
    if base_dir is not None:
        shutil.copytree(base_dir, path / BASE_SUBDIR, dirs_exist_ok=True)
        base = BASE_SUBDIR
    meta: dict[str, Any] = {"base_model": base, "config": to_dict(config)}
    if not is_retrieval(loaded.model):  # a retrieval model generates nothing
        meta[END_KEY] = caption_end_id(loaded.model, loaded.processor.tokenizer)
    (path / META_FILE).write_text(json.dumps(meta, indent=2))
    (path / CARD_FILE).write_text(model_card(loaded, config, metrics))


def save_converted_adapter(path: Path, loaded: LoadedModel, trainable: dict[str, torch.Tensor]) -> None:
    """Saves the adapter of a PiSSA or OLoRA run (whose start B0 A0 was taken out of the base weights) as a plain
    LoRA of rank 2 r for the unchanged base, B A - B0 A0 (PEFT's `path_initial_model_for_weight_conversion`)."""
    model = loaded.model
    modes = [(module, module.training) for module in model.modules()]
    with tempfile.TemporaryDirectory(prefix="captune-initial-") as tmp, torch.random.fork_rng():
        # PEFT loads the start as a second adapter and deletes it again: fork_rng keeps that from drawing from the
        # run's random state, and the modules' train/eval modes, which loading an adapter sets to eval, are put back.
        initial = Path(tmp) / "initial"
        model.save_pretrained(initial, state_dict=model.initial_adapter)
        model.save_pretrained(path, path_initial_model_for_weight_conversion=str(initial))
    for module, training in modes:
        module.train(training)
    # PEFT's conversion keeps the LoRA matrices only: the modules trained in full go back beside them.
    in_full = {k: v for k, v in get_peft_model_state_dict(model, state_dict=trainable).items() if "lora_" not in k}
    save_file({**load_file(str(path / ADAPTER_FILE)), **in_full}, str(path / ADAPTER_FILE), metadata={"format": "pt"})
    loaded.processor.save_pretrained(path)


def save_tiny_model_dir(root: Path, overrides: Sequence[str] = ()) -> Path:
    """A model directory as `captune train` writes it, for the tiny model with an untrained default LoRA: the base
    in root/base-model, the adapter directory (returned) in root/best. For tests and benchmarks that need one."""
    loaded = build_tiny(0)
    save_base(root / "base-model", loaded)
    config = load_config(None, list(overrides))
    loaded.model = apply_lora(loaded.model, config.lora)
    save_model_dir(root / "best", loaded, config, root / "base-model")
    return root / "best"


def save_base(path: Path, loaded: LoadedModel, state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Saves a model (a plain base, or just the adapter of a PeftModel) and its processor as safetensors;
    `state_dict`, when given, holds the weights to write (PEFT keeps the adapter's among them)."""
    if state_dict is None and is_retrieval(loaded.model):  # transformers' class has no temperature to load it into
        state_dict = without_temperature(loaded.model.state_dict())
    loaded.model.save_pretrained(path, safe_serialization=True, state_dict=state_dict)
    loaded.processor.save_pretrained(path)


def load_model_dir(
    path: str | Path, dtype: torch.dtype | None = None, device: str = "auto", merge: bool = False
) -> LoadedModel:
    """Loads what `captune train` saved (base + adapter), or a plain BLIP-2 directory or hub id, onto a device.

    Args:
        dtype: Weight dtype; None is bf16 on a GPU that has it, fp32 elsewhere.
        device: `auto`, `cpu`, `cuda`, `cuda:N`.
        merge: Merge a LoRA adapter into the base weights (PEFT's `merge_and_unload`, in float32 on the CPU, then
            cast once): a plain BLIP-2 without adapter layers to run at every token. In float32 it captions exactly
            as base + adapter; in bf16 or fp16 the rounded merged weights can now and then change a caption.

    Raises:
        CaptuneError: the directory holds neither an adapter nor a model, the device does not exist, or the adapter
            cannot be merged.
    """
    target = resolve_device(device)
    dtype = dtype or resolve_dtype("auto", target)
    loaded = _load_model_dir(Path(path).expanduser(), torch.float32 if merge else dtype)
    if merge and isinstance(loaded.model, PeftModel):
        try:
            loaded.model = loaded.model.merge_and_unload(safe_merge=True)  # modules_to_save replace their originals
        except ValueError as err:
            raise CaptuneError(f"{path}: the adapter cannot be merged: {err}") from None
    if merge:
        loaded.model.to(dtype)  # rounded once, after the float32 merge
    loaded.model.to(target)
    return loaded


def _load_model_dir(path: Path, dtype: torch.dtype) -> LoadedModel:
    meta_file = path / META_FILE
    if not meta_file.is_file():
        if path.exists() and not (path / "config.json").is_file():
            raise CaptuneError(
                f"{path}: no {META_FILE} (a captune run directory such as RUN/best) and no config.json "
                "(a merged BLIP-2 model); point --model-dir at one of those"
            )
        return load_base(str(path), dtype)
    meta = read_meta(meta_file)
    if MERGED_KEY in meta:  # `captune merge` output: a plain BLIP-2, its captune.json is provenance only
        return load_base(str(path), dtype)
    base_path = path / meta["base_model"]
    # A base stored inside the directory is named by its absolute path, so saving this model again finds it.
    base_name = str(base_path.resolve()) if base_path.is_dir() else meta["base_model"]
    base = load_base(base_name, dtype)
    image_size = meta.get("config", {}).get("model", {}).get("image_size")
    if image_size:  # trained at another size than its base's (model.image_size): the same interpolation again
        resize_images(base, image_size)
    if is_retrieval(base.model):
        processor: Any = RetrievalProcessor.from_pretrained(path)
    else:
        processor = Blip2Processor.from_pretrained(path)
        check_image_tokens(processor, base.model.config, str(path))
        _check_caption_end(base.model, meta.get(END_KEY), meta_file)
    if (path / TRAINED_FILE).is_file():
        load_saved_weights(base.model, path)
        return LoadedModel(base.model.eval(), processor, base_name)
    adapter = path / ADAPTER_FILE
    if not adapter.is_file():
        raise CaptuneError(f"{path}: no {ADAPTER_FILE} (nor {TRAINED_FILE}) beside {META_FILE}; copy the whole "
                           "model directory again from the run that saved it")  # fmt: skip
    read_weights(adapter)  # a file cut short or holding NaN is named here, not deep inside PEFT
    try:
        model = PeftModel.from_pretrained(base.model, path)
    except (RuntimeError, ValueError, KeyError) as err:
        first = str(err).strip().splitlines()[-1].strip()
        raise CaptuneError(
            f"{adapter} does not fit its base model {meta['base_model']!r} ({first}): its rank or "
            "layers differ from adapter_config.json's; copy both again from the same run"
        ) from None
    return LoadedModel(model.eval(), processor, base_name)


def _check_caption_end(model: Blip2Like, trained_end: int | None, meta_file: Path) -> None:
    """Refuses a model trained to end its captions with a token its generation does not stop at (its captions would
    run to max_new_tokens); directories saved before captune recorded the end are not checked."""
    stops = stop_token_ids(model)
    if trained_end is not None and trained_end not in stops:
        raise CaptuneError(
            f"{meta_file}: the model was trained to end captions with token {trained_end}, but its base model's "
            f"generation stops at {stops}: captions would not stop. Train it again on this base, or use the base "
            f"it was trained on"
        )


def load_saved_weights(model: torch.nn.Module, model_dir: Path) -> None:
    """Puts the weights a model directory saved (an adapter, or `trained.safetensors`) into a model of the same
    kind in place, as `apply_train_mode` made it: a PeftModel with the same adapter layers (PiSSA, OLoRA, AdaLoRA:
    from `TRAINABLE_FILE`, the weights as training held them), or the plain BLIP-2 a mode without LoRA trains."""
    if (model_dir / TRAINED_FILE).is_file():
        load_weights(model, read_weights(model_dir / TRAINED_FILE), model_dir / TRAINED_FILE)
    elif (model_dir / TRAINABLE_FILE).is_file():  # PiSSA, OLoRA, AdaLoRA: the weights as training holds them
        load_weights(model, read_weights(model_dir / TRAINABLE_FILE), model_dir / TRAINABLE_FILE)
    else:
        set_peft_model_state_dict(model, read_weights(model_dir / ADAPTER_FILE))


def load_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor], file: Path) -> None:
    """Copies weights saved by parameter name (read from `file`) into the model's parameters of those names.

    Raises:
        CaptuneError: a name the model lacks, or a shape other than the model's (weights of another base).
    """
    params = dict(model.named_parameters())
    unknown = sorted(set(weights) - set(params))
    if unknown:
        raise CaptuneError(f"{file}: weights the base model does not have ({', '.join(unknown[:3])} ...): it was "
                           "trained on another base; check base_model in captune.json")  # fmt: skip
    with torch.no_grad():
        for name, value in weights.items():
            if params[name].shape != value.shape:
                raise CaptuneError(f"{file}: {name} has shape {tuple(value.shape)}, the base model's "
                                   f"{tuple(params[name].shape)}: it was trained on another base")  # fmt: skip
            params[name].copy_(value)
