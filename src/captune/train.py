"""THE training recipe: setup -> fit -> validate -> save, on accelerate.

Runs unchanged on one CPU, one GPU or under `accelerate launch` with several processes: accelerate shards the batches,
averages gradients and decides who writes (rank 0 writes files and logs; every rank saves its own RNG state).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import random
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedType, gather_object, set_seed
from safetensors.torch import save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm
from transformers import Blip2Processor, get_cosine_schedule_with_warmup

from captune import data as datasets
from captune.config import Config, save_config, to_dict
from captune.data import CaptionSet, Record
from captune.data.images import processed_pixels
from captune.errors import CaptuneError, TrainingDiverged
from captune.evaluation import predict_records, references_of, write_references
from captune.files import atomic_open, cache_dir, check_writable, read_utf8, replace_dir, write_atomically
from captune.metrics import FAST_METRICS, METRIC_NAMES, score_captions
from captune.model import (
    BUILT_IN,
    LoadedModel,
    apply_train_mode,
    attention_kernels,
    blip_of,
    caption_end_id,
    load_base,
    load_saved_weights,
    load_weights,
    read_weights,
    resolve_device,
    resolve_dtype,
    save_base,
    save_model_dir,
    saved_config,
    trainable_summary,
    trainable_weights,
)
from captune.step import (
    IGNORE,
    PACKING_ATTENTION,
    CaptionLoss,
    feature_bytes,
    image_features,
    label_tokens,
    upstream_of_language_model_trains,
)

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------------- data ---
class CaptionPairs(Dataset):
    """Every (image, caption) pair of a split; images are decoded lazily, in DataLoader workers when there are any.

    Paths and captions are kept as UTF-8 bytes in flat numpy arrays, not as Python objects: a forked worker that
    reads a Python string writes its reference count, and the page it sits on is copied, so over an epoch each
    worker would grow by a copy of every caption (~100 MB per worker for COCO). Reading a numpy array writes nothing.

    With `with_pixels=False` (image features cached, see captune.step) an item carries its image's index in
    `records` instead of pixels, and no image is decoded.
    """

    def __init__(self, records: list[Record], processor: Blip2Processor, with_pixels: bool = True):
        self.paths = _Texts([str(r.image_path) for r in records])
        self.captions = _Texts([caption for r in records for caption in r.captions])
        counts = [len(r.captions) for r in records]
        self.image_of = np.repeat(np.arange(len(records), dtype=np.int64), counts)
        self.first_caption = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])  # image i: [i] to [i + 1]
        self.image_processor = processor.image_processor
        self.with_pixels = with_pixels

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image_index = int(self.image_of[index])
        if not self.with_pixels:
            return {"image_index": image_index, "caption": self.captions[index]}
        return {"pixel_values": self.pixels(image_index), "caption": self.captions[index]}

    def caption_lengths(self) -> np.ndarray:
        """Each caption's length in UTF-8 bytes: a cheap stand-in for its token count when grouping by length."""
        return np.diff(self.captions.ends, prepend=0)

    def pixels(self, image_index: int) -> torch.Tensor:
        return processed_pixels(Path(self.paths[image_index]), self.image_processor)


class ImageCaptions(Dataset):
    """The same pairs by image: item i is image i (pixels, or its index when features are cached) with all its
    captions, for `PackedCaptionCollator`."""

    def __init__(self, pairs: CaptionPairs) -> None:
        self.pairs = pairs

    def __len__(self) -> int:
        return len(self.pairs.first_caption) - 1

    def __getitem__(self, index: int) -> dict[str, Any]:
        first, end = int(self.pairs.first_caption[index]), int(self.pairs.first_caption[index + 1])
        captions = [self.pairs.captions[i] for i in range(first, end)]
        if not self.pairs.with_pixels:
            return {"image_index": index, "captions": captions}
        return {"pixel_values": self.pairs.pixels(index), "captions": captions}

    def caption_lengths(self) -> np.ndarray:
        """Each image's captions' total length in UTF-8 bytes, for grouping images by length."""
        return np.add.reduceat(self.pairs.caption_lengths(), self.pairs.first_caption[:-1])

    def images_per_batch(self, captions_per_batch: int) -> int:
        """How many images make a batch of about `captions_per_batch` captions (at least one)."""
        return max(1, round(captions_per_batch * len(self) / len(self.pairs)))


class _Texts:
    """A list of strings stored as one UTF-8 byte array and offsets."""

    def __init__(self, texts: list[str]) -> None:
        encoded = [text.encode() for text in texts]
        self.ends = np.cumsum([len(e) for e in encoded], dtype=np.int64)
        self.data = np.frombuffer(b"".join(encoded), dtype=np.uint8)

    def __len__(self) -> int:
        return len(self.ends)

    def __getitem__(self, index: int) -> str:
        start = int(self.ends[index - 1]) if index > 0 else 0
        return self.data[start : int(self.ends[index])].tobytes().decode()


