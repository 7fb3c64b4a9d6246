"""Batched captioning: the one generation path that `captune caption`, evaluation and validation all use."""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from transformers import Blip2Processor

from captune.config import GenerateConfig
from captune.data import freeze_inherited_objects
from captune.data.images import processed_pixels
from captune.errors import CaptuneError
from captune.model import Blip2Like
from captune.step import attention_kernels


@dataclass
class CaptionResult:
    """The caption of one input image, or why there is none."""

    image: str
    caption: str | None
    error: str | None = None


def _is_encoder_decoder(model: Blip2Like) -> bool:
    return bool(getattr(model.config, "text_config", model.config).is_encoder_decoder)


@torch.no_grad()
def generate_captions(
    model: Blip2Like,
    processor: Blip2Processor,
    images: Sequence[Image.Image],
    options: GenerateConfig,
    prompt: str = "",
) -> list[str]:
    """Captions one batch of RGB images (preprocessed here; `caption_paths` preprocesses in worker processes)."""
    pixel_values = processor.image_processor(list(images), return_tensors="pt")["pixel_values"]
    return generate_from_pixels(model, processor, pixel_values, options, prompt)


@torch.no_grad()
def generate_from_pixels(
    model: Blip2Like,
    processor: Blip2Processor,
    pixel_values: torch.Tensor,
    options: GenerateConfig,
    prompt: str = "",
) -> list[str]:
    """Captions one batch of preprocessed images (the image processor's `pixel_values`).

    The text input is what `Blip2Processor(images=..., text=prompt)` builds: the image tokens, then the tokenized
    prompt. Decoder-only models get left padding, so every row's prompt ends right where generation starts. The
    prompt is fed to the model and stripped from the output, which holds only the new tokens.
    """
    device = next(model.parameters()).device
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    tokenizer = processor.tokenizer
    tokenizer.padding_side = "right" if _is_encoder_decoder(model) else "left"
    text = tokenizer([prompt] * len(pixel_values), padding=True)
    image_tokens = tokenizer(processor.image_token.content * processor.num_query_tokens, add_special_tokens=False)
    inputs = {
        key: torch.tensor([image_tokens[key] + row for row in text[key]], device=device)
        for key in ("input_ids", "attention_mask")
    }
    was_training = model.training
    model.eval()
    pixel_values = pixel_values.to(device, dtype, non_blocking=True)
    with attention_kernels(options.cudnn_attention):
        if options.static_cache and _static_greedy_applies(model, options):
            output = static_greedy(model, inputs["input_ids"], pixel_values, options)
        else:
            output = model.generate(
                **inputs,
                pixel_values=pixel_values,
                num_beams=options.num_beams,
                min_new_tokens=options.min_new_tokens,
                max_new_tokens=options.max_new_tokens,
                repetition_penalty=options.repetition_penalty,
                do_sample=False,
                **({"cache_implementation": "static"} if options.static_cache else {}),
            )
            if not _is_encoder_decoder(model):
                output = output[:, inputs["input_ids"].shape[1] :]
    model.train(was_training)
    texts = tokenizer.batch_decode(output, skip_special_tokens=True)
    return [_clean(t, prompt) for t in texts]


def _static_greedy_applies(model: Blip2Like, options: GenerateConfig) -> bool:
    """captune's own static-cache loop covers greedy decoding of decoder-only models without a repetition penalty;
    beam search, penalties and Flan-T5 go through `generate` (with its static cache)."""
    return options.num_beams == 1 and options.repetition_penalty == 1.0 and not _is_encoder_decoder(model)


STATIC_CHECK_EVERY = 8
"""Decode steps between the checks whether every row has ended (each check waits for the GPU)."""


