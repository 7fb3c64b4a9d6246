"""Quantised LoRA training of blip2-opt-2.7b (bf16, 8-bit, 4-bit QLoRA): peak memory and samples/s at batch 8, and
the largest batch that fits a 12 GB and a 24 GB card, all through the real `captune train`.

    PYTHONPATH=src:.gpu/site python benchmarks/quantized_training.py --model-dir DIR --work W --output OUT.json
    (DIR from `python benchmarks/random_blip2.py --arch opt-2.7b --output DIR`; bitsandbytes must be importable)

For each of `--modes` (model.quantization none / 8bit / 4bit), each run a `captune train` process of its own:
1. Speed: batch 8 on Flickr8k-like captions (train_throughput.make_data), `--speed-steps` steps; the rate is the
   median of the 10-step windows after the first. Peak memory is results.json's: the training loop's
   (max_memory_allocated) and, apart, the set-up's (loading, quantising, the image-feature pass).
2. Capacity: batches of 32 and 128 on the worst case, every caption 40 tokens long (the longest
   data.max_caption_tokens keeps), 4 steps each. Peak memory is close to linear in the batch: the largest batch for a
   card of C GiB is predicted from the three peaks (8, 32, 128), leaving `--context-gib` for the CUDA context and the
   allocator's slack, and then checked by a run with PyTorch's allocations capped at C - context GiB
   (torch.cuda.set_per_process_memory_fraction); when it runs out of memory, 3/4 of it is tried, once.

Random weights: speed and memory are those of the real model (the compute does not depend on the values).
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from multi_gpu import read_run  # noqa: E402
from train_throughput import _environment, make_data  # noqa: E402

from captune.tiny import TINY_WORDS  # noqa: E402

# A `captune train` with PyTorch's allocations capped at argv[1] GiB (0: no cap).
CAPPED = """import sys, torch
cap = float(sys.argv[1])
if cap:
    torch.cuda.set_per_process_memory_fraction(cap * 2**30 / torch.cuda.get_device_properties(0).total_memory)
from captune.cli import main
sys.exit(main(sys.argv[2:]))
"""


def longest_captions(manifest: Path, words: int = 39) -> Path:
    """The same images, every caption `words` words long (+ EOS = 40 tokens with the random model's tokenizer)."""
    out = manifest.with_name(f"longest-{manifest.name}")
    rng = np.random.default_rng(1)
    lines = []
    for line in manifest.read_text().splitlines():
        row = json.loads(line)
        row["caption"] = [" ".join(rng.choice(TINY_WORDS, size=words)) for _ in row["caption"]]
        lines.append(json.dumps(row))
    out.write_text("\n".join(lines) + "\n")
    return out


def train_run(
    model_dir: Path, manifest: Path, out: Path, mode: str, batch: int, steps: int, cap: float, extra: list[str]
) -> dict:
    """One `captune train` process; its results.json numbers (read_run), or its exit status and last error line."""
    overrides = [f"model.name={model_dir}", f"model.quantization={mode}", "data=manifest", f"data.data_dir={manifest}",
                 f"train.output_dir={out}", f"train.batch_size={batch}", f"train.max_steps={steps}",
                 "train.validate=false", "train.warmup_steps=0", "train.log_every=10", "data.num_workers=4",
                 "data.max_caption_tokens=40", *extra]  # fmt: skip
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", CAPPED, str(cap), "train", *overrides], capture_output=True,
                          text=True, check=False)  # fmt: skip
    result = read_run(out, 1, time.perf_counter() - start, done.returncode)
    result.update({"batch": batch, "cap_gib": cap or None})
    if done.returncode:
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        result["error"] = next((line for line in reversed(lines) if "Error" in line or "error" in line), lines[-1:])
    return result


def peak(run: dict) -> float:
    return max(run.get("peak_gib_rank0") or 0.0, run.get("setup_peak_gib_rank0") or 0.0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=Path(".bench"))
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--modes", default="none,8bit,4bit")
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--speed-steps", type=int, default=60)
    parser.add_argument("--cards-gib", default="12,24")
    parser.add_argument("--context-gib", type=float, default=0.75)
    parser.add_argument("--overrides", default="", help="comma-separated captune overrides for every run, e.g. "
                        "train.pack_captions=false (batch = exactly that many captions)")  # fmt: skip
    args = parser.parse_args(argv)
    extra = list(filter(None, args.overrides.split(",")))
    manifest = make_data(args.work / "data", args.images)
    longest = longest_captions(manifest)
    result: dict[str, Any] = {"what": __doc__.splitlines()[0], "context_gib": args.context_gib, "modes": {}}
    result.update(_environment(torch.device("cuda" if torch.cuda.is_available() else "cpu"), argv))
    result["command"] = shlex.join(["python", "benchmarks/quantized_training.py", *(argv or sys.argv[1:])])
    result["date"] = datetime.date.today().isoformat()

    def save() -> None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=2) + "\n")

    for mode in args.modes.split(","):
        runs = args.work / f"q-{mode}"
        entry: dict[str, Any] = {}
        result["modes"][mode] = entry
        entry["batch_8"] = train_run(args.model_dir, manifest, runs / "speed", mode, 8, args.speed_steps, 0, extra)
        print(f"{mode} batch 8: {entry['batch_8']}", flush=True)
        sizes = {8: train_run(args.model_dir, longest, runs / "b8", mode, 8, 4, 0, extra)}
        for batch in (32, 128):
            sizes[batch] = train_run(args.model_dir, longest, runs / f"b{batch}", mode, batch, 4, 0, extra)
        entry["longest_captions"] = {
            b: {"peak_gib": peak(r), "exit_status": r["exit_status"]} for b, r in sizes.items()
        }
        fitted = [(b, peak(r)) for b, r in sizes.items() if not r["exit_status"]]
        save()
        if len(fitted) < 2:
            print(f"{mode}: fewer than two capacity runs finished; no batch limits", flush=True)
            continue
        slope, intercept = np.polyfit([b for b, _ in fitted], [p for _, p in fitted], 1)
        entry["peak_gib_fit"] = {"per_sample": slope, "fixed": intercept}
        save()
        entry["cards"] = {}
        for card in map(float, filter(None, args.cards_gib.split(","))):
            cap = card - args.context_gib
            predicted = int((cap - intercept) / slope) // 8 * 8
            check: dict[str, Any] = {"predicted_batch": predicted}
            for batch in (predicted, predicted * 3 // 4 // 8 * 8):
                if batch < 1:
                    break
                run = train_run(args.model_dir, longest, runs / f"cap{card:g}", mode, batch, 4, cap, extra)
                check[f"run_batch_{batch}"] = {"exit_status": run["exit_status"], "peak_gib": peak(run),
                                               "error": run.get("error")}  # fmt: skip
                if not run["exit_status"]:
                    check["largest_batch_checked"] = batch
                    break
            entry["cards"][f"{card:g}"] = check
            print(f"{mode} {card:g} GB: {check}", flush=True)
            save()
    save()
    print(f"written to {args.output}")


if __name__ == "__main__":
    main()
