"""BLIP-2 LoRA training throughput: the usual Hugging Face + PEFT recipe vs captune's real `captune train` path, one
process, one GPU, the same data.

    PYTHONPATH=src:.gpu/site python benchmarks/train_throughput.py --model-dir DIR --work .bench --output OUT.json
    (DIR from `python benchmarks/random_blip2.py --arch opt-2.7b --output DIR`; add --tiny for a CPU dry run)

What runs, in order:
1. Data: a manifest of `--images` generated JPEGs (500 x 375), 5 captions each, Flickr8k-like lengths (12 words on
   average, 5-40; the random model's tokenizer gives one token a word).
2. The usual recipe, as the PEFT notebooks train BLIP-2: `Blip2ForConditionalGeneration` in bf16, PEFT LoRA r 8 on
   `q_proj`/`v_proj` (dropout 0.05), `torch.optim.AdamW`, every sample padded to 32 image + 1 BOS + 20 caption tokens,
   `model(pixel_values, input_ids, attention_mask, labels).loss`, backward, step, on batches already on the GPU
   (data loading is not timed: the usual recipe's best case). Per batch size: 3 warm-up steps, then `--steps` timed.
3. The loss checks: one batch in eval mode (no dropout) through the usual forward and through captune's
   `CaptionLoss` with cached image features; and 8 images' 40 captions as the usual recipe's rows and as captune's
   packed batch (one row per image, `train.pack_captions`); each pair must agree to bf16 tolerance.
4. captune: `captune.training.recipe.train(config)`, the real path (data check, feature pass, loader with workers, whole
   images with packed captions, length grouping, caption-only logits, fused AdamW, checkpoint at the end), one
   epoch over the data at `--batch-size` (captions; packed: that many / 5 images); its
   results.json gives samples/s (training steps only), peak memory and the feature-pass time. Then the ablations,
   `--ablation-steps` steps each, every optimisation switched off in turn.
5. The learning check: the usual recipe and captune, `--curve-steps` steps each at batch 32 on the same batches
   in the same order (captune's sampler and whole-image batches; the usual recipe gets them a row per caption with
   pixels), from the same base weights (each
   with its own LoRA initialisation), lr 1e-4 with a cosine decay, no gradient clipping; their loss curves side by
   side (averaged over windows of 10 steps).

The speed and memory of a random-weight model are those of the real one (the compute does not depend on the values).
Writes `--output` (JSON: every number, the software versions, the GPU, this command) and prints a table.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from captune.config_loading import load_config
from captune.data import read
from captune.tiny import TINY_WORDS
from captune.training.batches import (
    CaptionCollator,
    CaptionPairs,
    ImageCaptions,
    PackedCaptionCollator,
)
from captune.training.loss import CaptionLoss
from captune.training.recipe import train
from captune.training.sampling import LengthGroupedShuffle
from captune.twins import write_checkpoint

USUAL_CAPTION_TOKENS = 20
ABLATIONS = {
    "all_on": [],
    "no_packing": ["train.pack_captions=false"],
    "no_feature_cache": ["train.cache_image_features=off"],
    "no_caption_logits_only": ["train.caption_logits_only=false"],
    "no_length_grouping": ["train.group_by_length=false"],
    "no_fused_optimizer": ["train.fused_optimizer=false"],
    "compile": ["train.compile=true"],
    "gradient_checkpointing": ["train.gradient_checkpointing=true"],  # on, not off: its cost (issue 7)
    "mode_qformer": ["train.mode=qformer"],  # the LAVIS recipe: the image side runs at every step (issue 7)
    "cudnn_attention": ["model.cudnn_attention=true"],  # PyTorch's own choice of attention kernels
    "batch_64": ["train.batch_size=64"],
    "batch_128": ["train.batch_size=128"],
    "batch_256": ["train.batch_size=256"],
    "captions_cut_to_20": ["data.max_caption_tokens=19"],  # as the usual recipe's padding: 19 words + EOS
}
"""captune runs of `--ablation-steps` steps: the overrides of each (after `--batch-size`)."""


def make_data(folder: Path, images: int, seed: int = 0) -> Path:
    """manifest.jsonl + images/, generated once (reused when present with the same count)."""
    manifest = folder / f"manifest-{images}.jsonl"
    if manifest.exists():
        return manifest
    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for index in range(images):
        path = folder / "images" / f"{index:06d}.jpg"
        if not path.exists():
            coarse = rng.integers(0, 256, size=(12, 16, 3), dtype=np.uint8)
            Image.fromarray(coarse).resize((500, 375), Image.Resampling.BILINEAR).save(path, quality=85)
        lengths = np.clip(np.rint(rng.gamma(9.0, 12 / 9.0, size=5)), 5, 40).astype(int)
        captions = [" ".join(rng.choice(TINY_WORDS, size=n)) for n in lengths]
        lines.append(json.dumps({"image": f"images/{index:06d}.jpg", "caption": captions}))
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def is_t5(model_dir: Path) -> bool:
    """Whether the model directory holds an encoder-decoder (Flan-T5) BLIP-2."""
    return json.loads((model_dir / "config.json").read_text())["text_config"]["model_type"] == "t5"


def end_of(model_dir: Path) -> int:
    """The token the model's generation stops at (its generation config's EOS: 50118 for blip2-opt), which captune
    ends its training captions with; the usual recipe's batches end with it too, so both learn the same captions."""
    from transformers import GenerationConfig

    eos = GenerationConfig.from_pretrained(model_dir).eos_token_id
    return eos[0] if isinstance(eos, list) else eos


