"""ViT-g training throughput (issue 29): captune's `train.mode=vit+qformer` (the LAVIS caption fine-tune with the
vision encoder trained) beside a straightforward transformers loop training the same parameters, at each batch size
with and without gradient checkpointing, one process, one GPU; `train.mode=lora-lm+qformer+vit` as a cheaper row.

    PYTHONPATH=src:benchmarks:.gpu/site python benchmarks/vit_train_throughput.py --model-dir DIR --output OUT
    (DIR from `python benchmarks/random_blip2.py --arch opt-2.7b --output DIR`; --tiny for a CPU dry run on the twin)

What runs, in order:
1. Data: `--batch-sizes`' largest x (3 + `--steps`) generated JPEGs (500 x 375, `train_throughput.make_data`), each
   with one caption (the first of its five), all in the train split: a batch is that many images and captions on both
   sides, and captune's run never reaches an epoch's end within its steps. Captions are cut to 19 tokens + END on
   both sides.
2. The loss check: the straightforward loop's first batch (at the smallest batch size) in eval mode through its
   forward and through captune's training forward as `captune.training.recipe.setup` builds it with
   `train.mode=vit+qformer` (`CaptionLoss` on pixels). The vision encoder's weight matrices are redrawn first in both
   models from one seed at std 1 / sqrt(fan-in): the checkpoint's initialiser (1e-10) makes the ViT's output the
   same for every image, so the check would not see the image path; the loss with the batch's images rolled by one
   shows that it does.
3. The straightforward loop, as a transformers user writes the LAVIS recipe: `Blip2ForConditionalGeneration` in bf16
   (`from_pretrained(dtype=torch.bfloat16)`), the language model frozen (`requires_grad_(False)`), the vision encoder,
   Q-Former, query tokens and language projection trained by `torch.optim.AdamW`, batches already on the GPU
   (`train_throughput.usual_batches`: 32 image + BOS + 20 caption tokens), `model(**batch).loss`, backward, step;
   gradient checkpointing: `gradient_checkpointing_enable(use_reentrant=False)` on the vision encoder and the language
   model (what captune's `train.gradient_checkpointing` enables). Per configuration 3 warm-up steps, then `--steps`
   timed (`train_throughput.time_usual`). It trains from the redrawn ViT weights (speed does not depend on them).
4. captune: `captune.training.recipe.train(config)` per mode, batch size and `train.gradient_checkpointing`, the real
   path (data check, the loader with workers decoding the JPEGs, packed batches of whole images, caption-only
   logits, fused AdamW, gradient clipping, checkpoint at the end), 3 + `--steps` optimizer steps logged every 3; the
   samples/s of the logged windows after the first, and the peak memory from its results.json (model loading
   included, as the loop's peak includes its weights and its two batches). The windows' data-wait fractions (in
   `window_log`) include the wait for the GPU at each logged step: they do not show a starved loader.
An out-of-memory error at a configuration is recorded as such, memory is freed and the next one runs; any other error
is recorded and printed too, and makes the script exit 1 at the end. The JSON is written after every configuration.

The speed and memory of a random-weight model are those of the real one (the compute does not depend on the values).
Writes `--output` (JSON: every number, the software versions, the GPU, this command) and prints a table.
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from train_throughput import _environment, make_data, run_captune, time_usual, usual_batches

from captune.config_loading import load_config
from captune.model import blip_of
from captune.training.recipe import setup
from captune.twins import write_checkpoint

WARMUP_STEPS = 3  # as train_throughput.time_usual; captune's log window, so its first window is the warm-up
CAPTION_TOKENS = 19  # + END: the 20 caption tokens of train_throughput's usual batches
CHECKPOINTING = {"use_reentrant": False}  # as captune's recipe enables it


def one_caption_manifest(manifest: Path) -> Path:
    """The manifest's images with the first of their captions each, all in the train split."""
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    single = manifest.with_name(f"one-caption-{manifest.name}")
    single.write_text("".join(json.dumps(row | {"caption": row["caption"][:1], "split": "train"}) + "\n"
                              for row in rows))  # fmt: skip
    return single


