"""What a run writes and reads back: model directories (best/, final/) and resumable checkpoints (weights, optimizer,
scheduler, per-rank RNG, loop state), each written whole or not at all; under FSDP through torch's state-dict API."""

from __future__ import annotations

import json
import logging
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate.utils import DistributedType
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from captune.config import save_config, to_dict
from captune.errors import CaptuneError
from captune.files import read_utf8, replace_dir, write_json
from captune.model import LoadedModel, trainable_weights
from captune.model_dir import load_weights, read_weights, save_model_dir, saved_config
from captune.peft_methods import adalora_state, is_adalora, load_adalora_state
from captune.training.state import Run, TrainState, results, stop_if_diverged
from captune.training_modes import TRAINABLE_FILE

log = logging.getLogger(__name__)


def save_model(run: Run, path: Path) -> None:
    """Adapter + processor + captune.json, written to a temporary directory and renamed into place (rank 0)."""
    accelerator = run.accelerator
    stop_if_diverged(run)
    accelerator.wait_for_everyone()
    trainable = _trainable_weights(run)
    if accelerator.is_main_process:
        tmp = path.with_name(f".tmp-{path.name}")
        shutil.rmtree(tmp, ignore_errors=True)
        unwrapped = LoadedModel(accelerator.unwrap_model(run.loaded.model), run.loaded.processor, run.loaded.base_name)
        metrics = run.state.history[-1]["metrics"] if run.state.history else None
        save_model_dir(tmp, unwrapped, run.config, run.base_dir, metrics, trainable)
        save_config(run.config, tmp / "config.yaml")
        if metrics is not None:
            write_json(tmp / "metrics.json", metrics)
        replace_dir(tmp, path)
    accelerator.wait_for_everyone()