def usual_batches(model_dir: Path, manifest: Path, batch_size: int, count: int, device: torch.device) -> list[dict]:
    """`count` batches of the usual recipe's shape (fixed 20 caption tokens), on the device. OPT: one sequence of
    image tokens + BOS + caption; T5: image tokens + EOS into the encoder, the caption as labels."""
    from transformers import Blip2Processor

    processor = Blip2Processor.from_pretrained(model_dir)
    records = read("manifest", manifest).records
    pairs = CaptionPairs(records, processor)
    t5 = is_t5(model_dir)
    collate = CaptionCollator(
        processor, "", USUAL_CAPTION_TOKENS - 1, encoder_decoder=t5, end_token_id=end_of(model_dir)
    )
    length = processor.num_query_tokens + 1 + USUAL_CAPTION_TOKENS
    padded = (("labels", -100),) if t5 else (
        ("input_ids", processor.tokenizer.pad_token_id), ("attention_mask", 0), ("labels", -100))  # fmt: skip
    batches = []
    for b in range(count):
        batch = collate([pairs[(b * batch_size + i) % len(pairs)] for i in range(batch_size)])
        for key, value in padded:
            width = USUAL_CAPTION_TOKENS if t5 else length
            batch[key] = torch.nn.functional.pad(batch[key], (0, width - batch[key].shape[1]), value=value)
        batches.append({k: v.to(device) for k, v in batch.items() if k != "caption_start"})
    return batches


def captune_order_batches(model_dir: Path, manifest: Path, batch_size: int, count: int, device: torch.device) -> list:
    """The first `count` batches captune's run sees (its train split, sampler, whole images as train.pack_captions
    batches them, seed 42), as the usual recipe takes them: a row per caption, with pixels."""
    from torch.utils.data import DataLoader
    from transformers import Blip2Processor

    processor = Blip2Processor.from_pretrained(model_dir)
    pairs = CaptionPairs(read("manifest", manifest).split("train"), processor)
    images = ImageCaptions(pairs)
    per_batch = images.images_per_batch(batch_size)
    order = list(LengthGroupedShuffle(images.caption_lengths(), per_batch, seed=42))
    captions = [[c for i in order[start : start + per_batch] for c in range(*pairs.first_caption[i : i + 2])]
                for start in range(0, len(order), per_batch)]  # fmt: skip
    loader = DataLoader(pairs, batch_sampler=captions, num_workers=8,
                        collate_fn=CaptionCollator(processor, "", 40, encoder_decoder=is_t5(model_dir),
                                                   end_token_id=end_of(model_dir)))  # fmt: skip
    batches = []
    for batch in loader:
        batches.append({k: v.to(device) for k, v in batch.items() if k != "caption_start"})
        if len(batches) == count:
            return batches
    return batches


