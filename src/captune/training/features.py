"""The cached image side: each train image's projected Q-Former output, computed once per run (or read back from
`train.feature_cache_dir`) when nothing upstream of the language model trains, and handed to `CaptionLoss` in place
of pixels (see captune.training.loss); with `task: retrieval`, each image's vision-encoder output while the ViT is
frozen, handed to `captune.retrieval.RetrievalLoss`."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import Blip2Processor

from captune.config import Config
from captune.data import freeze_inherited_objects
from captune.data.images import PixelFiles, PixelItem, rebatched, worker_share
from captune.errors import CaptuneError
from captune.files import atomic_open, cache_dir
from captune.model import BUILT_IN, LoadedModel, blip_of, embedding_of, evaluating
from captune.retrieval import is_retrieval
from captune.training.batches import CaptionPairs
from captune.training.loss import upstream_of_language_model_trains

log = logging.getLogger(__name__)


def use_feature_cache(config: Config, model: nn.Module) -> bool:
    """Whether image features can be computed once (nothing upstream of a decoder-only LM trains); says why not."""
    if config.train.cache_image_features == "off":
        log.info("training path: full (image features recomputed every step): train.cache_image_features=off")
        return False
    if is_retrieval(model):  # the vision encoder's outputs are cached: only the Q-Former side trains
        trains = [name for name, p in model.named_parameters() if p.requires_grad and name.startswith("vision_model.")]
        why = f"the vision encoder trains ({trains[0]}, ...)" if trains else ""
    else:
        trains = upstream_of_language_model_trains(model)
        why = f"parameters outside the language model train ({trains[0]}, ...)" if trains else ""
    if why and config.train.cache_image_features == "on":
        raise CaptuneError(f"train.cache_image_features=on, but {why}; use auto or off")
    if why:
        log.info("training path: full (image features recomputed every step): %s", why)
    elif is_retrieval(model):
        log.info("training path: cached vision-encoder outputs (the vision encoder is frozen)")
    else:
        log.info("training path: cached image features (nothing upstream of the language model trains)")
    return not why


def train_image_features(config: Config, loaded: LoadedModel, pairs: CaptionPairs, accelerator: Accelerator) -> Any:
    """Every train image's features, on the GPU when they take under a quarter of its free memory, else pinned CPU.

    With several processes each computes a contiguous 1/N of the images and the shards are all-gathered (in blocks,
    so the GPU never holds more than N blocks in transit): every rank ends with the whole cache, since its batches
    may hold any image.
    """
    device, world, rank = accelerator.device, accelerator.num_processes, accelerator.process_index
    keep_on = device
    if (
        device.type == "cuda"
        and len(pairs.paths) * feature_bytes(loaded.model) > torch.cuda.mem_get_info(device)[0] / 4
    ):
        keep_on = torch.device("cpu")
    paths = [Path(pairs.paths[i]) for i in range(len(pairs.paths))]
    file = _feature_file(config, loaded, paths)
    stored = _stored_features(file, len(paths), accelerator.is_main_process)
    if stored is not None:
        if keep_on.type == "cuda":
            return stored.to(keep_on)
        return stored.pin_memory() if device.type == "cuda" else stored
    share = math.ceil(len(paths) / world)
    mine = image_features(loaded.model, loaded.processor, paths[rank * share : (rank + 1) * share],
                          batch_size=config.train.feature_batch_size, num_workers=feature_workers(config),
                          device=device, keep_on=keep_on if world == 1 else device,
                          progress=accelerator.is_main_process)  # fmt: skip
    if world == 1:
        _keep_features(mine, file, accelerator.is_main_process)
        return mine
    out = torch.empty((len(paths), *mine.shape[1:]), dtype=mine.dtype, device=keep_on)
    block = max(1, min(share, config.train.feature_batch_size * 8))
    for start in range(0, share, block):
        piece = torch.zeros((block, *mine.shape[1:]), dtype=mine.dtype, device=device)
        rows = mine[start : start + block]
        piece[: len(rows)] = rows
        gathered = accelerator.gather(piece).view(world, block, *mine.shape[1:])  # rank r's rows of this block
        for r in range(world):
            first = r * share + start
            count = max(0, min(block, share - start, len(paths) - first))
            out[first : first + count] = gathered[r, :count].to(keep_on)
    _keep_features(out, file, accelerator.is_main_process)
    return out


def feature_workers(config: Config) -> int:
    """Workers of the feature pass: `data.feature_workers`, else the cores per local process (at least
    `data.num_workers`), or 0 when `data.num_workers` is 0 (decoding in the training process was asked for)."""
    if config.data.feature_workers is not None:
        return config.data.feature_workers
    if config.data.num_workers == 0:
        return 0
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(config.data.num_workers, (os.cpu_count() or 1) // local)


def _feature_file(config: Config, loaded: LoadedModel, paths: list[Path]) -> Path | None:
    """The file of `train.feature_cache_dir` for these features (None without one): named by a hash of what they
    depend on, the base model's weight files, the image side's config, the image processor, the dtype, and each train
    image's path, size and modification time."""
    if not config.train.feature_cache_dir:
        return None
    folder = config.train.feature_cache_dir
    root = cache_dir() / "features" if folder == "auto" else Path(folder).expanduser()
    side = ImageSide.of(loaded.model)
    digest = hashlib.sha256()
    what = {
        "version": 1,
        "weights": _weight_files(loaded.base_name, config.train.seed),
        "config": side.config,
        "image_processor": loaded.processor.image_processor.to_dict(),
        "dtype": str(side.dtype),
        "what": side.what,
    }
    digest.update(json.dumps(what, sort_keys=True, default=str).encode())
    for path in paths:
        stat = path.stat()
        digest.update(f"{path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return root / f"{digest.hexdigest()[:32]}.pt"


def _weight_files(name: str, seed: int) -> list[Any]:
    """What identifies a base model's weights: its weight and config files (name, size, modification time) for a
    directory or a hub id in the local cache (a snapshot folder, named by its commit); the seed for a built-in one."""
    if name in BUILT_IN:
        return [name, seed]
    folder = Path(name).expanduser()
    if not folder.is_dir():
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(name, "config.json")
        if not isinstance(found, str):
            return [name]  # not in the local cache: the name (and the files' sizes below: none) is all there is
        folder = Path(found).parent
    files = [f for f in sorted(folder.iterdir()) if f.suffix in (".safetensors", ".bin", ".json")]
    return [str(folder.resolve()), *[(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]]


def _stored_features(file: Path | None, images: int, main: bool) -> torch.Tensor | None:
    """The features kept in `file` by an earlier run, mapped from disk (read as they are used); None when there is
    no such file, or it cannot be read (then it is computed and written again, with a warning)."""
    if file is None or not file.is_file():
        return None
    try:
        stored = torch.load(file, mmap=True, weights_only=True)
        if not isinstance(stored, torch.Tensor) or len(stored) != images:
            raise ValueError(f"it holds {type(stored).__name__} {getattr(stored, 'shape', '')}, not {images} rows")
    except Exception as err:  # noqa: BLE001 - a damaged cache file costs a feature pass, never the run
        if main:
            log.warning("image features in %s cannot be read (%s); computing them again", file, err)
        return None
    if main:
        log.info("image features read from %s (same base model, image processor and train images)", file)
    return stored


def _keep_features(features: torch.Tensor, file: Path | None, main: bool) -> None:
    """Writes the features to `file` (rank 0, atomically); a failure (a full disk) only costs the next run the pass."""
    if file is None or not main:
        return
    try:
        with atomic_open(file, "wb") as out:
            torch.save(features.cpu(), out)
        log.info("image features kept in %s for later runs", file)
    except OSError as err:
        log.warning("image features could not be kept in %s (%s); the next run computes them again", file, err)


@dataclass(frozen=True)
class ImageSide:
    """What the feature pass computes for a model: a captioner's projected Q-Former output (query tokens x LM
    width, in the LM's dtype), or a retrieval model's vision-encoder output (patches + 1 x ViT width, in its dtype),
    whose Q-Former trains."""

    encode: Callable[[torch.Tensor], torch.Tensor]
    shape: tuple[int, ...]
    """One image's features."""
    dtype: torch.dtype
    input_dtype: torch.dtype
    module: nn.Module
    """What runs (switched to eval mode for the pass)."""
    config: dict[str, Any]
    """The configuration the features depend on (for the cache file's name)."""
    what: str

    @classmethod
    def of(cls, model: nn.Module) -> ImageSide:
        if is_retrieval(model):
            retrieval: Any = model
            vision = retrieval.vision_model
            vision_config = vision.config
            patches = (vision_config.image_size // vision_config.patch_size) ** 2 + 1
            dtype = retrieval.query_tokens.dtype
            return cls(lambda pixels: vision(pixel_values=pixels).last_hidden_state,
                       (patches, vision_config.hidden_size), dtype, dtype, vision, vision_config.to_dict(),
                       "vision_model.last_hidden_state")  # fmt: skip
        blip = blip_of(model)
        embeddings = embedding_of(blip)
        config = {k: v for k, v in blip.config.to_dict().items() if k != "text_config"}  # vision, Q-Former
        return cls(lambda pixels: blip.get_image_features(pixel_values=pixels, return_dict=True).pooler_output,
                   (blip.config.num_query_tokens, embeddings.embedding_dim), embeddings.weight.dtype,
                   blip.vision_model.dtype, blip, config, "projected Q-Former output")  # fmt: skip

    @property
    def bytes(self) -> int:
        """Bytes of one image's features."""
        return math.prod(self.shape) * self.dtype.itemsize


def feature_bytes(model: nn.Module) -> int:
    """Bytes of one image's cached features (`ImageSide`)."""
    return ImageSide.of(model).bytes


@torch.no_grad()
def image_features(
    model: nn.Module,
    processor: Blip2Processor,
    paths: Sequence[Path],
    *,
    batch_size: int,
    num_workers: int,
    device: torch.device,
    keep_on: torch.device,
    progress: bool = True,
) -> torch.Tensor:
    """Each image's features (`ImageSide`): a captioner's projected Q-Former output, (images, query tokens, LM
    width), or a retrieval model's vision-encoder output, (images, patches + 1, ViT width); in the model's dtype.

    Args:
        model: BLIP-2 (PEFT-wrapped or not) or a retrieval BLIP-2, on `device`, in eval or train mode (the image
            side has no dropout that matters: it is frozen, and this runs in eval mode).
        processor: Its processor; the image processor makes the pixels.
        paths: Image files, in the order of the returned rows.
        batch_size: Images per forward pass.
        num_workers: DataLoader worker processes decoding the images.
        device: Where the model runs.
        keep_on: Where the features are kept (the GPU when they fit, else pinned CPU memory).
        progress: Show a progress bar.
    """
    side = ImageSide.of(model)
    # A generator of its own: the loader's seed draw must not move the global RNG, or training after a computed pass
    # would differ from training after features read from train.feature_cache_dir.
    loader = DataLoader(PixelFiles(paths, processor.image_processor), batch_size=worker_share(batch_size, num_workers),
                        num_workers=num_workers, collate_fn=_stacked, pin_memory=device.type == "cuda",
                        worker_init_fn=freeze_inherited_objects, generator=torch.Generator())  # fmt: skip
    out = torch.empty((len(paths), *side.shape), dtype=side.dtype, device=keep_on,
                      pin_memory=keep_on.type == "cpu" and device.type == "cuda")  # fmt: skip
    row = 0
    shares = (pixels.to(device, non_blocking=True) for pixels in loader)  # from pinned memory, joined on the GPU
    batches = tqdm(rebatched(shares, batch_size, torch.cat), desc="image features", unit="batch", disable=not progress,
                   total=-(-len(paths) // batch_size))  # fmt: skip
    with evaluating(side.module):
        for pixels in batches:
            features = side.encode(pixels.to(dtype=side.input_dtype))
            out[row : row + len(features)] = features.to(side.dtype)
            row += len(features)
    return out


def _stacked(items: list[PixelItem]) -> torch.Tensor:
    """The pixels of images that were checked before training; one that cannot be read now stops the pass."""
    for _, _, error in items:
        if error is not None:
            raise CaptuneError(error)
    return torch.stack([pixels for _, pixels, _ in items if pixels is not None])