@torch.no_grad()
def static_greedy(
    model: Blip2Like, input_ids: torch.Tensor, pixel_values: torch.Tensor, options: GenerateConfig
) -> torch.Tensor:
    """Greedy captions as `generate` makes them (min/max new tokens; a row that emitted EOS gets padding after it),
    over a static KV cache, with the decode step compiled on a GPU (transformers' `get_compiled_call`: CUDA graphs)
    and without waiting for the GPU at every token: `generate` reads its stopping criteria from the GPU after each
    step, so the host cannot queue the next one. Here the host looks only every STATIC_CHECK_EVERY steps.

    Every row holds the same image tokens and prompt (no padding), as `generate_from_pixels` builds them; returns the
    new tokens only, (rows, up to max_new_tokens).
    """
    from transformers import CompileConfig, StaticCache

    from captune.step import blip_of, embedded_inputs

    blip = blip_of(model)
    lm = blip.language_model
    embeds = embedded_inputs(blip, input_ids, pixel_values)
    rows, prefix = input_ids.shape
    total = prefix + options.max_new_tokens
    device = input_ids.device
    config = lm.generation_config
    eos = torch.tensor(config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id],
                       device=device)  # fmt: skip
    pad = config.pad_token_id if config.pad_token_id is not None else int(eos[0])
    cache = StaticCache(config=lm.config, max_cache_len=total)
    # No padding: every position up to the cache's end may be seen, and the causal mask from cache_position hides the
    # slots not written yet. One mask for every step keeps the compiled step's inputs the same shape.
    mask = torch.ones((rows, total), dtype=torch.long, device=device)
    positions = torch.arange(total, device=device)
    # transformers 5.24 renamed the cache argument (`past_key_values` still works there, with a warning, until 5.40)
    cached = {"cache" if "cache" in inspect.signature(lm.forward).parameters else "past_key_values": cache}
    start = positions[:prefix]
    logits = lm(inputs_embeds=embeds, attention_mask=mask, use_cache=True, cache_position=start,
                position_ids=start.expand(rows, -1), **cached).logits[:, -1]  # fmt: skip
    quantized = getattr(blip, "hf_quantizer", None) is not None
    step = lm.get_compiled_call(CompileConfig()) if device.type == "cuda" and not quantized else lm.__call__
    tokens = torch.full((rows, options.max_new_tokens), pad, dtype=torch.long, device=device)
    unfinished = torch.ones(rows, dtype=torch.bool, device=device)
    for i in range(options.max_new_tokens):
        logits = logits.to(torch.float32, copy=True)  # as generate does; also never writes into a CUDA graph's output
        if i < options.min_new_tokens:  # (a Python value: assigning it by index copies it to the GPU and waits)
            logits.index_fill_(1, eos, -float("inf"))
        chosen = torch.where(unfinished, logits.argmax(-1), pad)
        tokens[:, i] = chosen
        unfinished &= ~torch.isin(chosen, eos)
        if i + 1 == options.max_new_tokens or ((i + 1) % STATIC_CHECK_EVERY == 0 and not bool(unfinished.any())):
            return tokens[:, : i + 1]
        at = positions[prefix + i : prefix + i + 1]
        logits = step(input_ids=chosen[:, None], attention_mask=mask, use_cache=True, cache_position=at,
                      position_ids=at.expand(rows, 1), **cached).logits[:, -1]  # fmt: skip
    return tokens


def _clean(text: str, prompt: str) -> str:
    """Collapses whitespace and drops a repeat of the prompt at the start, as whole words only: prompt `a` must not
    eat the `a` of `at the top`."""
    text, prompt = " ".join(text.split()), " ".join(prompt.split())
    if prompt and (text == prompt or text.startswith(prompt + " ")):
        text = text[len(prompt) :].strip()
    return text


_Item = tuple[int, torch.Tensor | None, str | None]
"""An image's position in the input, its pixels, and the error that kept it from having pixels."""