def trained_in_full(model_dir: Path, device: torch.device, dtype: torch.dtype) -> Any:
    """Blip2ForConditionalGeneration with everything but the language model trainable."""
    from transformers import Blip2ForConditionalGeneration

    model: Any = Blip2ForConditionalGeneration.from_pretrained(model_dir, dtype=dtype)
    model.to(device).language_model.requires_grad_(False)
    return model


def set_checkpointing(model: Any, on: bool) -> None:
    for part in (model.vision_model, model.language_model):
        if on:
            part.gradient_checkpointing_enable(gradient_checkpointing_kwargs=CHECKPOINTING)
        else:
            part.gradient_checkpointing_disable()


def redraw_vision(vision_model: torch.nn.Module, device: torch.device) -> None:
    """Every weight matrix of the vision encoder at std 1 / sqrt(fan-in), from seed 0 (the same in any copy)."""
    generator = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for parameter in vision_model.parameters():
            if parameter.dim() >= 2:  # (LayerNorms and biases keep 1 and 0)
                parameter.normal_(std=parameter[0].numel() ** -0.5, generator=generator)


def trainable(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def loss_check(model: Any, batch: dict, model_dir: Path, manifest: Path, work: Path, device: torch.device) -> dict:
    """The loop's loss and captune's (its setup, train.mode=vit+qformer) on one batch, eval mode, ViT redrawn."""
    redraw_vision(model.vision_model, device)
    model.eval()
    with torch.no_grad():
        usual = model(**batch).loss.item()
        rolled = model(**(batch | {"pixel_values": batch["pixel_values"].roll(1, dims=0)})).loss.item()
    output = work / "loss-check"
    shutil.rmtree(output, ignore_errors=True)
    config = load_config(None, [
        f"model.name={model_dir}", "data=manifest", f"data.data_dir={manifest}", f"train.output_dir={output}",
        "train.mode=vit+qformer", "train.validate=false", f"data.max_caption_tokens={CAPTION_TOKENS}",
    ])  # fmt: skip
    run = setup(config)
    redraw_vision(blip_of(run.loaded.model).vision_model, device)
    run.step.eval()
    caption_start = int((batch["labels"][0] != -100).nonzero()[0])
    with torch.no_grad():
        ours = run.step(**batch, caption_start=caption_start).item()
    counts = {"usual": trainable(model), "captune": trainable(run.loaded.model)}
    run = None
    gc.collect()
    shutil.rmtree(output, ignore_errors=True)
    difference = abs(ours - usual) / abs(usual)
    return {"rows": len(batch["input_ids"]), "usual": usual, "captune": ours, "relative_difference": difference,
            "within_1e-3": difference <= 1e-3, "usual_images_rolled_by_one": rolled,
            "trainable_parameters": counts}  # fmt: skip


def time_captune(
    model_dir: Path, manifest: Path, args: argparse.Namespace, mode: str, batch_size: int, checkpointing: bool
) -> dict:
    """captune's real `train` for WARMUP_STEPS + args.steps; samples/s of the logged windows after the first."""
    output = args.work / f"run-{mode.replace('+', '-')}-{batch_size}-{'gc' if checkpointing else 'no-gc'}"
    overrides = [f"train.mode={mode}", f"train.gradient_checkpointing={str(checkpointing).lower()}",
                 f"train.max_steps={WARMUP_STEPS + args.steps}", f"train.log_every={WARMUP_STEPS}",
                 f"data.max_caption_tokens={CAPTION_TOKENS}", f"data.num_workers={args.workers}"]  # fmt: skip
    try:
        run = run_captune(model_dir, manifest, output, batch_size, overrides)
    finally:  # a run saves ~10 GB (trained weights and optimizer state twice): not kept
        shutil.rmtree(output, ignore_errors=True)
    timed = [window for window in run["window_log"] if window[0] > WARMUP_STEPS]
    seconds = sum(WARMUP_STEPS * batch_size / rate for _, rate, _, _ in timed)
    return {"samples_per_s": len(timed) * WARMUP_STEPS * batch_size / seconds, "peak_gib": run["peak_gib"],
            "steps": len(timed) * WARMUP_STEPS, "samples_per_s_with_warm_up": run["samples_per_s"],
            "wall_seconds": run["wall_seconds"],
            "window_log": run["window_log"], "overrides": overrides}  # fmt: skip


def measured(measure: Callable[[], dict], device: torch.device) -> dict:
    """measure()'s numbers, or the error it raised (out of memory: memory freed for the next configuration)."""
    try:
        return measure()
    except (torch.OutOfMemoryError, RuntimeError) as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        out_of_memory = isinstance(error, torch.OutOfMemoryError) or "out of memory" in message.lower()
        if not out_of_memory:
            traceback.print_exc()
        row: dict[str, Any] = {"error": "out of memory" if out_of_memory else "error", "message": message}
    except Exception as error:  # noqa: BLE001 - recorded and printed; the other configurations still run
        traceback.print_exc()
        row = {"error": "error", "message": f"{type(error).__name__}: {error}"}
    gc.collect()  # the failed step's tensors went with the exception's frames
    if device.type == "cuda":
        torch.cuda.empty_cache()
        row["allocated_after_gib"] = torch.cuda.memory_allocated() / 2**30
    return row


def ratios(rows: list[dict]) -> dict[str, float]:
    """captune's samples/s over the loop's, vit+qformer, per batch size and checkpointing where both ran."""
    speeds = {(r["side"], r["batch_size"], r["gradient_checkpointing"]): r["samples_per_s"]
              for r in rows if r["mode"] == "vit+qformer" and "samples_per_s" in r}  # fmt: skip
    return {f"batch {size}, checkpointing {on}": speed / speeds[("usual", size, on)]
            for (side, size, on), speed in speeds.items()
            if side == "captune" and ("usual", size, on) in speeds}  # fmt: skip


def table(rows: list[dict]) -> str:
    lines = [f"{'side':8} {'mode':20} {'batch':>5} {'checkpointing':>13} {'samples/s':>10} {'peak GiB':>9}"]
    for row in rows:
        error = "OOM" if row.get("error") == "out of memory" else "error"
        speed = f"{row['samples_per_s']:10.1f}" if "samples_per_s" in row else f"{error:>10}"
        peak = f"{row['peak_gib']:9.1f}" if row.get("peak_gib") is not None else f"{'-':>9}"
        lines.append(f"{row['side']:8} {row['mode']:20} {row['batch_size']:5} {row['gradient_checkpointing']!s:>13} "
                     f"{speed} {peak}")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, help="a blip2-opt-2.7b directory (random_blip2.py)")
    parser.add_argument("--tiny", action="store_true", help="CPU dry run on the twin of blip2-opt-2.7b, batch 2 and 4")
    parser.add_argument("--work", type=Path, default=Path(".bench"))
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--batch-sizes", default="64,256")
    parser.add_argument("--steps", type=int, default=9, help=f"timed steps per configuration, a multiple of "
                        f"{WARMUP_STEPS} (after {WARMUP_STEPS} warm-up steps)")  # fmt: skip
    parser.add_argument("--lora-checkpointing", default="true,false",
                        help="train.gradient_checkpointing values of the lora-lm+qformer+vit rows")  # fmt: skip
    parser.add_argument("--skip", default="", help="comma-separated sides to skip: usual,captune,lora")
    parser.add_argument("--workers", type=int, default=8, help="captune's data.num_workers")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    args.work.mkdir(parents=True, exist_ok=True)
    model_dir = args.model_dir
    if args.tiny:  # the twin: blip2-opt-2.7b's tokenizer and ids, ViT-g's layout at tiny sizes
        model_dir = write_checkpoint("Salesforce/blip2-opt-2.7b", args.work / "twin-model")
        args.batch_sizes, args.workers = "2,4", 0
        args.steps = WARMUP_STEPS
    assert model_dir is not None, "--model-dir or --tiny"
    if args.steps % WARMUP_STEPS:
        parser.error(f"--steps {args.steps}: a multiple of {WARMUP_STEPS} (captune's log window)")
    batch_sizes = [int(size) for size in args.batch_sizes.split(",")]
    skip = set(filter(None, args.skip.split(",")))
    images = max(batch_sizes) * (WARMUP_STEPS + args.steps)
    manifest = one_caption_manifest(make_data(args.work / "data", images))
    result: dict[str, Any] = {"what": __doc__.splitlines()[0], "data": {"images": images, "captions_per_image": 1,
                              "caption_tokens": CAPTION_TOKENS + 1}, "warm_up_steps": WARMUP_STEPS,
                              "timed_steps": args.steps, "runs": []}  # fmt: skip
    result.update(_environment(device, argv))
    failed = False

    def record(row: dict) -> None:  # saved after every configuration, so that a run cut short keeps what it measured
        nonlocal failed
        failed = failed or row.get("error") == "error"
        result["runs"].append(row)
        print(f"{row}", flush=True)
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=2) + "\n")

    # Checkpointing first at each batch size: the configuration most likely to run out of memory comes last.
    configurations = [(size, checkpointing) for size in batch_sizes for checkpointing in (True, False)]
    start = time.perf_counter()
    if "usual" not in skip:
        model = trained_in_full(model_dir, device, dtype)
        check_batch = usual_batches(model_dir, manifest, min(batch_sizes), 1, device)[0]
        result["loss_check"] = measured(lambda: loss_check(model, check_batch, model_dir, manifest, args.work, device),
                                        device)  # fmt: skip
        print(f"loss check: {result['loss_check']}", flush=True)
        del check_batch
        for size, checkpointing in configurations:
            batches = usual_batches(model_dir, manifest, size, 2, device)
            set_checkpointing(model, checkpointing)
            row = {"side": "usual", "mode": "vit+qformer", "batch_size": size, "gradient_checkpointing": checkpointing}
            record(row | measured(lambda: time_usual(model, batches, args.steps, device), device))  # noqa: B023
            model.zero_grad(set_to_none=True)  # (a step that ran out of memory leaves gradients behind)
            del batches
        model = None
        gc.collect()
        torch.cuda.empty_cache() if device.type == "cuda" else None
    lora = [] if "lora" in skip else [(size, value == "true") for size in batch_sizes
                                      for value in args.lora_checkpointing.split(",")]  # fmt: skip
    captune = [] if "captune" in skip else [("vit+qformer", *configuration) for configuration in configurations]
    for mode, size, checkpointing in captune + [("lora-lm+qformer+vit", *configuration) for configuration in lora]:
        row = {"side": "captune", "mode": mode, "batch_size": size, "gradient_checkpointing": checkpointing}
        record(row | measured(lambda: time_captune(model_dir, manifest, args, mode, size, checkpointing), device))  # noqa: B023
    result["captune_over_usual"] = ratios(result["runs"])
    result["wall_seconds"] = time.perf_counter() - start
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(table(result["runs"]), flush=True)
    print(f"captune / usual: {result['captune_over_usual']}\nloss check: {result.get('loss_check')}", flush=True)
    print(f"written to {args.output} in {result['wall_seconds']:.0f} s")
    if failed or "error" in result.get("loss_check", {}):
        raise SystemExit("a configuration failed with an error other than running out of memory (above)")


if __name__ == "__main__":
    main()
