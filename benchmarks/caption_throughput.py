"""Captioning throughput on one GPU: the usual Hugging Face `generate` loop vs captune's `caption_paths` (the path of
`captune caption` and `captune eval`), one process, the same images and weights.

    PYTHONPATH=src:.gpu/site python benchmarks/caption_throughput.py --model-dir DIR --work .bench --output OUT.json
    (DIR from `python benchmarks/random_blip2.py --arch opt-2.7b --output DIR`; --tiny for a CPU dry run)

Every caption is exactly 30 new tokens (`min_new_tokens = max_new_tokens = 30`), so random weights cost what trained
ones do. Stages:
1. The usual loop: for each batch, `processor(images=...)` on PIL images decoded in the loop, `model.generate(...)`,
   decode; batch 1 and batch 32, greedy.
2. captune: `caption_paths` over image files (decoded and preprocessed by 8 worker processes while the GPU works) at
   each `--batch-sizes`, greedy; and beam 5 at batch 64.
3. Single-image latency: `generate_captions` on one decoded image, median and p90 of 20 (after 3 warm-up calls).
4. Agreement: the usual loop's and captune's captions of the same images at the same batch size (32), in bf16.
`--static-only BATCH` and `--breakdown BATCH` run one stage of their own instead (see their help).
Writes `--output` (JSON: captions/s per path and batch, latencies, agreement, versions, device, this command).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import gzip
import json
import platform
import shlex
import shutil
import statistics
import sys
import time
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from captune.config import GenerateConfig
from captune.data.images import load_rgb
from captune.generation import core
from captune.generation.core import generate_captions
from captune.generation.files import caption_paths
from captune.generation.static import StaticOptions, attention, decoder, fast_path
from captune.generation.static.attention import _batched_products, _reductions, one_query
from captune.model_dir import load_model_dir
from captune.twins import write_checkpoint

TOKENS = 30


def make_images(folder: Path, count: int, seed: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for index in range(count):
        path = folder / f"{index:06d}.jpg"
        if not path.exists():
            coarse = rng.integers(0, 256, size=(12, 16, 3), dtype=np.uint8)
            Image.fromarray(coarse).resize((500, 375), Image.Resampling.BILINEAR).save(path, quality=85)
        paths.append(path)
    return paths


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def usual_loop(model: Any, processor: Any, paths: list[Path], batch_size: int, num_beams: int = 1) -> tuple:
    """captions/s and the captions of the usual loop (decode in the loop, processor, generate, batch_decode)."""
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    processor.tokenizer.padding_side = "left"
    captions: list[str] = []
    _sync()
    start = time.perf_counter()
    for i in range(0, len(paths), batch_size):
        images = [Image.open(p).convert("RGB") for p in paths[i : i + batch_size]]
        inputs = processor(images=images, return_tensors="pt").to(device)
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        with torch.no_grad():
            output = model.generate(**inputs, num_beams=num_beams, min_new_tokens=TOKENS, max_new_tokens=TOKENS,
                                    do_sample=False)  # fmt: skip
        # As the BLIP-2 docs caption: no text input, the whole output decoded (image tokens and BOS are special).
        captions += [" ".join(t.split()) for t in processor.batch_decode(output, skip_special_tokens=True)]
    _sync()
    return len(paths) / (time.perf_counter() - start), captions


def captune_path(
    model: Any, processor: Any, paths: list[Path], batch_size: int, num_beams: int, workers: int, static: bool = False
) -> tuple:
    options = GenerateConfig(num_beams=num_beams, min_new_tokens=TOKENS, max_new_tokens=TOKENS, batch_size=batch_size,
                             static_cache=static)  # fmt: skip
    _sync()
    start = time.perf_counter()
    captions, arrived = [], []
    for result in caption_paths(model, processor, paths, options, "", workers):
        captions.append(result.caption)
        arrived.append(time.perf_counter())
    _sync()
    end = time.perf_counter()
    # After the first batch (the loader's workers starting, the first batch decoded): the rate of a long run.
    STEADY[(batch_size, num_beams)] = (len(paths) - batch_size) / (end - arrived[batch_size - 1]) if len(
        paths) > batch_size else None  # fmt: skip
    return len(paths) / (end - start), captions


STEADY: dict[tuple[int, int], float | None] = {}
"""captune_path's last rate after its first batch, by (batch size, beams)."""


def single_options(static: bool = True) -> GenerateConfig:
    """One image, greedy, exactly TOKENS new tokens: the single-caption measurements' options."""
    return GenerateConfig(num_beams=1, min_new_tokens=TOKENS, max_new_tokens=TOKENS, batch_size=1, static_cache=static)


def _caption_seconds(model: Any, processor: Any, image: Any, options: GenerateConfig) -> float:
    """Seconds of one single caption, the GPU's work included (synchronised before and after)."""
    _sync()
    start = time.perf_counter()
    generate_captions(model, processor, [image], options)
    _sync()
    return time.perf_counter() - start


def _median_p90_ms(seconds: list[float]) -> dict[str, float]:
    ordered = sorted(seconds)
    return {"median_ms": 1000 * statistics.median(ordered), "p90_ms": 1000 * ordered[int(0.9 * len(ordered))]}