def usual_model(model_dir: Path, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model
    from transformers import Blip2ForConditionalGeneration

    torch.manual_seed(0)
    model = Blip2ForConditionalGeneration.from_pretrained(model_dir, dtype=dtype).to(device)
    targets = ["q", "v"] if is_t5(model_dir) else ["q_proj", "v_proj"]  # T5's names for the same projections
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=targets)
    return get_peft_model(model, config)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_usual(model: torch.nn.Module, batches: list[dict], steps: int, device: torch.device) -> dict[str, float]:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for i in range(3 + steps):
        if i == 3:
            _sync(device)
            start = time.perf_counter()
        loss = model(**batches[i % len(batches)]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    _sync(device)
    seconds = time.perf_counter() - start
    samples = steps * len(batches[0]["input_ids"])
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    del optimizer
    return {"samples_per_s": samples / seconds, "peak_gib": peak, "steps": steps}


def loss_check(model: torch.nn.Module, batch: dict) -> dict[str, float]:
    """The usual forward's loss and captune's CaptionLoss on cached features, same batch, eval mode."""
    model.eval()
    with torch.no_grad():
        usual = model(**batch).loss.item()
        blip = model.get_base_model()
        features = blip.get_image_features(pixel_values=batch["pixel_values"], return_dict=True).pooler_output
        rest = {k: v for k, v in batch.items() if k != "pixel_values"}
        caption_start = int((batch["labels"][0] != -100).nonzero()[0])
        ours = CaptionLoss(model).eval()(**rest, caption_start=caption_start, image_features=features).item()
    return {"usual": usual, "captune": ours, "relative_difference": abs(ours - usual) / abs(usual)}


def packed_loss_check(model: torch.nn.Module, model_dir: Path, manifest: Path, device: torch.device) -> dict:
    """The usual forward's loss on 8 images' 40 captions (a row per caption, pixels) and captune's packed batch of the
    same 8 images (one row per image, cached features), eval mode; captions cut to the usual recipe's 19 tokens."""
    from transformers import Blip2Processor

    processor = Blip2Processor.from_pretrained(model_dir)
    pairs = CaptionPairs(read("manifest", manifest).records[:8], processor)
    t5 = is_t5(model_dir)
    end = end_of(model_dir)
    plain = CaptionCollator(processor, "", USUAL_CAPTION_TOKENS - 1, t5, end_token_id=end)(
        [pairs[i] for i in range(len(pairs))]
    )
    images = ImageCaptions(pairs)
    packed = PackedCaptionCollator(processor, "", USUAL_CAPTION_TOKENS - 1, t5, end_token_id=end)(
        [images[i] for i in range(8)]
    )
    pixels = torch.stack([pairs.pixels(i) for i in range(8)]).to(device, torch.bfloat16 if device.type == "cuda"
                                                                  else torch.float32)  # fmt: skip
    model.eval()
    with torch.no_grad():
        usual = model(**{k: v.to(device) for k, v in plain.items() if k != "caption_start"}).loss.item()
        blip = model.get_base_model()
        features = blip.get_image_features(pixel_values=pixels, return_dict=True).pooler_output
        rest = {k: v.to(device) for k, v in packed.items() if k not in ("samples", "pixel_values")}
        ours = CaptionLoss(model).eval()(**rest, image_features=features).item()
    rows = {"usual": plain["input_ids"].numel(), "packed": packed["input_ids"].numel()}  # T5: the encoder's
    return {"usual": usual, "captune_packed": ours, "relative_difference": abs(ours - usual) / abs(usual),
            "input_ids_tokens": rows}  # fmt: skip


def usual_curve(model: torch.nn.Module, batches: list[dict], steps: int, image_side_eval: bool) -> list[float]:
    """Losses of `steps` steps at lr 1e-4 with a cosine decay and no warm-up, as captune's run below.

    With image_side_eval the frozen vision encoder and Q-Former run in eval mode (no dropout), as in captune."""
    from transformers import get_cosine_schedule_with_warmup

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    schedule = get_cosine_schedule_with_warmup(optimizer, 0, steps)
    model.train()
    if image_side_eval:
        model.get_base_model().vision_model.eval()
        model.get_base_model().qformer.eval()
    losses = []
    for i in range(steps):
        loss = model(**batches[i % len(batches)]).loss
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def run_captune(model_dir: Path, manifest: Path, output: Path, batch_size: int, overrides: list[str]) -> dict:
    config = load_config(None, [
        f"model.name={model_dir}", "data=manifest", f"data.data_dir={manifest}", f"train.output_dir={output}",
        f"train.batch_size={batch_size}", "train.epochs=1", "train.validate=false", "train.warmup_steps=10",
        "train.log_every=10", "train.lr=1e-4", "data.num_workers=8", "data.max_caption_tokens=40", *overrides,
    ])  # fmt: skip
    shutil.rmtree(output, ignore_errors=True)  # a fresh run, never a continuation of an earlier one
    start = time.perf_counter()
    train(config)
    results = json.loads((output / "results.json").read_text())
    log_file = output / "train_log.jsonl"
    log = [json.loads(line) for line in log_file.read_text().splitlines()] if log_file.exists() else []
    gc.collect()
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return {
        "overrides": overrides,
        "samples_per_s": results["samples_per_second"],
        "train_samples": results["train_samples"],
        "train_seconds": results["train_seconds"],
        "feature_pass_seconds": results["feature_pass_seconds"],
        "image_features_cached": results["image_features_cached"],
        "peak_gib": results["peak_gpu_memory_gib"],
        "wall_seconds": time.perf_counter() - start,
        "loss_log": [(entry["step"], entry["loss"]) for entry in log],
        # per logging window: step, samples/s, the fraction of its time spent waiting for the loader, cudaMalloc
        # calls so far (a slow start shows where it ends and whether data or the allocator holds it back)
        "window_log": [
            (
                entry["step"],
                round(entry["samples_per_s"], 1),
                round(entry.get("data_wait_fraction", -1), 3),
                entry.get("cuda_mallocs"),
            )
            for entry in log
        ],  # fmt: skip
    }


def windowed(values: list[float], window: int = 10) -> list[float]:
    return [float(np.mean(values[i : i + window])) for i in range(0, len(values), window)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path)
    parser.add_argument("--tiny", action="store_true", help="CPU dry run on the twin of blip2-opt-2.7b")
    parser.add_argument("--work", type=Path, default=Path(".bench"))
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--images", type=int, default=6000)
    parser.add_argument("--usual-batch-sizes", default="8,32,64")
    parser.add_argument("--batch-size", type=int, default=64, help="captune's batch size")
    parser.add_argument("--steps", type=int, default=20, help="timed steps of the usual recipe per batch size")
    parser.add_argument("--ablation-steps", type=int, default=150)
    parser.add_argument("--curve-steps", type=int, default=100)
    parser.add_argument("--ablations", default="all_on,no_packing,no_feature_cache,no_caption_logits_only,"
                        "no_length_grouping,no_fused_optimizer",
                        help=f"comma-separated, of: {', '.join(ABLATIONS)}")  # fmt: skip
    parser.add_argument("--skip", default="",
                        help="comma-separated stages to skip: usual,checks,epoch,ablations,curve")  # fmt: skip
    parser.add_argument("--epoch-overrides", nargs="*", default=[], metavar="KEY=VALUE",
                        help="config overrides for the epoch run only (e.g. model.cudnn_attention=true)")  # fmt: skip
    parser.add_argument("--allocator", default="",
                        help="PYTORCH_CUDA_ALLOC_CONF for this run, e.g. expandable_segments:True")  # fmt: skip
    parser.add_argument(
        "--all-train",
        action="store_true",
        help="every image in the train split (default: the manifest's own split, 75 %% train)",
    )
    args = parser.parse_args(argv)
    if args.allocator:  # read when CUDA starts, so before anything touches the GPU
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = args.allocator
    skip = set(filter(None, args.skip.split(",")))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    args.work.mkdir(parents=True, exist_ok=True)
    model_dir = args.model_dir
    if args.tiny:  # the twin of blip2-opt-2.7b: the real tokenizer and ids at tiny sizes
        model_dir = write_checkpoint("Salesforce/blip2-opt-2.7b", args.work / "twin-model")
    assert model_dir is not None, "--model-dir or --tiny"
    manifest = make_data(args.work / "data", args.images)
    if args.all_train:  # the same rows, all in the train split (else the manifest splits off val and test images)
        rows = [json.loads(line) | {"split": "train"} for line in manifest.read_text().splitlines()]
        manifest = manifest.with_name(f"all-train-{manifest.name}")
        manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
    result: dict[str, Any] = {"what": __doc__.splitlines()[0], "data": {"images": args.images, "captions": 5,
                                                                         "all_train": args.all_train}}  # fmt: skip
    result.update(_environment(device, argv))

    def save() -> None:  # after every stage, so that a run cut short keeps what it measured
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=2) + "\n")

    # 2-3. The usual recipe at each batch size, then the loss check on its model.
    if {"usual", "checks", "curve"} <= skip:  # only captune's runs
        _captune_runs(args, model_dir, manifest, result, save, skip)
        return
    model = usual_model(model_dir, device, dtype)
    if "usual" not in skip:
        result["usual"] = {}
        for batch_size in map(int, args.usual_batch_sizes.split(",")):
            batches = usual_batches(model_dir, manifest, batch_size, 4, device)
            result["usual"][batch_size] = time_usual(model, batches, args.steps, device)
            print(f"usual recipe, batch {batch_size}: {result['usual'][batch_size]}", flush=True)
            del batches
            save()
    if "checks" not in skip:
        check_batch = usual_batches(model_dir, manifest, 8, 1, device)[0]
        result["loss_check"] = loss_check(model, check_batch)
        print(f"loss check: {result['loss_check']}", flush=True)
        result["packed_loss_check"] = packed_loss_check(model, model_dir, manifest, device)
        print(f"packed loss check: {result['packed_loss_check']}", flush=True)
        save()
    if "curve" not in skip:
        del model
        gc.collect()
        curve_batches = captune_order_batches(model_dir, manifest, 32, args.curve_steps, device)
        for image_side_eval in (False, True):
            model = usual_model(model_dir, device, dtype)  # fresh LoRA, as captune's run starts
            losses = usual_curve(model, curve_batches, args.curve_steps, image_side_eval)
            result["usual_curve_image_side_eval" if image_side_eval else "usual_curve"] = windowed(losses)
            del model
            gc.collect()
        model = curve_batches = None
        save()
    model = check_batch = None
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    _captune_runs(args, model_dir, manifest, result, save, skip)


