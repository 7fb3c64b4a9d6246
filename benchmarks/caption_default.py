"""What `captune caption DIR --model-dir M` gives with no speed flags, beside the usual loop, on one GPU in one run.

    PYTHONPATH=src:.gpu/site python benchmarks/caption_default.py --work /tmp/cd --output OUT.json

The model is a random-weight blip2-opt-2.7b built from its recorded hub files (`random_blip2.py`), bf16; every
caption is exactly 30 new tokens greedy (`--num-beams 1 --min-new-tokens 30 --max-new-tokens 30`, not speed flags),
so random weights cost what trained ones do. The images are generated 500 x 375 JPEGs. Runs, each a process of its
own (`python -m captune.cli caption`), timed whole and from the captioning line on (model loading apart):

1. `captune caption` with captune's decision (`generate.static_cache`, `generate.batch_size` left to it), on
   `--images` images: a first process, then a second one on the same machine (compiled code cached by then).
2. The former default, `--batch-size 16 --no-static-cache` (plain generate), on `--short-images` images.
3. The usual transformers loop at batch 32 on `--short-images` images, in this process (`caption_throughput.py`).

Writes `--output` with captions/s of each, the decision line each run logged, the command, the device and versions.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch
import transformers
from caption_throughput import make_images, usual_loop

from captune.model_dir import load_model_dir
from captune.twins import write_checkpoint

CAPTION = [sys.executable, "-m", "captune.cli", "caption", "--num-beams", "1", "--min-new-tokens", "30",
           "--max-new-tokens", "30", "--format", "jsonl", "--workers", "8"]  # fmt: skip


def cli_run(model_dir: Path, images: Path, output: Path, extra: list[str]) -> dict[str, object]:
    """Runs `captune caption` as a process; returns its seconds (whole, and from its choice line), captions/s."""
    command = [*CAPTION, str(images), "--model-dir", str(model_dir), "--output", str(output), *extra]
    start = time.perf_counter()
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=os.environ | {"PYTHONUNBUFFERED": "1"})
    assert process.stderr is not None
    chosen_at, line, tail = None, None, []
    for text in process.stderr:
        tail = [*tail[-20:], text.rstrip()]
        if "INFO captioning: " in text and line is None:
            chosen_at, line = time.perf_counter(), text.split("INFO ", 1)[1].strip()
    process.wait()
    end = time.perf_counter()
    if process.returncode != 0:
        sys.exit(f"{shlex.join(command)} failed ({process.returncode}):\n" + "\n".join(tail))
    captions = sum(1 for _ in output.open())
    captioning = end - (chosen_at or start)
    return {
        "command": shlex.join(command),
        "decision": line,
        "captions": captions,
        "seconds_whole_run": round(end - start, 2),
        "seconds_from_decision": round(captioning, 2),
        "captions_per_s_whole_run": round(captions / (end - start), 1),
        "captions_per_s_after_loading": round(captions / captioning, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--images", type=int, default=10_240)
    parser.add_argument("--short-images", type=int, default=2_048)
    args = parser.parse_args()
    model_dir = args.work / "blip2-opt-2.7b-random"
    if not (model_dir / "config.json").exists():
        write_checkpoint("Salesforce/blip2-opt-2.7b", model_dir, full_size=True, dtype=torch.bfloat16)
    paths = make_images(args.work / "images", args.images)
    short = args.work / "short"
    short.mkdir(exist_ok=True)
    for path in paths[: args.short_images]:
        if not (short / path.name).exists():
            (short / path.name).symlink_to(path)
    results: dict[str, object] = {}
    results["decided_first_process"] = cli_run(model_dir, args.work / "images", args.work / "a.jsonl", [])
    print(json.dumps(results["decided_first_process"]), flush=True)
    results["decided_second_process"] = cli_run(model_dir, args.work / "images", args.work / "b.jsonl", [])
    print(json.dumps(results["decided_second_process"]), flush=True)
    former = ["--batch-size", "16", "--no-static-cache"]
    results["former_default"] = cli_run(model_dir, short, args.work / "c.jsonl", former)
    print(json.dumps(results["former_default"]), flush=True)
    loaded = load_model_dir(model_dir, device="cuda")
    speed, _ = usual_loop(loaded.model, loaded.processor, paths[: args.short_images], 32)
    results["usual_loop_batch_32_captions_per_s"] = round(speed, 1)
    print("usual loop, batch 32:", results["usual_loop_batch_32_captions_per_s"], flush=True)
    report = {
        "what": "captions/s of `captune caption DIR --model-dir M` with no speed flags (captune decides the path and "
        "batch size) in a first and a second process, the former default (batch 16, plain generate) and the usual "
        "transformers loop at batch 32; random-weight blip2-opt-2.7b from its recorded hub files, bf16, greedy, "
        "exactly 30 new tokens, generated 500x375 JPEGs",
        "command": shlex.join(["python", "benchmarks/caption_default.py", *sys.argv[1:]]),
        "device": torch.cuda.get_device_name(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "date": datetime.date.today().isoformat(),
        **results,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