@dataclass
class CaptionCollator:
    """Builds the model's inputs and labels for a batch of captions.

    Decoder-only language models (OPT) read one sequence, `[<image>] * num_query_tokens + BOS + prompt + caption +
    END`, right-padded; labels equal input_ids except image placeholders, BOS, prompt tokens and padding, which are
    -100. Encoder-decoder models (T5, `encoder_decoder=True`) read `[<image>] * num_query_tokens + prompt + EOS` in
    the encoder, and the labels are the caption + END, right-padded with -100; the model shifts them into decoder
    inputs. Either way END, the token generation stops at (`end_token_id`, see captune.model.caption_end_id: 50118,
    "\\n", for blip2-opt), follows each caption as a label, so the model learns to stop where generation looks for it.
    `for_model` makes one for a model.
    """

    processor: Blip2Processor
    prompt: str = ""
    max_caption_tokens: int = 40
    encoder_decoder: bool = False
    end_token_id: int = field(kw_only=True)

    @classmethod
    def for_model(
        cls, model: nn.Module, processor: Blip2Processor, prompt: str = "", max_caption_tokens: int = 40
    ) -> CaptionCollator:
        """The collator for `model`'s language model (decoder-only or encoder-decoder) and the end it stops at."""
        encoder_decoder = not blip_of(model).config.use_decoder_only_language_model
        end = caption_end_id(model, processor.tokenizer)
        return cls(processor, prompt, max_caption_tokens, encoder_decoder, end_token_id=end)

    def __post_init__(self) -> None:
        tokenizer = self.processor.tokenizer
        self.num_query_tokens = int(self.processor.num_query_tokens)
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.processor.image_token.content)
        self.prefix = [self.image_token_id] * self.num_query_tokens + tokenizer(self.prompt).input_ids

    def caption_ids(self, texts: list[str]) -> list[list[int]]:
        """Each caption's token ids (its whitespace collapsed: blip2-opt's END is "\\n"), cut to max_caption_tokens,
        then END."""
        tokenizer = self.processor.tokenizer
        # A prompt joins the caption with a space, so BPE tokenizers see the caption's first word as a new word.
        space = "" if self.encoder_decoder or not self.prompt else " "
        texts = [space + " ".join(text.split()) for text in texts]
        captions = [ids[: self.max_caption_tokens] + [self.end_token_id]
                    for ids in tokenizer(texts, add_special_tokens=False).input_ids]  # fmt: skip
        for text, ids in zip(texts, captions, strict=True):
            for token, what in ((self.image_token_id, "the image token"), (self.end_token_id, "the end token")):
                if token in ids[:-1]:
                    raise CaptuneError(f"caption {text.strip()!r} holds {what} {tokenizer.decode([token])!r} (id "
                                       f"{token}); it must not appear inside captions")  # fmt: skip
        if self.prefix.count(self.image_token_id) != self.num_query_tokens:
            raise CaptuneError(
                f"prompt {self.prompt!r} holds the image token {self.processor.image_token.content}; it must not "
                "appear in the prompt"
            )
        return captions

    @staticmethod
    def images(batch: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if "pixel_values" in batch[0]:
            return {"pixel_values": torch.stack([item["pixel_values"] for item in batch])}
        return {"image_index": torch.tensor([item["image_index"] for item in batch])}

    def __call__(self, batch: list[dict[str, Any]]) -> dict[str, Any]:
        tokenizer = self.processor.tokenizer
        captions = self.caption_ids([item["caption"] for item in batch])
        if self.encoder_decoder:
            input_ids = torch.tensor([self.prefix] * len(batch))
            attention_mask = torch.ones_like(input_ids)
            labels = _padded(captions, IGNORE)
        else:
            input_ids = _padded([self.prefix + ids for ids in captions], tokenizer.pad_token_id)
            attention_mask = _padded([[1] * (len(self.prefix) + len(ids)) for ids in captions], 0)
            labels = _padded([[IGNORE] * len(self.prefix) + ids for ids in captions], IGNORE)
        return {
            **self.images(batch),
            "caption_start": 0 if self.encoder_decoder else len(self.prefix),  # labels' first caption column
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
        }


class PackedCaptionCollator(CaptionCollator):
    """Builds a batch of whole images (`ImageCaptions` items), one row per image, so that an image's captions share
    the work of its image tokens and prompt.

    Decoder-only language models: a row is `[<image>] * num_query_tokens + BOS + prompt`, then each caption + EOS in
    turn, right-padded. `attention_mask` (rows, 1, length, length) lets the prefix attend causally to itself and
    each caption token to the prefix and to its own caption's earlier tokens (padding only to itself); `position_ids`
    restart after the prefix for each caption, so every caption token has the position, and sees the tokens, that it
    has in a row of its own. `labels` are the caption tokens, flat, and `predict_from` the flat (row x length) index
    of the hidden state that predicts each: the prefix's last position for a caption's first token, else the token
    before. Encoder-decoder models (T5): `input_ids` hold one `[<image>] * num_query_tokens + prompt + EOS` per image,
    `labels` one caption + EOS per row and `caption_image` the image row each caption belongs to.
    """

    def __call__(self, batch: list[dict[str, Any]]) -> dict[str, Any]:
        per_image = [self.caption_ids(item["captions"]) for item in batch]
        samples = sum(map(len, per_image))
        if self.encoder_decoder:
            input_ids = torch.tensor([self.prefix] * len(batch))
            return {
                **self.images(batch),
                "samples": samples,
                "input_ids": input_ids,
                "attention_mask": torch.ones_like(input_ids),
                "labels": _padded([ids for captions in per_image for ids in captions], IGNORE),
                "caption_image": torch.tensor([i for i, captions in enumerate(per_image) for _ in captions]),
            }
        start = len(self.prefix)
        length = max(start + sum(map(len, captions)) for captions in per_image)
        input_ids = torch.full((len(batch), length), self.processor.tokenizer.pad_token_id, dtype=torch.long)
        position_ids = torch.zeros((len(batch), length), dtype=torch.long)
        segment = torch.full((len(batch), length), -1, dtype=torch.long)  # 0 prefix, j caption j, -1 padding
        input_ids[:, :start] = torch.tensor(self.prefix)
        position_ids[:, :start] = torch.arange(start)
        segment[:, :start] = 0
        predict_from, labels = [], []
        for row, captions in enumerate(per_image):
            at = start
            for j, ids in enumerate(captions, start=1):
                n = len(ids)
                input_ids[row, at : at + n] = torch.tensor(ids)
                position_ids[row, at : at + n] = torch.arange(start, start + n)
                segment[row, at : at + n] = j
                base = row * length
                predict_from += [base + start - 1, *range(base + at, base + at + n - 1)]
                labels += ids
                at += n
        query, key = segment[:, :, None], segment[:, None, :]
        causal = torch.ones((length, length), dtype=torch.bool).tril()
        allowed = causal & ((key == 0) | (key == query))
        allowed = torch.where(query >= 0, allowed, torch.eye(length, dtype=torch.bool))
        return {
            **self.images(batch),
            "samples": samples,
            "input_ids": input_ids,
            "attention_mask": allowed.unsqueeze(1),
            "position_ids": position_ids,
            "predict_from": torch.tensor(predict_from),
            "labels": torch.tensor(labels),
        }


def _padded(rows: list[list[int]], value: int) -> torch.Tensor:
    """Rows of different lengths as one tensor, right-padded with value."""
    out = torch.full((len(rows), max(map(len, rows))), value, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row)
    return out


class EpochShuffle(Sampler[int]):
    """A permutation seeded by (seed, epoch): the order of an epoch never depends on the global RNG, so a resumed run
    sees the same batches as an uninterrupted one."""

    def __init__(self, size: int, seed: int):
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def _generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)

    def __iter__(self) -> Iterator[int]:
        return iter(torch.randperm(self.size, generator=self._generator()).tolist())