def _captune_runs(
    args: argparse.Namespace, model_dir: Path, manifest: Path, result: dict, save: Any, skip: set[str]
) -> None:
    """4-5. captune's real path: one epoch, the learning curve, then the ablations."""
    if "epoch" not in skip:
        result["captune_epoch"] = run_captune(model_dir, manifest, args.work / "run-epoch", args.batch_size,
                                              args.epoch_overrides)  # fmt: skip
        print(f"captune epoch: {result['captune_epoch']}", flush=True)
        save()
    if "curve" not in skip:
        steps = [f"train.max_steps={args.curve_steps}", "train.log_every=1", "train.warmup_steps=0",
                 "train.max_grad_norm=0", "lora.alpha=16", "lora.dropout=0.05"]  # the usual recipe's LoRA  # fmt: skip
        run = run_captune(model_dir, manifest, args.work / "run-curve", 32, steps)
        result["captune_curve"] = windowed([loss for _, loss in run["loss_log"]])
    if "ablations" not in skip:
        result["ablations"] = {}
        limit = f"train.max_steps={args.ablation_steps}"
        for name in args.ablations.split(","):
            overrides = ABLATIONS[name]
            result["ablations"][name] = run_captune(
                model_dir, manifest, args.work / f"run-{name}", args.batch_size, [limit, *overrides]
            )
            print(f"ablation {name}: {result['ablations'][name]['samples_per_s']:.1f} samples/s", flush=True)
            save()
    save()
    print(f"written to {args.output}")


def _environment(device: torch.device, argv: list[str] | None) -> dict[str, Any]:
    import accelerate
    import peft
    import transformers

    return {
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
                     "accelerate": accelerate.__version__, "python": platform.python_version()},
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        # the script that runs (train_throughput.py, or one that imports this: vqa_train_throughput.py, ...)
        "command": shlex.join(["python", f"benchmarks/{Path(sys.argv[0]).name}", *(argv or sys.argv[1:])]),
        "date": datetime.date.today().isoformat(),
    }  # fmt: skip


if __name__ == "__main__":
    main()
