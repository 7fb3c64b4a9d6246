"""Compiled code kept on disk for every later process: torch's compile caches in captune's cache directory, and a
record of which batch sizes of which model have been compiled on this machine (the static loops' warm-up is then
mostly cache reads, which `captune.generation.choice` counts on).

torch keeps Inductor's FX-graph, AOTAutograd and autotuning caches in $TORCHINDUCTOR_CACHE_DIR, by default a folder
of /tmp that a reboot or a tmp cleaner empties; captune points it at `cache_dir()/inductor` unless the user chose one.
The caches are keyed by torch itself (graph, shapes, versions, GPU), so a stale entry is never used; the record here
only says what to expect, and is keyed by the model's config, dtype, beams, the library versions and the GPU.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
import transformers

from captune.config import GenerateConfig
from captune.files import cache_dir
from captune.model import Blip2Like, blip_of

_RECORDS = "compiled-v1"


def use_compile_cache() -> Path | None:
    """Points torch's compile caches at captune's cache directory (kept if $TORCHINDUCTOR_CACHE_DIR is set); None
    when that directory cannot be made (torch's default then stays)."""
    chosen = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if chosen:
        return Path(chosen)
    path = cache_dir() / "inductor"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)
    return path


def compiled_batches(model: Blip2Like, options: GenerateConfig) -> frozenset[int]:
    """The batch sizes at which the static loops have compiled this model with these beams on this machine."""
    record = _record_path(model, options)
    try:
        return frozenset(int(batch) for batch in json.loads(record.read_text())["batches"])
    except (OSError, ValueError, KeyError, TypeError):
        return frozenset()


def record_compiled(model: Blip2Like, options: GenerateConfig, batch_size: int) -> None:
    """Notes that the static loops compiled this model at `batch_size` (a record that cannot be written is skipped:
    the next run then only expects a longer warm-up)."""
    record = _record_path(model, options)
    batches = sorted(compiled_batches(model, options) | {batch_size})
    try:
        record.parent.mkdir(parents=True, exist_ok=True)
        temporary = record.with_suffix(f".{os.getpid()}.tmp")
        temporary.write_text(json.dumps({"batches": batches}))
        temporary.replace(record)
    except OSError:
        pass


def _record_path(model: Blip2Like, options: GenerateConfig) -> Path:
    parameter = next(model.parameters())
    device = parameter.device
    key = {
        "config": blip_of(model).config.to_dict(),
        "dtype": str(parameter.dtype),
        "num_beams": options.num_beams,
        "max_new_tokens": options.max_new_tokens,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:24]
    return cache_dir() / _RECORDS / f"{digest}.json"