class _Preprocessed(Dataset):
    """An image file as the model takes it (decoded, resized, normalised), or why it cannot be used."""

    def __init__(self, paths: Sequence[Path], processor: Blip2Processor) -> None:
        self.paths, self.image_processor = list(paths), processor.image_processor

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> _Item:
        try:
            return index, processed_pixels(self.paths[index], self.image_processor), None
        except CaptuneError as err:
            return index, None, str(err)


def _as_batch(items: list[_Item]) -> list[_Item]:
    """Keeps a batch as its list of items: stacking waits until the failed images are left out."""
    return items


def caption_paths(
    model: Blip2Like,
    processor: Blip2Processor,
    paths: Iterable[Path],
    options: GenerateConfig,
    prompt: str = "",
    num_workers: int = 0,
) -> Iterator[CaptionResult]:
    """Captions image files in batches of `options.batch_size`, in input order; an unreadable file yields a result
    with its error and the others are captioned.

    With `num_workers` > 0, worker processes decode and preprocess the next batches while the model captions this
    one, so the GPU does not wait for JPEG decoding. Each worker makes a share of a batch (batch_size / num_workers
    images; up to 2 shares ahead, i.e. about 2 batches in flight), not a whole batch: all workers make the first
    batch together, so it is ready after 1 / num_workers of the time one worker would take.
    """
    files = list(paths)
    device = next(model.parameters()).device
    share = -(-options.batch_size // num_workers) if num_workers else options.batch_size
    loader = DataLoader(
        _Preprocessed(files, processor),
        batch_size=share,
        num_workers=num_workers,
        collate_fn=_as_batch,
        prefetch_factor=2 if num_workers else None,
        pin_memory=device.type == "cuda",
        worker_init_fn=freeze_inherited_objects,
    )
    # A compiled static-cache step is compiled once per batch size: a short batch (the last one, or one with
    # unreadable files) is filled up with copies of its last image, whose captions are dropped.
    fill = options.static_cache and _static_greedy_applies(model, options)
    for batch in _regrouped(loader, options.batch_size):
        good = [(index, pixels) for index, pixels, _ in batch if pixels is not None]
        captions: list[str] = []
        if good:
            pixels = [p for _, p in good]
            pixels += pixels[-1:] * (options.batch_size - len(pixels) if fill else 0)
            captions = generate_from_pixels(model, processor, torch.stack(pixels), options, prompt)[: len(good)]
        done = {index: caption for (index, _), caption in zip(good, captions, strict=True)}
        for index, _, error in batch:
            yield CaptionResult(str(files[index]), done.get(index), error)


def _regrouped(chunks: Iterable[list[_Item]], size: int) -> Iterator[list[_Item]]:
    """The items of consecutive chunks, in order, in lists of `size` (the last one shorter)."""
    pending: list[_Item] = []
    for chunk in chunks:
        pending.extend(chunk)
        while len(pending) >= size:
            yield pending[:size]
            pending = pending[size:]
    if pending:
        yield pending


def expand_inputs(inputs: Sequence[str]) -> tuple[list[Path], list[CaptionResult]]:
    """Turns files, folders and globs into image paths (sorted within a folder or glob).

    Returns:
        The image paths, and a failed result for each input that names nothing.
    """
    from glob import glob

    from captune.data.images import IMAGE_SUFFIXES

    paths: list[Path] = []
    failures: list[CaptionResult] = []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                failures.append(CaptionResult(item, None, f"{item}: folder holds no image files"))
            paths.extend(found)
        elif path.exists():
            paths.append(path)
        elif any(c in item for c in "*?["):
            matched = sorted(Path(p) for p in glob(str(path), recursive=True) if Path(p).is_file())
            if not matched:
                failures.append(CaptionResult(item, None, f"{item}: the pattern matches no file"))
            paths.extend(matched)
        else:
            failures.append(CaptionResult(item, None, f"{item}: no such file or folder"))
    # An image named twice (a folder and a glob over it) is captioned once, at its first place.
    first: dict[Path, Path] = {}
    for p in paths:
        first.setdefault(p.resolve(), p)
    return list(first.values()), failures