def save_checkpoint(run: Run, name: str) -> Path:
    """A resumable checkpoint: the model directory plus trainable weights, optimizer, scheduler, per-rank RNG and the
    loop state. Everything goes into `.tmp-<name>` first and is renamed when complete, so a kill at any moment
    leaves the previous checkpoint whole."""
    accelerator, state = run.accelerator, run.state
    folder = run.output_dir / "checkpoints"
    path = folder / name
    tmp = folder / f".tmp-{name}"
    stop_if_diverged(run)  # a checkpoint never holds NaN: the one before the divergence stays the last
    accelerator.wait_for_everyone()
    model = accelerator.unwrap_model(run.loaded.model)
    # Collectives (under FSDP each rank holds a shard): every rank takes part, rank 0 ends with the whole tensors.
    trainable = _trainable_weights(run)
    optimizer_state = run.optimizer.state_dict()
    if _sharded(run):
        optimizer_state = get_optimizer_state_dict(model, _inner(run.optimizer), options=_FULL_ON_RANK0)
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        loaded = LoadedModel(model, run.loaded.processor, run.loaded.base_name)
        save_model_dir(tmp, loaded, run.config, run.base_dir, trainable=trainable)
        save_config(run.config, tmp / "config.yaml")
        save_file({k: v.contiguous() for k, v in trainable.items()}, str(tmp / TRAINABLE_FILE))
        states = {"optimizer": optimizer_state, "scheduler": run.scheduler.state_dict()}
        if is_adalora(model):  # its rank allocator's running scores decide the next masks
            states["adalora"] = adalora_state(model)
        torch.save(states, tmp / "optimizer.pt")
        write_json(tmp / "trainer_state.json", results(state) | {"global_step": state.global_step,
                   "epoch": state.epoch, "train_samples": state.train_samples})  # fmt: skip
    accelerator.wait_for_everyone()
    torch.save(_rng_state(), tmp / f"rng-{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        replace_dir(tmp, path)
        steps = sorted(p for p in folder.glob("step-*") if p.is_dir())
        for stale in steps[: max(len(steps) - run.config.train.keep_checkpoints, 0)]:
            shutil.rmtree(stale)
    accelerator.wait_for_everyone()
    return path


def resolve_checkpoint(value: str, output_dir: Path) -> Path:
    """A checkpoint directory, or `latest` for the newest one under output_dir/checkpoints."""
    if value == "latest":
        found = sorted((output_dir / "checkpoints").glob("step-*"))
        if not found:
            raise CaptuneError(f"resume_from=latest: no checkpoint in {output_dir / 'checkpoints'}")
        return found[-1]
    path = Path(value).expanduser()
    if not (path / "trainer_state.json").is_file():
        raise CaptuneError(f"resume_from={value}: not a checkpoint directory (no trainer_state.json)")
    return path


def load_checkpoint(run: Run, path: Path) -> None:
    """Restores weights, optimizer, scheduler, RNG and loop state saved by `save_checkpoint`."""
    # Read back as a Config, so keys added since the checkpoint was written take their defaults.
    saved = to_dict(saved_config(path))
    current = to_dict(run.config)
    keys = [("model", "name"), ("train", "mode"), ("train", "batch_size"), ("train", "grad_accum"),
            ("train", "seed"), ("train", "pack_captions")]  # fmt: skip
    changed = [f"{s}.{k}" for s, k in keys if saved[s][k] != current[s][k]]
    changed += ["lora"] if saved["lora"] != current["lora"] else []
    if changed:
        raise CaptuneError(f"resume_from={path}: the checkpoint was trained with different {', '.join(changed)}")
    model = run.accelerator.unwrap_model(run.loaded.model)
    weights = read_weights(path / TRAINABLE_FILE)
    trainable = set(trainable_weights(model))
    if set(weights) != trainable:
        differ = sorted(set(weights) ^ trainable)[:3]
        raise CaptuneError(f"{path / 'trainable.safetensors'} holds other weights than this run trains ({differ} "
                           "...): resume with the checkpoint's settings")  # fmt: skip
    states = _read_torch(path / "optimizer.pt")
    if not isinstance(states, dict) or not {"optimizer", "scheduler"} <= set(states):
        raise CaptuneError(f"{path / 'optimizer.pt'}: not the optimizer state captune saves; resume from another "
                           "checkpoint (train.resume_from=...)")  # fmt: skip
    try:
        if _sharded(run):  # every rank reads the whole tensors; each keeps its shard of them
            options = StateDictOptions(full_state_dict=True, strict=False)
            set_model_state_dict(model, dict(weights), options=options)
            set_optimizer_state_dict(model, _inner(run.optimizer), states["optimizer"], options=options)
        else:
            load_weights(model, weights, path / TRAINABLE_FILE)
            run.optimizer.load_state_dict(states["optimizer"])
        run.scheduler.load_state_dict(states["scheduler"])
        if is_adalora(model):
            load_adalora_state(model, states["adalora"])
    except (ValueError, KeyError, TypeError, RuntimeError) as err:
        raise CaptuneError(f"{path / 'optimizer.pt'}: does not fit this run's optimizer ({err}); resume from "
                           "another checkpoint") from None  # fmt: skip
    rng_file = path / f"rng-{run.accelerator.process_index}.pt"
    if not rng_file.is_file():
        raise CaptuneError(f"{rng_file} is missing: resume with as many processes as the checkpoint was saved with")
    try:
        _set_rng_state(_read_torch(rng_file))
    except (KeyError, TypeError, ValueError) as err:
        raise CaptuneError(f"{rng_file}: not the random state captune saves ({err}); resume from another "
                           "checkpoint") from None  # fmt: skip
    trainer_file = path / "trainer_state.json"
    try:
        trainer = json.loads(read_utf8(trainer_file))
        run.state = TrainState(trainer["global_step"], trainer["epoch"], trainer["best_cider"], trainer["best_step"],
                               trainer["history"], trainer.get("train_samples", 0))  # fmt: skip
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise CaptuneError(f"{trainer_file}: not the trainer state captune saves ({err!r}); resume from another "
                           "checkpoint") from None  # fmt: skip
    log.info("resumed from %s at step %d", path, run.state.global_step)


def _read_torch(file: Path) -> Any:
    """A file `torch.save` wrote in a checkpoint (optimizer, scheduler, RNG state).

    Raises:
        CaptuneError: it is missing, cut short or not such a file.
    """
    try:
        return torch.load(file, weights_only=False)
    except FileNotFoundError:
        raise CaptuneError(f"{file} is missing; resume from another checkpoint (train.resume_from=...)") from None
    except Exception as err:  # noqa: BLE001 - unpickling a damaged file raises anything: EOFError, UnpicklingError, ...
        raise CaptuneError(f"{file} cannot be read ({type(err).__name__}: {err}): the checkpoint is damaged; resume "
                           "from another one (train.resume_from=...)") from None  # fmt: skip


_FULL_ON_RANK0 = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
"""Whole tensors (gathered from the shards under FSDP), on rank 0's CPU; other ranks get an empty dict."""


def _trainable_weights(run: Run) -> dict[str, torch.Tensor]:
    """The trainable weights by parameter name, whole, on rank 0's CPU (a collective: every rank calls it)."""
    model = run.accelerator.unwrap_model(run.loaded.model)
    if not _sharded(run):  # whole already (and bitsandbytes' 8-bit layers keep state-dict entries, such as SCB,
        # that torch's state-dict API cannot follow: it is kept for FSDP)
        return trainable_weights(model)
    weights = get_model_state_dict(model, options=_FULL_ON_RANK0)
    # A frozen weight tied to another (OPT's lm_head) is not a parameter of its own, so the filter above keeps it.
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    return {name: value for name, value in weights.items() if isinstance(value, torch.Tensor) and name in trainable}


def _sharded(run: Run) -> bool:
    """Whether FSDP shards the weights (then saving and loading go through torch.distributed.checkpoint)."""
    return run.accelerator.distributed_type == DistributedType.FSDP


def _inner(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The torch optimizer inside accelerate's wrapper."""
    return getattr(optimizer, "optimizer", optimizer)


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