class LengthGroupedShuffle(EpochShuffle):
    """EpochShuffle, then within each group of batches the samples sorted by length and cut into batches, and the
    batches shuffled: batches hold captions of similar length (little padding) and still come in random order.

    A group is 50 batches, or fewer on small sets so that an epoch has at least 4 groups (as transformers'
    LengthGroupedSampler does). Grouping makes a batch's captions less varied: on a few templated captions (the
    demo) that slows learning, so the demo config turns it off.

    With several processes (`processes`), batches move in runs of that many neighbours of one sorted group: accelerate
    gives one step's consecutive batches to the processes, so they hold captions of similar length and none waits at
    the gradient all-reduce for another's longer batch."""

    GROUP_BATCHES = 50

    def __init__(self, lengths: np.ndarray, batch_size: int, seed: int, processes: int = 1):
        super().__init__(len(lengths), seed)
        self.lengths, self.batch_size, self.processes = lengths, batch_size, processes

    def __iter__(self) -> Iterator[int]:
        generator = self._generator()
        order = torch.randperm(self.size, generator=generator).numpy()
        per_group = max(1, min(self.GROUP_BATCHES, self.size // (self.batch_size * 4)))
        group = self.batch_size * math.ceil(per_group / self.processes) * self.processes
        runs, rest = [], []
        for start in range(0, self.size, group):
            members = order[start : start + group]
            members = members[np.argsort(-self.lengths[members], kind="stable")]
            batches = [members[i : i + self.batch_size] for i in range(0, len(members), self.batch_size)]
            full = [b for b in batches if len(b) == self.batch_size]
            cut = len(full) - len(full) % self.processes
            runs += [full[i : i + self.processes] for i in range(0, cut, self.processes)]
            rest += full[cut:] + [b for b in batches if len(b) < self.batch_size]
        # Runs of full batches in random order; what is left (at most the last group's) comes last, short batch last.
        shuffled = [batch for i in torch.randperm(len(runs), generator=generator).tolist() for batch in runs[i]]
        rest.sort(key=len, reverse=True)
        return iter(np.concatenate(shuffled + rest).tolist() if shuffled or rest else [])


def training_loader(
    items: Dataset, sampler: Sampler[int], collate: CaptionCollator, config: Config, batch_size: int, pin_memory: bool
) -> DataLoader:
    """The training DataLoader: `data.num_workers` persistent worker processes decoding images, each at most
    `data.prefetch_factor` batches ahead, their garbage collector kept off the inherited heap."""
    workers = config.data.num_workers
    return DataLoader(
        items,
        batch_size=batch_size,
        sampler=sampler,
        collate_fn=collate,
        num_workers=workers,
        prefetch_factor=config.data.prefetch_factor if workers else None,
        persistent_workers=workers > 0,  # forked once, not at every epoch
        worker_init_fn=datasets.freeze_inherited_objects,
        generator=torch.Generator().manual_seed(config.train.seed),
        pin_memory=pin_memory,
    )


def load_training_data(config: Config, main: bool) -> CaptionSet:
    """Reads the dataset, decodes every image once, and refuses to go on over problems unless told to skip them."""
    with PartialState().main_process_first():  # the synthetic set is generated once, by rank 0
        captions = datasets.read(config.data.format, config.data.data_dir, datasets.read_options(config.data))
    captions = datasets.check_images(captions, progress=main)
    if captions.problems:
        listing = "\n".join(f"  {p.image}: {p.problem}" for p in captions.problems[:10])
        more = f"\n  ... and {len(captions.problems) - 10} more" if len(captions.problems) > 10 else ""
        if not config.data.skip_bad_images:
            raise CaptuneError(
                f"{config.data.data_dir}: {len(captions.problems)} problem(s) in the dataset:\n{listing}{more}\n"
                "Fix them, or pass --skip-bad-images (data.skip_bad_images=true) to train on the "
                f"{len(captions.records)} usable images; `captune data check` writes the full list."
            )
        if main:
            log.warning("skipping %d unusable image(s) (%d problem(s) in the data):\n%s%s", captions.left_out(),
                        len(captions.problems), listing, more)  # fmt: skip
    for note in captions.notes:
        log.info("data: %s", note)
    if not captions.split("train"):
        raise CaptuneError(f"{config.data.data_dir}: the train split has no usable images")
    return captions


# ----------------------------------------------------------------------------------------------------- training ---
@dataclass
class TrainState:
    """What a checkpoint needs besides weights and optimizer to continue exactly."""

    global_step: int = 0
    epoch: int = 0
    best_cider: float | None = None
    best_step: int | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    train_samples: int = 0
    """Samples trained on over every segment of the run (a resumed run continues the count)."""


@dataclass
class Throughput:
    """Samples per second of training alone: time spent validating and checkpointing is left out."""

    samples: int = 0
    seconds: float = 0.0
    window_samples: int = 0
    window_seconds: float = 0.0
    window_wait: float = 0.0
    """Of window_seconds, the time the loop waited for the loader (a data-starved GPU shows here)."""
    since: float = field(default_factory=time.perf_counter)
    epochs: list[float] = field(default_factory=list)
    """Samples per second of each finished epoch (the first pays for start-up: compare later ones)."""
    _epoch_start: tuple[int, float] = (0, 0.0)

    def add(self, samples: int) -> None:
        """Counts a batch and the time since the previous one."""
        now = time.perf_counter()
        elapsed, self.since = now - self.since, now
        self.samples, self.seconds = self.samples + samples, self.seconds + elapsed
        self.window_samples, self.window_seconds = self.window_samples + samples, self.window_seconds + elapsed

    def fetched(self) -> None:
        """Marks a batch's arrival: the time since the previous batch was queued was spent waiting for the loader."""
        self.window_wait += time.perf_counter() - self.since

    def window_rate(self) -> float:
        return self.window_samples / max(self.window_seconds, 1e-9)

    def window_wait_fraction(self) -> float:
        return min(1.0, self.window_wait / max(self.window_seconds, 1e-9))

    def new_window(self) -> None:
        self.window_samples, self.window_seconds, self.window_wait = 0, 0.0, 0.0

    def skip(self) -> None:
        """Leaves the time since the last batch (a validation, a checkpoint) out of the count."""
        self.since = time.perf_counter()

    def end_epoch(self) -> None:
        samples, seconds = self.samples - self._epoch_start[0], self.seconds - self._epoch_start[1]
        self.epochs.append(samples / max(seconds, 1e-9))
        self._epoch_start = (self.samples, self.seconds)


@dataclass
class Run:
    """Everything the loop touches, built by `setup`."""

    config: Config
    accelerator: Accelerator
    loaded: LoadedModel
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    loader: DataLoader
    sampler: EpochShuffle
    step: nn.Module
    """The training forward (`CaptionLoss` around the model), as accelerate prepared it."""
    features: torch.Tensor | None
    """Cached image features of the train images (row = image index), or None for the full path."""
    val_records: list[Record]
    output_dir: Path
    base_dir: Path | None
    steps_per_epoch: int
    total_steps: int
    feature_pass_seconds: float = 0.0
    state: TrainState = field(default_factory=TrainState)
    first_nonfinite: torch.Tensor | None = None
    """On the device: the first optimizer step whose loss or gradient norm was NaN or inf, else `NO_STEP`."""


NO_STEP = 2**62


def setup(config: Config) -> Run:
    """Accelerator, data, model with LoRA, optimizer and schedule; resumes when asked."""
    # 1. The accelerator decides device and precision; bf16 on GPUs that have it, fp32 on CPU.
    dtype = resolve_dtype(config.model.dtype, resolve_device("auto"))
    # bf16 weights train in bf16 throughout, as the usual PEFT recipe does (LoRA weights stay float32): autocast on
    # top would only run layer norms and softmaxes in float32, slower and with more activation memory. fp16 weights
    # need autocast's loss scaling.
    precision = "fp16" if dtype == torch.float16 else "no"
    output_dir = Path(config.train.output_dir).expanduser()
    accelerator = Accelerator(
        gradient_accumulation_steps=config.train.grad_accum,
        mixed_precision=precision,
        log_with="tensorboard",
        project_dir=str(output_dir),
    )
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:
        raise CaptuneError(
            f"launched as {launched} processes, but accelerate runs {accelerator.num_processes}: each would train "
            "alone into the same folder. Without GPUs set ACCELERATE_USE_CPU=true (or use `accelerate launch --cpu`)"
        )
    if accelerator.distributed_type == DistributedType.FSDP and config.train.validate:
        raise CaptuneError(
            "train.validate=true under FSDP: generating captions with sharded weights is not supported yet. Set "
            "train.validate=false and score the saved adapter with `captune eval --model-dir RUN/final` (one GPU)"
        )
    set_seed(config.train.seed)
    main = accelerator.is_main_process
    if main:  # a folder that cannot be written fails now, not after the data and the model are loaded
        check_writable(output_dir, "train.output_dir")
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()  # results.json reports this run's peak, not an earlier one's

    # 2. Data first: a bad dataset should fail before minutes of model loading.
    captions = load_training_data(config, main)
    val_records = captions.split("val")[: config.train.val_max_images]

    # 3. The base model, then LoRA on the configured layers only.
    loaded = load_base(config.model.name, dtype, config.train.seed, config.model.quantization)
    base_dir = None
    if loaded.base_name in BUILT_IN:
        # A built-in base is random: keep its weights so every saved model directory can be reloaded on its own.
        base_dir = output_dir / "base-model"
        if main:
            save_base(base_dir, loaded)
    # A quantised model is not passed through PEFT's prepare_model_for_kbit_training: it casts every bf16 weight to
    # float32, the frozen ViT and Q-Former too (1.1 B parameters: +2.2 GB for blip2-opt-2.7b), and its input-gradient
    # hook serves only reentrant checkpointing, which captune does not use. Training stays bf16 as for unquantised
    # models (bf16 is also the 4-bit compute dtype); the loss is float32 either way.
    if config.train.gradient_checkpointing:
        blip_of(loaded.model).language_model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False}
        )
    loaded.model = apply_train_mode(loaded.model, config)
    if main:
        log.info("model %s: %s", config.model.name, trainable_summary(loaded.model))

    # 4. Loader: every caption is a sample, batched by caption or (packed) by image; the sampler's order depends
    # only on (seed, epoch).
    cached = _use_feature_cache(config, loaded.model)
    pairs = CaptionPairs(captions.split("train"), loaded.processor, with_pixels=not cached)
    items: CaptionPairs | ImageCaptions = pairs
    collator, batch_size = CaptionCollator, config.train.batch_size
    if _use_packing(config, loaded.model):
        items, collator = ImageCaptions(pairs), PackedCaptionCollator
        batch_size = items.images_per_batch(config.train.batch_size)
        if main:
            log.info("batches: %d whole images (~%d captions), each image's captions sharing its image tokens "
                     "and prompt (train.pack_captions)", batch_size,
                     round(batch_size * len(pairs) / len(items)))  # fmt: skip
    sampler: EpochShuffle = (
        LengthGroupedShuffle(items.caption_lengths(), batch_size, config.train.seed, accelerator.num_processes)
        if config.train.group_by_length
        else EpochShuffle(len(items), config.train.seed)
    )
    collate = collator.for_model(loaded.model, loaded.processor, config.data.prompt, config.data.max_caption_tokens)
    tokenizer = loaded.processor.tokenizer
    if main and collate.end_token_id != tokenizer.eos_token_id:
        log.info("captions end with token %d (%r), where generation stops (the language model's generation "
                 "config), not with the tokenizer's EOS %s", collate.end_token_id,
                 tokenizer.decode([collate.end_token_id]), tokenizer.eos_token_id)  # fmt: skip
    loader = training_loader(items, sampler, collate, config, batch_size, accelerator.device.type == "cuda")
    params = [p for p in loaded.model.parameters() if p.requires_grad]
    fused = config.train.fused_optimizer and accelerator.device.type == "cuda"
    optimizer = torch.optim.AdamW(params, lr=config.train.lr, weight_decay=config.train.weight_decay, fused=fused)
    if config.train.compile:
        _compile_decoder_layers(loaded.model)
    # The feature pass runs before accelerate prepares the model: under FSDP the weights are sharded after that, and
    # only the training forward gathers them. A quantised model is already on its GPU.
    features, feature_seconds = None, 0.0
    if cached:
        if config.model.quantization == "none":
            loaded.model.to(accelerator.device)
        start = time.perf_counter()
        with attention_kernels(config.model.cudnn_attention):
            features = _train_image_features(config, loaded, pairs, accelerator)
        feature_seconds = time.perf_counter() - start
        if main:
            log.info("image features of %d train images ready in %.1f s, kept on %s", len(features),
                     feature_seconds, features.device)  # fmt: skip
    # accelerate prepares the training forward (DDP must see it); loaded.model stays the model it holds (under FSDP
    # sharded in place).
    step, optimizer, loader = accelerator.prepare(
        CaptionLoss(loaded.model, config.train.caption_logits_only), optimizer, loader
    )

    # 5. Schedule in optimizer steps; not handed to accelerate, which would step it once per process.
    steps_per_epoch = math.ceil(len(loader) / config.train.grad_accum)
    total_steps = config.train.max_steps or steps_per_epoch * config.train.epochs
    scheduler = get_cosine_schedule_with_warmup(optimizer, min(config.train.warmup_steps, total_steps), total_steps)
    run = Run(
        config, accelerator, loaded, optimizer, scheduler, loader, sampler, step, features, val_records, output_dir,
        base_dir, steps_per_epoch, total_steps, feature_seconds,
    )  # fmt: skip
    if config.train.resume_from:
        load_checkpoint(run, resolve_checkpoint(config.train.resume_from, output_dir))
    return run