def latency(model: Any, processor: Any, path: Path, static: bool = False, calls: int = 20) -> dict[str, float]:
    """Single-image greedy latency: median and p90 of `calls` calls after 3 warm-up calls (with `static`, the first
    compiles the decode step for batch 1; its time is reported), the Python garbage collector's pauses within the
    timed calls (a collection walks every object the compiler left in the process), and the image processor's time
    alone (its share of a call varied from 2 to 24 ms between H100 processes,
    results/caption-single-latency-h100-gemv-*.json)."""
    options = single_options(static)
    image = load_rgb(path)
    pauses: list[tuple[int, float]] = []  # (generation, seconds) of each collection while timed
    began: list[float] = []

    def timed_collections(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            began.append(time.perf_counter())
        elif began:
            pauses.append((info["generation"], time.perf_counter() - began.pop()))

    # the first call (with `static`: the compiles, or the compile caches on disk), then two more warm-up calls
    first_call_s = _caption_seconds(model, processor, image, options)
    for _ in range(2):
        _caption_seconds(model, processor, image, options)
    gc.callbacks.append(timed_collections)
    times = [_caption_seconds(model, processor, image, options) for _ in range(calls)]
    gc.callbacks.remove(timed_collections)
    preprocessing = []  # the image processor's share of a call, alone (host only)
    for _ in range(calls):
        start = time.perf_counter()
        processor.image_processor([image], return_tensors="pt")
        preprocessing.append(time.perf_counter() - start)
    alone = _median_p90_ms(preprocessing)
    return {**_median_p90_ms(times), "first_call_s": first_call_s,
            "preprocessing_median_ms": alone["median_ms"], "preprocessing_p90_ms": alone["p90_ms"],
            "gc_ms_per_call": 1000 * sum(t for _, t in pauses) / calls,
            "gc_oldest_generation_collections": sum(g == 2 for g, _ in pauses),
            "gc_tracked_objects": len(gc.get_objects())}  # fmt: skip


def latency_ab_gemv(model: Any, processor: Any, path: Path, calls: int = 20) -> dict[str, Any]:
    """Single-image latency with `StaticOptions.gemv_up_to` 0 and 1 in alternate calls of one process (after 3
    warm-up calls each, which compile both): the host's speed drifts between processes and within seconds on the H100
    machines (results/caption-single-latency-h100-gemv-gc-freeze.json), so the two arms are compared call by call."""

    options = single_options()
    image = load_rgb(path)
    times: dict[int, list[float]] = {0: [], 1: []}
    fast = fast_path(model)
    default = fast.options
    try:
        for i in range(6 + 2 * calls):
            fast.options = replace(default, gemv_up_to=i % 2)
            seconds = _caption_seconds(model, processor, image, options)
            if i >= 6:
                times[i % 2].append(seconds)
    finally:
        fast.options = default
    out: dict[str, Any] = {f"gemv_up_to_{up}": _median_p90_ms(got) for up, got in times.items()}
    cublas, gemv = sorted(times[0]), sorted(times[1])
    wins = sum(b < a for a, b in zip(cublas, gemv, strict=True))  # quantile by quantile
    out["quantiles_where_gemv_is_faster"] = f"{wins} of {calls}"
    print(f"A/B, alternate calls: {out}", flush=True)
    return out


TIMELINE_MARKS = ("preprocessed", "image_side", "decoder", "embedding", "prefill_launched", "step_1", "step_15", "end")
"""Where `timeline` marks a call. (In results/caption-single-latency-h100-{eager-prefill,compiled-prefill,
fused-qkv}.json and -h200-{product,reduction}-attention.json the image side still ran inside the decoder, and their mark
`image_side_launched` stood where `embedding` is now.)"""


def timeline(model: Any, processor: Any, path: Path, calls: int = 10) -> dict[str, Any]:
    """Where one static single-image caption's time goes, without a profiler (after `latency` warmed it up): at each
    mark of TIMELINE_MARKS, when the host got there and when the GPU got there (a CUDA event recorded at that point),
    in ms since the call began, medians of `calls`. Where the GPU's time equals the host's, the GPU had been waiting
    for the host; the steps' GPU times give a decode step's duration."""

    options = single_options()
    image = load_rgb(path)
    marks: list[tuple[str, float, Any]] = []

    def mark(name: str) -> None:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        marks.append((name, time.perf_counter(), event))

    def marking(name: str, function: Any, where: Any = None) -> Any:
        def marked(*args: Any, **kwargs: Any) -> Any:
            if where is None or where(*args, **kwargs):
                mark(name)
            return function(*args, **kwargs)

        return marked

    originals = (core.generate_from_pixels, decoder.StaticDecoder.__init__, decoder.embedded_inputs,
                 decoder.StaticDecoder.step, decoder.compiled_image_side)  # fmt: skip
    real_image_side = decoder.compiled_image_side
    real_init = decoder.StaticDecoder.__init__

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        mark("decoder")
        real_init(self, *args, **kwargs)
        mark("prefill_launched")

    rows: dict[str, list[tuple[float, float]]] = {name: [] for name in TIMELINE_MARKS}
    core.generate_from_pixels = marking("preprocessed", core.generate_from_pixels)  # type: ignore[assignment]
    decoder.StaticDecoder.__init__ = init  # type: ignore[method-assign]
    decoder.embedded_inputs = marking("embedding", decoder.embedded_inputs)  # type: ignore[assignment]
    decoder.compiled_image_side = lambda blip: marking("image_side", real_image_side(blip))  # type: ignore[assignment]
    decoder.StaticDecoder.step = marking("step", decoder.StaticDecoder.step)  # type: ignore[method-assign]
    try:
        for _ in range(calls):
            marks.clear()
            _sync()
            mark("start")
            generate_captions(model, processor, [image], options)
            mark("end")
            _sync()
            named = [(name if name != "step" else f"step_{sum(m[0] == 'step' for m in marks[:i]) + 1}", t, e)
                     for i, (name, t, e) in enumerate(marks)]  # fmt: skip
            _, host0, event0 = named[0]
            for name, host, event in named[1:]:
                if name in rows:
                    rows[name].append((1000 * (host - host0), event0.elapsed_time(event)))
    finally:
        (core.generate_from_pixels, decoder.StaticDecoder.__init__, decoder.embedded_inputs,
         decoder.StaticDecoder.step, decoder.compiled_image_side) = originals  # type: ignore[method-assign]  # fmt: skip
    out = {name: {"host_ms": statistics.median(h for h, _ in got), "gpu_ms": statistics.median(g for _, g in got)}
           for name, got in rows.items() if got}  # fmt: skip
    if "step_1" in out and "step_15" in out:
        out["gpu_ms_per_step"] = (out["step_15"]["gpu_ms"] - out["step_1"]["gpu_ms"]) / 14
    print(f"timeline: {json.dumps(out)}", flush=True)
    return out


def kernel_configs() -> dict[str, list[dict[str, Any]]]:
    """The launch configuration each of the process's compiled Triton kernels runs with, by kernel name (the same
    names in every process that compiled the same graphs): to compare a process that tuned its kernels with one that
    took them from the compile caches (results/caption-single-latency-h100-kernel-configs.json: the latter ran the
    one-row step slower)."""
    from torch._inductor.runtime.triton_heuristics import CachingAutotuner

    found: dict[str, list[dict[str, Any]]] = {}
    for kernel in gc.get_objects():
        if issubclass(type(kernel), CachingAutotuner) and kernel.launchers:  # (type: no attribute hooks)
            config = kernel.launchers[0].config
            name = str(kernel.inductor_meta.get("kernel_name") or getattr(kernel.fn, "__name__", "?"))
            launch = {"num_warps": config.num_warps, "num_stages": config.num_stages,
                      "found_by_coordesc": getattr(config, "found_by_coordesc", None)}  # fmt: skip
            found.setdefault(name, []).append({**config.kwargs, **launch})
    return dict(sorted(found.items()))


def trace(model: Any, processor: Any, path: Path, output: Path) -> None:
    """One static single-image caption (after `latency` warmed it up) under PyTorch's profiler, host and GPU, written
    as a gzipped Chrome trace to `output` (for where the host keeps the GPU waiting; read it with
    benchmarks/trace_gaps.py or chrome://tracing)."""
    from torch.profiler import ProfilerActivity, profile

    options = single_options()
    image = load_rgb(path)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        _sync()
        generate_captions(model, processor, [image], options)
        _sync()
    output.parent.mkdir(parents=True, exist_ok=True)
    plain = output.with_suffix("")  # the profiler writes plain JSON; gzipped here
    prof.export_chrome_trace(str(plain))
    with plain.open("rb") as source, gzip.open(output, "wb") as target:
        shutil.copyfileobj(source, target)
    plain.unlink()
    print(f"trace written to {output}", flush=True)


def _timed(work: Any, repeats: int = 3) -> float:
    """Seconds of one call of work(), the median of `repeats` after one warm-up call."""
    work()
    times = []
    for _ in range(repeats):
        _sync()
        start = time.perf_counter()
        work()
        _sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def breakdown(model: Any, processor: Any, paths: list[Path], batch: int, workers: int) -> dict[str, Any]:
    """Where a batch's time goes: the image loader alone (workers decoding, no GPU work), the vision side alone
    (ViT-g + Q-Former + projection), generate from pixels already on the GPU (dynamic cache; static cache after a
    compiling warm-up), and the same with LoRA layers in the model (PEFT r 8 on q_proj/v_proj, unmerged: what
    `--merge-adapter` removes). Greedy, 30 new tokens."""
    from peft import LoraConfig, get_peft_model
    from torch.utils.data import DataLoader
    from transformers import BlipImageProcessorPil

    from captune.data.images import PixelFiles
    from captune.generation.core import generate_from_pixels
    from captune.generation.files import _as_batch

    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    out: dict[str, Any] = {"batch": batch}
    loader = DataLoader(PixelFiles(paths, processor.image_processor), batch_size=batch, num_workers=workers,
                        collate_fn=_as_batch, prefetch_factor=2 if workers else None)  # fmt: skip
    start = time.perf_counter()
    count = sum(len(b) for b in loader)
    out["loader_images_per_s"] = count / (time.perf_counter() - start)
    images = [load_rgb(p) for p in paths[:64]]
    pil = BlipImageProcessorPil(**processor.image_processor.to_dict())
    for name, image_processor in (("loaded", processor.image_processor), ("pil", pil)):
        start = time.perf_counter()
        for image in images:
            image_processor(image, return_tensors="pt")
        out[f"preprocess_ms_{name}"] = 1000 * (time.perf_counter() - start) / len(images)
    out["loaded_image_processor"] = type(processor.image_processor).__name__
    loaded_pixels = processor.image_processor(images, return_tensors="pt")["pixel_values"]
    difference = loaded_pixels - pil(images, return_tensors="pt")["pixel_values"]
    out["preprocess_max_abs_difference"] = float(difference.abs().max())
    print(f"breakdown: preprocessing {out['preprocess_ms_loaded']:.1f} ms an image ({out['loaded_image_processor']}), "
          f"{out['preprocess_ms_pil']:.1f} ms (BlipImageProcessorPil), max difference "
          f"{out['preprocess_max_abs_difference']:.3g}", flush=True)  # fmt: skip
    pixels = torch.stack([processor.image_processor(load_rgb(p), return_tensors="pt")["pixel_values"][0]
                          for p in paths[:batch]]).to(device, dtype)  # fmt: skip
    with torch.no_grad():
        vision = _timed(lambda: model.get_image_features(pixel_values=pixels, return_dict=True))
    out["vision_seconds"] = vision
    options = GenerateConfig(num_beams=1, min_new_tokens=TOKENS, max_new_tokens=TOKENS, batch_size=batch)
    dynamic = _timed(lambda: generate_from_pixels(model, processor, pixels, options))
    out["generate_dynamic_seconds"] = dynamic
    print(f"breakdown {batch}: loader {out['loader_images_per_s']:.0f} images/s, vision {vision:.3f} s, "
          f"generate (dynamic cache) {dynamic:.3f} s", flush=True)  # fmt: skip
    static = GenerateConfig(num_beams=1, min_new_tokens=TOKENS, max_new_tokens=TOKENS, batch_size=batch,
                            static_cache=True)  # fmt: skip
    out["generate_static_seconds"] = _timed(lambda: generate_from_pixels(model, processor, pixels, static))
    print(f"breakdown {batch}: generate (static cache) {out['generate_static_seconds']:.3f} s", flush=True)
    lora = get_peft_model(model, LoraConfig(r=8, lora_alpha=32, target_modules=["q_proj", "v_proj"]))
    out["generate_dynamic_lora_unmerged_seconds"] = _timed(lambda: generate_from_pixels(lora, processor, pixels,
                                                                                         options))  # fmt: skip
    print(f"breakdown {batch}: generate with unmerged LoRA {out['generate_dynamic_lora_unmerged_seconds']:.3f} s",
          flush=True)  # fmt: skip
    lora.unload()  # the plain model back, for whatever runs next
    return out


def _pixels(processor: Any, paths: list[Path], count: int, device: Any, dtype: Any = None) -> torch.Tensor:
    return torch.stack([processor.image_processor(load_rgb(p), return_tensors="pt")["pixel_values"][0]
                        for p in paths[:count]]).to(device, dtype)  # fmt: skip


def profile_static(model: Any, processor: Any, paths: list[Path], batch: int, beams: int = 1) -> dict[str, Any]:
    """Where captune's static-cache loop's time goes at this batch: wall time of a call (median of 3 after a
    compiling warm-up) against the GPU's busy time in one profiled call (kernel time summed), and the top operators by
    CPU and by GPU time. Run with TORCH_LOGS=graph_breaks,recompiles,perf_hints to see whether the decode step is one
    CUDA graph."""
    from torch.profiler import ProfilerActivity, profile

    from captune.generation.core import generate_from_pixels
    from captune.generation.static.decoder import compiled_image_side

    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    pixels = _pixels(processor, paths, batch, device, dtype)
    static = GenerateConfig(num_beams=beams, min_new_tokens=TOKENS, max_new_tokens=TOKENS, batch_size=batch,
                            static_cache=True)  # fmt: skip
    out: dict[str, Any] = {"batch": batch, "beams": beams}
    start = time.perf_counter()
    generate_from_pixels(model, processor, pixels, static)
    _sync()
    out["first_call_seconds"] = time.perf_counter() - start
    out["call_seconds"] = _timed(lambda: generate_from_pixels(model, processor, pixels, static))
    with torch.no_grad():
        out["vision_seconds"] = _timed(lambda: model.get_image_features(pixel_values=pixels, return_dict=True))
        if torch.cuda.is_available():  # what the static loops run when they make the features themselves
            out["vision_compiled_seconds"] = _timed(lambda: compiled_image_side(model)(pixels).clone())
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        generate_from_pixels(model, processor, pixels, static)
        _sync()
    events = prof.key_averages()
    kernel_us = sum(e.self_device_time_total for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    out["profiled_gpu_busy_seconds"] = kernel_us / 1e6
    out["top_by_gpu"] = events.table(sort_by="self_device_time_total", row_limit=15)
    out["top_by_cpu"] = events.table(sort_by="cpu_time_total", row_limit=20)
    if batch >= 32:  # this batch's captions against generate's, in the model's dtype
        out["identical_to_generate"] = agreement(model, processor, paths, batch, beams)
    print(f"static loop batch {batch} beams {beams}: {out['call_seconds']:.3f} s a call (first "
          f"{out['first_call_seconds']:.1f} s), vision {out['vision_seconds']:.3f} s (compiled "
          f"{out.get('vision_compiled_seconds')}), GPU busy "
          f"{out['profiled_gpu_busy_seconds']:.3f} s in a profiled call, identical to generate "
          f"{out.get('identical_to_generate')}\n{out['top_by_gpu']}\n{out['top_by_cpu']}",
          flush=True)  # fmt: skip
    return out


def agreement(model: Any, processor: Any, paths: list[Path], count: int, beams: int) -> float:
    """The share of `count` images whose caption from captune's static-cache loop is `generate`'s (dynamic cache),
    in the model's dtype, one batch."""
    from captune.generation.core import generate_from_pixels

    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    pixels = _pixels(processor, paths, count, device, dtype)
    options = GenerateConfig(num_beams=beams, min_new_tokens=TOKENS, max_new_tokens=TOKENS, batch_size=count)
    dynamic = generate_from_pixels(model, processor, pixels, options)
    static = generate_from_pixels(model, processor, pixels, GenerateConfig(**{**vars(options), "static_cache": True}))
    return sum(a == b for a, b in zip(dynamic, static, strict=True)) / len(dynamic)


def divergence_margins(model: Any, processor: Any, paths: list[Path], count: int) -> dict[str, Any]:
    """Where captune's static greedy loop and `generate` part ways on `count` images (one batch, the model's dtype):
    for each caption that differs, `generate`'s own margin between its top two scores at the first differing token,
    against its margins at every step of every caption. Divergences only at margins far below the usual ones are
    rounding near-ties (both tokens equally good to the model), not a different computation."""
    from captune.generation.inputs import text_inputs
    from captune.generation.static.attention import static_attention
    from captune.generation.static.loops import static_greedy
    from captune.model import attention_kernels

    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    pixels = _pixels(processor, paths, count, device, dtype)
    inputs = text_inputs(model, processor, count)
    options = GenerateConfig(num_beams=1, min_new_tokens=TOKENS, max_new_tokens=TOKENS, batch_size=count,
                             static_cache=True)  # fmt: skip
    with torch.no_grad(), attention_kernels(False):
        out = model.generate(**inputs, pixel_values=pixels, num_beams=1, min_new_tokens=TOKENS, max_new_tokens=TOKENS,
                             do_sample=False, output_scores=True, return_dict_in_generate=True)  # fmt: skip
        usual = out.sequences[:, inputs["input_ids"].shape[1] :]
        with static_attention(model):
            own = static_greedy(model, inputs["input_ids"], pixels, options)
    scores = torch.stack(out.scores, dim=1).float()  # (images, steps, vocabulary), EOS banned as generate bans it
    top = scores.topk(2, dim=-1).values
    margins = top[..., 0] - top[..., 1]
    differ = usual != own
    diverged = differ.any(dim=1)
    first = differ.float().argmax(dim=1)
    at = margins[diverged, first[diverged]]
    every = margins.flatten()

    def quantiles(values: torch.Tensor) -> dict[str, float]:
        if not len(values):
            return {}
        q = torch.quantile(values, torch.tensor([0.0, 0.5, 0.9, 1.0], device=values.device)).tolist()
        return dict(zip(("min", "median", "p90", "max"), q, strict=True))

    result = {"images": count, "identical": 1.0 - float(diverged.float().mean()),
              "margin_at_first_divergence": quantiles(at), "margin_every_step": quantiles(every),
              "every_step_share_below_max_divergence_margin": float((every <= at.max()).float().mean()) if len(at)
              else 0.0, "score_spread_std": float(scores[torch.isfinite(scores)].std())}  # fmt: skip
    print(f"divergences, {count} images: {result}", flush=True)
    return result


def agreement_fp32(model: Any, processor: Any, paths: list[Path], count: int) -> dict[str, Any]:
    """Greedy and beam-5 captions of captune's static-cache loops against `generate` with the model in float32, where
    the issue asks for token-for-token equality (in bf16 their attention kernels round differently); the model is
    left in float32."""
    model.float()
    count = min(count, len(paths))
    out: dict[str, Any] = {"images": count}
    for beams in (1, 5):
        out[f"identical_captions_beams_{beams}"] = agreement(model, processor, paths, count, beams)
        print(f"float32, {count} images, beams {beams}: static loop identical to generate for "
              f"{out[f'identical_captions_beams_{beams}']:.1%} of captions", flush=True)  # fmt: skip
    return out


def vision_tf32(model: Any, processor: Any, paths: list[Path], batch: int) -> dict[str, float]:
    """The vision side (ViT-g + Q-Former + projection) of one batch with the float32 Q-Former's products in full
    float32 and in TF32, median of 3 (TF32 was tried for the Q-Former, which transformers keeps in float32: it gave
    nothing, see benchmarks/README.md)."""
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    pixels = _pixels(processor, paths, batch, device, dtype)
    before, out = torch.backends.cuda.matmul.allow_tf32, {"batch": batch}
    with torch.no_grad():
        for name, tf32 in (("float32_products", False), ("tf32_products", True)):
            torch.backends.cuda.matmul.allow_tf32 = tf32
            out[name] = _timed(lambda: model.get_image_features(pixel_values=pixels, return_dict=True))
    torch.backends.cuda.matmul.allow_tf32 = before
    print(f"vision side, batch {batch}: {out}", flush=True)
    return out


def _flex(query: Any, key: Any, value: Any, mask: Any, scale: float) -> Any:
    """The core of `flex_attention_candidate`: PyTorch's FlexAttention, which the compiler lowers to its decoding
    kernel (split over the cache) for one query; the static cache's mask as a score modification."""
    from torch.nn.attention.flex_attention import flex_attention

    def masked(score: Any, b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
        if mask is None:
            return score
        if mask.dtype == torch.bool:
            return torch.where(mask[b, 0, 0, kv_idx], score, -float("inf"))
        return score + mask[b, 0, 0, kv_idx]

    return flex_attention(query, key, value, score_mod=masked, scale=scale).transpose(1, 2).contiguous()


reduction_attention = one_query(_reductions)
"""`--attention reduction`: captune's float32 reductions (`attention._reductions`) at every batch size (captune
runs them up to `StaticOptions.reductions_up_to` rows: slower at batch 512, measured)."""
flex_attention_candidate = one_query(_flex)
"""A candidate for `captune.generation.static.attention.one_query_attention` (`--attention flex`)."""


def apply_experiments(args: argparse.Namespace) -> tuple[dict[str, Any], StaticOptions]:
    """`--inductor KEY=VALUE` (torch._inductor.config, before anything compiles) and `--attention reduction`
    (the one-query step of captune's static loops replaced by `reduction_attention`): what this process changed, and
    the static loops' options with `--gemv-up-to` and `--compiled-prefill-up-to` (for the model's `fast_path`)."""
    changed: dict[str, Any] = {}
    static = StaticOptions()
    for entry in args.inductor:
        name, _, text = entry.partition("=")
        try:
            value: Any = json.loads(text)  # true, 3, {"decompose_mm_pass": {}}
        except json.JSONDecodeError:
            value = text
        setattr(torch._inductor.config, name, value)
        changed[f"inductor.{name}"] = value
    if args.no_fused_qkv:  # the static loops without captune's fused_qkv (q, k and v as three GEMMs)
        attention.fused_qkv = lambda model: nullcontext()  # type: ignore[assignment]
        changed["fused_qkv"] = False
    if args.gemv_up_to is not None:
        static = replace(static, gemv_up_to=args.gemv_up_to)
        changed["gemv_up_to"] = args.gemv_up_to
    if args.compiled_prefill_up_to is not None:
        static = replace(static, compiled_prefill_up_to=args.compiled_prefill_up_to)
        changed["compiled_prefill_up_to"] = args.compiled_prefill_up_to
    if args.compiled_step_up_to is not None:
        static = replace(static, compiled_step_up_to=args.compiled_step_up_to)
        changed["compiled_step_up_to"] = args.compiled_step_up_to
    candidates = {
        "bmm": one_query(_batched_products),
        "reduction": reduction_attention,
        "flex": flex_attention_candidate,
    }
    if args.attention in candidates:
        candidate = candidates[args.attention]
        attention.one_query_attention = lambda reductions_up_to: candidate  # type: ignore[assignment]
        changed["one_query_attention"] = f"{args.attention} (benchmark)"
    return changed, static


def usual_stage(model: Any, processor: Any, paths: list[Path], result: dict, save: Any) -> list[str]:
    """Stage 1, after a warm-up: the usual loop at batch 1 (16 images) and 32 (128 images); its batch-32 captions.
    Also how often the usual loop agrees with itself across batch sizes (its batch-1 and batch-32 captions of the same
    16 images): in bf16 the GEMM kernels differ with the batch, which rounds differently."""
    captune_path(model, processor, paths[:8], 8, 1, 0)  # warm-up: CUDA context, kernels
    usual1, captions1 = usual_loop(model, processor, paths[:16], 1)
    usual32, captions = usual_loop(model, processor, paths[:128], 32)
    same = sum(a == b for a, b in zip(captions1, captions[:16], strict=True)) / len(captions1)
    result["usual"] = {"batch_1": usual1, "batch_32": usual32, "batch_1_identical_to_batch_32": same}
    print(f"usual loop: batch 1 {usual1:.2f}, batch 32 {usual32:.1f} captions/s; its batch-1 captions identical to "
          f"its batch-32 ones for {same:.1%} of 16 images", flush=True)  # fmt: skip
    save()
    return captions


def static_only(
    args: argparse.Namespace, model: Any, processor: Any, paths: list[Path], result: dict, save: Any
) -> None:
    """captune's static-cache loops through `caption_paths`: greedy at each `--static-only` batch size (after a
    warm-up batch that compiles the step for it), single-image latency, beam 5 at `--beam-batch`; each with its bf16
    agreement with generate. With `--with-usual`, the usual loop first (batch 1 and 32, greedy), in this process."""
    if args.with_usual:
        usual_stage(model, processor, paths, result, save)
    result["captune_static_cache"] = {}
    result["vision_side_seconds"] = vision_tf32(model, processor, paths, int(args.static_only.split(",")[0]))
    save()
    for batch in map(int, args.static_only.split(",")):
        start = time.perf_counter()
        captune_path(model, processor, paths[:batch], batch, 1, args.workers, static=True)
        result[f"static_cache_warm_up_seconds_batch_{batch}"] = time.perf_counter() - start
        rate, _ = captune_path(model, processor, paths, batch, 1, args.workers, static=True)
        same = agreement(model, processor, paths, batch, 1)
        result["captune_static_cache"][f"greedy_batch_{batch}"] = rate
        result["captune_static_cache"][f"greedy_batch_{batch}_after_first_batch"] = STEADY[(batch, 1)]
        result["captune_static_cache"][f"greedy_batch_{batch}_identical_to_generate_bf16"] = same
        result[f"divergence_margins_batch_{batch}"] = divergence_margins(model, processor, paths, batch)
        print(f"static cache batch {batch}: {rate:.1f} captions/s over {len(paths)} images after "
              f"{result[f'static_cache_warm_up_seconds_batch_{batch}']:.0f} s of warm-up; identical to generate: "
              f"{same:.1%}; after the first batch {STEADY[(batch, 1)]:.1f} captions/s", flush=True)  # fmt: skip
        save()
    if not args.skip_latency:
        result["latency_single_image_static_cache"] = latency(model, processor, paths[0], static=True)
        print(f"single image, static cache: {result['latency_single_image_static_cache']}", flush=True)
        save()
    beam_batch = args.beam_batch
    start = time.perf_counter()
    captune_path(model, processor, paths[:beam_batch], beam_batch, 5, args.workers, static=True)  # compiles
    result["beam_warm_up_seconds"] = time.perf_counter() - start
    images = paths[: max(beam_batch * 4, args.beam_images)]
    beam, _ = captune_path(model, processor, images, beam_batch, 5, args.workers, static=True)
    same = agreement(model, processor, paths, 64, 5)
    result["captune_static_cache"][f"beam5_batch_{beam_batch}"] = beam
    result["captune_static_cache"][f"beam5_batch_{beam_batch}_after_first_batch"] = STEADY[(beam_batch, 5)]
    result["captune_static_cache"]["beam5_identical_to_generate_bf16"] = same
    print(f"beam 5, static cache, batch {beam_batch}: {beam:.1f} captions/s over {len(images)} images; identical to "
          f"generate: {same:.1%}", flush=True)  # fmt: skip
    save()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--work", type=Path, default=Path(".bench"))
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--batch-sizes", default="64,128,256")
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--with-usual", action="store_true", help="with --static-only: the usual loop first")
    parser.add_argument("--static-only", metavar="BATCHES",
                        help="only time captune greedy with a static (compiled) cache at this batch, after a warm-up "
                        "batch that compiles it")  # fmt: skip
    parser.add_argument("--breakdown", type=int, metavar="BATCH",
                        help="only time the parts of captioning at this batch: loader, vision side, generate with a "
                        "dynamic and a static cache, generate with unmerged LoRA")  # fmt: skip
    parser.add_argument(
        "--latency-only",
        action="store_true",
        help="only the single-image latency with the static loops (nothing else compiled first)",
    )
    parser.add_argument("--trace", type=Path, metavar="FILE.json.gz",
                        help="with --latency-only: also a profiler trace of one single-image caption")  # fmt: skip
    parser.add_argument("--skip-latency", action="store_true",
                        help="--static-only without the single-image latency (timed by --latency-only)")  # fmt: skip
    parser.add_argument("--beam-batch", type=int, default=64, help="images per batch for beam 5 in --static-only")
    parser.add_argument("--beam-images", type=int, default=512, help="images captioned with beam 5 in --static-only")
    parser.add_argument("--profile-static", metavar="BATCHES",
                        help="only profile captune's static-cache loops at these batch sizes (comma-separated; "
                        "BATCHxBEAMS for beam search), then compare them with generate in float32")  # fmt: skip
    parser.add_argument("--skip-fp32", action="store_true", help="--profile-static without the float32 comparison")
    parser.add_argument("--inductor", metavar="KEY=VALUE", action="append", default=[],
                        help="a torch._inductor.config setting for this process, VALUE in JSON (e.g. freezing=true); "
                        "repeatable")  # fmt: skip
    parser.add_argument("--no-fused-qkv", action="store_true",
                        help="the static loops with q, k and v as three GEMMs (no fused_qkv)")  # fmt: skip
    parser.add_argument("--attention", choices=("rows", "bmm", "reduction", "flex"), default="rows",
                        help="the one-query attention of the static loops: captune's (by rows), its batched products "
                        "or its float32 reductions at every batch size, or FlexAttention")  # fmt: skip
    parser.add_argument(
        "--compiled-prefill-up-to",
        type=int,
        metavar="IMAGES",
        help="StaticOptions.compiled_prefill_up_to for this process (0: the prefill always eager)",
    )
    parser.add_argument("--compiled-step-up-to", type=int, metavar="ROWS",
                        help="StaticOptions.compiled_step_up_to for this process (more rows: GraphedStep)")  # fmt: skip
    parser.add_argument("--ab-gemv", action="store_true",
                        help="only the single-image latency, gemv_up_to 0 and 1 in alternate calls")  # fmt: skip
    parser.add_argument("--gemv-up-to", type=int, metavar="ROWS",
                        help="StaticOptions.gemv_up_to for this process (0: cuBLAS only)")  # fmt: skip
    args = parser.parse_args(argv)
    import torch._inductor.config  # noqa: F401  (for apply_experiments)

    experiments, static_options = apply_experiments(args)
    model_dir = args.model_dir
    if args.tiny:  # the twin of blip2-opt-2.7b: the real tokenizer and ids at tiny sizes
        model_dir = write_checkpoint("Salesforce/blip2-opt-2.7b", args.work / "twin-model")
    paths = make_images(args.work / "caption-images", args.images)
    loaded = load_model_dir(str(model_dir))  # bf16 on a GPU, fp32 on a CPU
    model, processor = loaded.model, loaded.processor
    fast_path(model).options = static_options
    result: dict[str, Any] = {"what": __doc__.splitlines()[0], "tokens_per_caption": TOKENS, "images": len(paths)}

    def save() -> None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=2) + "\n")

    import accelerate
    import peft
    import transformers

    result["versions"] = {"torch": torch.__version__, "transformers": transformers.__version__,
                          "peft": peft.__version__, "accelerate": accelerate.__version__}  # fmt: skip
    result["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
    result["dtype"] = str(next(model.parameters()).dtype)
    result["command"] = shlex.join(["python", "benchmarks/caption_throughput.py", *(argv or sys.argv[1:])])
    result["date"] = datetime.date.today().isoformat()
    result["experiments"] = experiments
    if args.profile_static:  # entries BATCH or BATCHxBEAMS
        result["profile_static"] = []
        for entry in args.profile_static.split(","):
            batch, _, beams = entry.partition("x")
            result["profile_static"].append(profile_static(model, processor, paths, int(batch), int(beams or 1)))
            save()
        if not args.skip_fp32:
            result["agreement_float32"] = agreement_fp32(model, processor, paths, 64)
            save()
        return
    if args.ab_gemv:
        result["latency_ab_gemv"] = latency_ab_gemv(model, processor, paths[0])
        save()
        return
    if args.latency_only:  # in a process that compiled nothing else: the decode step's graph stays static-shaped
        result["latency_single_image_static_cache"] = latency(model, processor, paths[0], static=True)
        print(f"single image, static cache, alone: {result['latency_single_image_static_cache']}", flush=True)
        from captune.data.images import _NORMALISED_AS

        result["image_processor"] = {  # which class the saved model loads here, and how device_pixels normalises
            "class": type(processor.image_processor).__name__,
            "normalised_on_device_as": _NORMALISED_AS.get(processor.image_processor, "unchecked"),
        }
        save()
        if torch.cuda.is_available():
            result["kernel_configs"] = kernel_configs()
            result["timeline_single_image_static_cache"] = timeline(model, processor, paths[0])
            save()
            gc.freeze()  # what a server may do after its warm-up: the collector leaves the objects made so far alone
            result["latency_single_image_static_cache_after_gc_freeze"] = latency(model, processor, paths[0], True)
            print(f"after gc.freeze(): {result['latency_single_image_static_cache_after_gc_freeze']}", flush=True)
            result["timeline_after_gc_freeze"] = timeline(model, processor, paths[0])
            save()
            if args.trace:
                trace(model, processor, paths[0], args.trace)
        return
    if args.breakdown:
        result["breakdown"] = breakdown(model, processor, paths, args.breakdown, args.workers)
        save()
        return
    if args.static_only:
        static_only(args, model, processor, paths, result, save)
        return
    usual_captions = usual_stage(model, processor, paths, result, save)
    same32, captune_captions = captune_path(model, processor, paths[:128], 32, 1, args.workers)
    agree = sum(a == b for a, b in zip(usual_captions, captune_captions, strict=True)) / len(usual_captions)
    result["agreement_batch_32"] = {"identical_captions": agree, "captions": len(usual_captions)}
    result["captune"] = {"greedy_batch_32": same32}
    print(f"captune batch 32: {same32:.1f} captions/s; identical to the usual loop: {agree:.1%}", flush=True)
    save()
    for batch_size in map(int, args.batch_sizes.split(",")):
        rate, _ = captune_path(model, processor, paths, batch_size, 1, args.workers)
        result["captune"][f"greedy_batch_{batch_size}"] = rate
        print(f"captune greedy batch {batch_size}: {rate:.1f} captions/s", flush=True)
        save()
    rate, _ = captune_path(model, processor, paths[:256], 64, 5, args.workers)
    result["captune"]["beam5_batch_64"] = rate
    print(f"captune beam 5 batch 64: {rate:.1f} captions/s", flush=True)
    result["latency_single_image"] = latency(model, processor, paths[0])
    print(f"single image: {result['latency_single_image']}", flush=True)
    save()
    print(f"written to {args.output}")


if __name__ == "__main__":
    main()