def _use_feature_cache(config: Config, model: nn.Module) -> bool:
    """Whether image features can be computed once (nothing upstream of a decoder-only LM trains); says why not."""
    if config.train.cache_image_features == "off":
        log.info("training path: full (image features recomputed every step): train.cache_image_features=off")
        return False
    trains = upstream_of_language_model_trains(model)
    why = f"parameters outside the language model train ({trains[0]}, ...)" if trains else ""
    if why and config.train.cache_image_features == "on":
        raise CaptuneError(f"train.cache_image_features=on, but {why}; use auto or off")
    if why:
        log.info("training path: full (image features recomputed every step): %s", why)
    else:
        log.info("training path: cached image features (nothing upstream of the language model trains)")
    return not why


def _use_packing(config: Config, model: nn.Module) -> bool:
    """Whether batches hold whole images with their captions packed (train.pack_captions); says why not."""
    if not config.train.pack_captions:
        return False
    lm = blip_of(model).language_model
    implementation = lm.config._attn_implementation
    if lm.config.is_encoder_decoder or implementation in PACKING_ATTENTION:
        return True
    log.warning("train.pack_captions: %s attention takes no block mask; one row per caption instead", implementation)
    return False


def _train_image_features(config: Config, loaded: LoadedModel, pairs: CaptionPairs, accelerator: Accelerator) -> Any:
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
    blip = blip_of(loaded.model)
    digest = hashlib.sha256()
    what = {
        "version": 1,
        "weights": _weight_files(loaded.base_name, config.train.seed),
        "config": {k: v for k, v in blip.config.to_dict().items() if k != "text_config"},  # vision, Q-Former
        "image_processor": loaded.processor.image_processor.to_dict(),
        "dtype": str(blip.get_input_embeddings().weight.dtype),
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


def _compile_decoder_layers(model: nn.Module) -> None:
    """torch.compile each decoder layer of the language model in place (dynamic shapes: lengths vary by batch)."""
    lm = blip_of(model).language_model.base_model
    layers = getattr(getattr(lm, "decoder", lm), "layers", None)
    if layers is None:
        raise CaptuneError(f"train.compile: no decoder layers found in {type(lm).__name__}; set train.compile=false")
    for layer in layers:
        layer.compile(dynamic=True)


def fit(run: Run) -> TrainState:
    """The loop: epochs of accumulated steps, a checkpoint every `save_every` steps and at each epoch end, validation
    at each epoch end, best/ by CIDEr, final/ at the end. Forward and backward run under one choice of attention
    kernels (`model.cudnn_attention`; validation's generation makes its own)."""
    with attention_kernels(run.config.model.cudnn_attention):
        return _fit(run)


def _fit(run: Run) -> TrainState:
    config, accelerator, state = run.config, run.accelerator, run.state
    main = accelerator.is_main_process
    if main:
        run.output_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, run.output_dir / "config.yaml")
        if run.val_records:
            write_references(run.output_dir / "val" / "references.json", run.val_records)
    accelerator.init_trackers("tensorboard", config=_flat_hparams(config))
    # A terminal gets a live bar; a log file (CI, nohup) gets a line every 30 s instead of thousands of redraws.
    interval = 0.5 if sys.stderr.isatty() else 30.0
    bar = tqdm(total=run.total_steps, initial=state.global_step, disable=not main, desc="train", unit="step",
               mininterval=interval)  # fmt: skip
    model = run.step
    model.train()
    setup_peak = None
    if torch.cuda.is_available():
        # Training's own peak from here on: loading (under FSDP the whole model is on each GPU until it is sharded)
        # and the feature pass are reported apart.
        setup_peak = torch.cuda.max_memory_allocated() / 2**30
        torch.cuda.reset_peak_memory_stats()
    speed = Throughput()
    run.first_nonfinite = torch.full((), NO_STEP, dtype=torch.long, device=accelerator.device)
    with bar:  # closed on an error too, so the message starts a line of its own
        while state.global_step < run.total_steps:
            # 1. Continue mid-epoch after a resume by skipping the batches the checkpoint had already seen.
            # accelerate's loader sets its sampler's epoch to its own count at every pass: set that count, so each epoch
            # (also one a resume starts in) gets the order (seed, epoch) gives.
            run.loader.set_epoch(state.epoch)  # type: ignore[attr-defined]  # accelerate's DataLoaderShard
            done_in_epoch = state.global_step - state.epoch * run.steps_per_epoch
            loader = run.loader
            if done_in_epoch:  # a new DataLoader (new worker processes): only for the epoch a resume starts inside
                loader = accelerator.skip_first_batches(run.loader, done_in_epoch * config.train.grad_accum)
            for batch in loader:
                speed.fetched()
                if run.features is not None:
                    rows = batch.pop("image_index").to(run.features.device)
                    batch["image_features"] = run.features[rows].to(accelerator.device, non_blocking=True)
                samples = batch.pop("samples") if "samples" in batch else len(batch["input_ids"])  # packed: captions
                if accelerator.num_processes > 1:
                    # DDP averages the ranks' gradients: dividing each rank's summed loss by the mean caption-token
                    # count over ranks makes that average the loss of the global batch, as one process would compute.
                    local = label_tokens(batch)
                    batch["token_count"] = accelerator.reduce(local, reduction="sum") / accelerator.num_processes
                with accelerator.accumulate(model):
                    loss = model(**batch)
                    accelerator.backward(loss)
                    grad_norm = None
                    if accelerator.sync_gradients:
                        # Clipping off (0) still takes the norm (an infinite bound scales by 1), to see it is finite.
                        bound = config.train.max_grad_norm or math.inf
                        grad_norm = accelerator.clip_grad_norm_(model.parameters(), bound)
                    _mark_nonfinite(run, loss, grad_norm, state.global_step + 1)
                    run.optimizer.step()
                    run.optimizer.zero_grad()
                speed.add(samples * accelerator.num_processes)
                state.train_samples += samples * accelerator.num_processes
                if not accelerator.sync_gradients:
                    continue
                # 2. One optimizer step done: schedule, log, maybe checkpoint.
                run.scheduler.step()
                state.global_step += 1
                lr = run.scheduler.get_last_lr()[0]
                rate = speed.window_rate()
                bar.update(1)
                # Reading the loss makes the CPU wait for the GPU, which then idles while the next step is queued: only
                # at logging steps (so is the finite flag the steps above set on the GPU).
                if state.global_step % config.train.log_every == 0:
                    _stop_if_diverged(run)  # this step waits for the GPU anyway
                    # Every rank takes part: the mean over ranks is the global batch's loss (see token_count above).
                    global_loss = accelerator.reduce(loss.detach(), reduction="mean").item()
                    scalars = {"loss": global_loss, "lr": lr, "samples_per_s": rate,
                               "data_wait_fraction": speed.window_wait_fraction()}  # fmt: skip
                    bar.set_postfix(
                        loss=f"{scalars['loss']:.4f}", lr=f"{lr:.2e}", samples_s=f"{rate:.1f}", refresh=False
                    )
                    accelerator.log({f"train/{k}": v for k, v in scalars.items()}, step=state.global_step)
                    if main:  # the same scalars as JSON lines, for the report and for scripts
                        line = {"step": state.global_step, "epoch": state.epoch, **scalars, **allocator_counters()}
                        with open(run.output_dir / "train_log.jsonl", "a") as out:
                            out.write(json.dumps(line) + "\n")
                    speed.new_window()
                if config.train.save_every and state.global_step % config.train.save_every == 0:
                    save_checkpoint(run, f"step-{state.global_step:06d}")
                    speed.skip()
                if state.global_step >= run.total_steps:
                    break
            # 3. Epoch end (or the last step): validate, keep the best, checkpoint.
            epoch_finished = state.global_step % run.steps_per_epoch == 0
            if epoch_finished:
                state.epoch += 1
                speed.end_epoch()
            if epoch_finished or state.global_step >= run.total_steps:
                _stop_if_diverged(run)
                validate_and_keep_best(run)
                model.train()  # generation switched the model to eval mode and back to plain train mode
                save_checkpoint(run, f"step-{state.global_step:06d}")
                speed.skip()
    save_model(run, run.output_dir / "final")
    finish_validation(run)
    if main:
        peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
        summary = {
            "total_steps": state.global_step,
            "train_samples": state.train_samples,
            "train_seconds": speed.seconds,
            "samples_per_second": speed.samples / max(speed.seconds, 1e-9),
            "samples_per_second_by_epoch": speed.epochs,
            "peak_gpu_memory_gib": peak,
            "setup_peak_gpu_memory_gib": setup_peak,
            "image_features_cached": run.features is not None,
            "feature_pass_seconds": run.feature_pass_seconds,
        }
        _write_json(run.output_dir / "results.json", summary | _results(state))
        _write_report(run.output_dir)
    accelerator.end_training()
    return state


def allocator_counters() -> dict[str, int]:
    """The CUDA caching allocator's running counts of device allocations (cudaMalloc calls, which wait for the GPU)
    and of retries after freeing its cache; empty without CUDA. In the training log they show whether a slow
    stretch of steps is the allocator growing for new batch shapes."""
    if not torch.cuda.is_available():
        return {}
    stats = torch.cuda.memory_stats()
    return {"cuda_mallocs": int(stats.get("num_device_alloc", -1)),
            "cuda_alloc_retries": int(stats.get("num_alloc_retries", -1))}  # fmt: skip


def _write_report(run_dir: Path) -> None:
    """The HTML report; a failure there is reported but does not undo a finished training run."""
    from captune.report import write_report

    try:
        log.info("report: %s", write_report(run_dir))
    except Exception as err:  # noqa: BLE001 - the trained model is saved; say why the report is missing
        log.warning("the run report could not be written (%s); retry with `captune report %s`", err, run_dir)


def validate_and_keep_best(run: Run) -> dict[str, float] | None:
    """Captions the val images (sharded over processes, gathered once), scores them on rank 0, logs, keeps best/."""
    if not run.config.train.validate or not run.val_records:
        return None
    accelerator, state = run.accelerator, run.state
    model = accelerator.unwrap_model(run.loaded.model)
    mine = run.val_records[accelerator.process_index :: accelerator.num_processes]
    options = run.config.generate
    if run.config.train.val_num_beams is not None:
        options = dataclasses.replace(options, num_beams=run.config.train.val_num_beams)
    predictions = predict_records(model, run.loaded.processor, mine, options, run.config.data.prompt,
                                  run.config.data.num_workers)  # fmt: skip
    gathered = dict(gather_object(list(predictions.items())))
    metrics = None
    if accelerator.is_main_process:
        references = references_of(run.val_records)
        names = FAST_METRICS if run.config.train.val_metrics == "fast" else METRIC_NAMES
        metrics = score_captions(references, gathered, metrics=names).metrics
        accelerator.log({f"val/{k}": v for k, v in metrics.items()}, step=state.global_step)
        state.history.append({"epoch": state.epoch, "step": state.global_step, "metrics": metrics})
        _write_json(run.output_dir / "val" / f"step-{state.global_step:06d}.json",
                    {"metrics": metrics, "predictions": gathered})  # fmt: skip
        log.info("step %d val: %s", state.global_step, " ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    best = _broadcast_float(accelerator, metrics["CIDEr"] if metrics else 0.0)
    if state.best_cider is None or best > state.best_cider:
        state.best_cider, state.best_step = best, state.global_step
        save_model(run, run.output_dir / "best")
    return metrics


def finish_validation(run: Run) -> None:
    """The best step's numbers with every metric (METEOR too) in best/metrics.json and its model card (rank 0).

    When validation used the `generate` settings, its saved captions are scored again (with fast validation
    metrics; no generation is repeated) and the step's val file gets the full set. When it used fewer beams
    (`train.val_num_beams`), best/ is captioned once more with `generate.*` into `val/best-final.json`.
    """
    state, config = run.state, run.config
    regenerate = config.train.val_num_beams not in (None, config.generate.num_beams)
    if not run.accelerator.is_main_process or state.best_step is None:
        return
    if not regenerate and config.train.val_metrics == "full":
        return
    model = run.accelerator.unwrap_model(run.loaded.model)
    if regenerate:
        if state.best_step != state.global_step:  # the live model holds the last step's weights; final/ is saved
            load_saved_weights(model, run.output_dir / "best")
        predictions = predict_records(model, run.loaded.processor, run.val_records, config.generate,
                                      config.data.prompt, config.data.num_workers)  # fmt: skip
        metrics = score_captions(references_of(run.val_records), predictions).metrics
        val_file = run.output_dir / "val" / "best-final.json"
        _write_json(val_file, {"step": state.best_step, "generate": to_dict(config)["generate"],
                               "metrics": metrics, "predictions": predictions})  # fmt: skip
    else:
        val_file = run.output_dir / "val" / f"step-{state.best_step:06d}.json"
        saved = json.loads(val_file.read_text())
        metrics = score_captions(references_of(run.val_records), saved["predictions"]).metrics
        _write_json(val_file, saved | {"metrics": metrics})
        for entry in state.history:
            if entry["step"] == state.best_step:
                entry["metrics"] = metrics
    _write_json(run.output_dir / "best" / "metrics.json", metrics)
    from captune.export import CARD_FILE, model_card

    best = LoadedModel(model, run.loaded.processor, run.loaded.base_name)
    (run.output_dir / "best" / CARD_FILE).write_text(model_card(best, run.config, metrics))
    log.info("best step %d, all metrics (%s): %s", state.best_step, val_file,
             " ".join(f"{k} {v:.4f}" for k, v in metrics.items()))  # fmt: skip


def _broadcast_float(accelerator: Accelerator, value: float) -> float:
    """Rank 0's value on every rank, so all ranks take the same branch."""
    from accelerate.utils import broadcast_object_list

    box = [value]
    broadcast_object_list(box, from_process=0)
    return float(box[0])


# -------------------------------------------------------------------------------------------------- checkpoints ---
def save_model(run: Run, path: Path) -> None:
    """Adapter + processor + captune.json, written to a temporary directory and renamed into place (rank 0)."""
    accelerator = run.accelerator
    _stop_if_diverged(run)
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
            _write_json(tmp / "metrics.json", metrics)
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
    _stop_if_diverged(run)  # a checkpoint never holds NaN: the one before the divergence stays the last
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
        save_file({k: v.contiguous() for k, v in trainable.items()}, str(tmp / "trainable.safetensors"))
        torch.save({"optimizer": optimizer_state, "scheduler": run.scheduler.state_dict()}, tmp / "optimizer.pt")
        _write_json(tmp / "trainer_state.json", _results(state) | {"global_step": state.global_step,
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
    weights = read_weights(path / "trainable.safetensors")
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
            load_weights(model, weights, path / "trainable.safetensors")
            run.optimizer.load_state_dict(states["optimizer"])
        run.scheduler.load_state_dict(states["scheduler"])
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


def _mark_nonfinite(run: Run, loss: torch.Tensor, grad_norm: torch.Tensor | None, step: int) -> None:
    """Records on the device the first step whose loss or gradient norm is NaN or inf, without waiting for the GPU
    (`_stop_if_diverged` reads it). Under fp16's loss scaling an infinite gradient only makes the scaler skip the step
    and lower its scale, so there only the loss counts."""
    finite = torch.isfinite(loss.detach())
    if grad_norm is not None and run.accelerator.scaler is None:
        finite = finite & torch.isfinite(grad_norm)
    assert run.first_nonfinite is not None
    run.first_nonfinite = torch.where(finite, run.first_nonfinite, run.first_nonfinite.clamp(max=step))


def _stop_if_diverged(run: Run) -> None:
    """Stops the run at the first non-finite step any process saw (this waits for the GPU: called at logging steps,
    epoch ends and before every save only).

    Raises:
        TrainingDiverged: naming the step, the last good checkpoint and what to try.
    """
    if run.first_nonfinite is None:
        return
    step = int(run.accelerator.gather(run.first_nonfinite[None]).min().item())
    if step == NO_STEP:
        return
    config = run.config
    found = sorted(p for p in (run.output_dir / "checkpoints").glob("step-*") if p.is_dir())
    kept = (f"the last good checkpoint is {found[-1]} (continue with train.resume_from=latest and the changes below)"
            if found else "no checkpoint was saved before it")  # fmt: skip
    raise TrainingDiverged(
        f"training stopped: the loss or gradients became NaN or infinite at step {step} (model.dtype="
        f"{config.model.dtype}, train.lr={config.train.lr}, train.max_grad_norm={config.train.max_grad_norm}); "
        f"{kept}. Try model.dtype=bf16 or fp32 (fp16 overflow is the commonest cause), a lower train.lr, or "
        "train.max_grad_norm=1.0"
    )


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


def _results(state: TrainState) -> dict[str, Any]:
    return {"best_cider": state.best_cider, "best_step": state.best_step, "history": state.history}


def _write_json(path: Path, value: Any) -> None:
    write_atomically(path, json.dumps(value, indent=2))


def _flat_hparams(config: Config) -> dict[str, Any]:
    """TensorBoard's hparams take scalars and strings only."""
    flat = {}
    for section, values in to_dict(config).items():
        for key, value in values.items():
            flat[f"{section}.{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat


def trained_model_dir(output_dir: str | Path) -> Path:
    """The model a finished run recommends: best/ (by val CIDEr) when validation ran, else final/."""
    run_dir = Path(output_dir).expanduser()
    return run_dir / "best" if (run_dir / "best").is_dir() else run_dir / "final"


def train(config: Config) -> TrainState:
    """Runs the whole recipe for a resolved config (the `captune train` command and the Python API)."""
    return fit(setup(config))
