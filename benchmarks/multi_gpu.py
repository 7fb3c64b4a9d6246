"""Several GPUs through accelerate: DDP scaling of blip2-opt-2.7b LoRA on 1, 2, 4 ... GPUs, and blip2-opt-6.7b under
FSDP (with DDP beside it), all through the real `captune train` under `accelerate launch`.

    PYTHONPATH=src:.gpu/site python benchmarks/multi_gpu.py --work /tmp/mg --output OUT.json [--stages ddp,fsdp]

What runs:
1. Random-weight models built from the public configs (`random_blip2.py`: compute and memory are the real models')
   and a manifest of `--images` generated JPEGs with 5 Flickr8k-like captions each (train_throughput.make_data).
2. ddp: for each N in `--gpus`, `accelerate launch --config_file configs/accelerate/ddp.yaml --num_processes N -m
   captune.cli train` with the same batch per GPU (`--batch-size`, weak scaling: the global batch grows with N), the
   default path (cached image features, sharded over the ranks and all-gathered, length-grouped batches in runs of
   N), `--epochs` epochs. The rate is that of the last epoch (results.json's samples_per_second_by_epoch): every N
   trains on the same captions, and start-up and the first steps' allocations fall in the first epoch. Scaling
   efficiency = rate(N) / (N x rate(1)). The 10-step window rates of the log are kept beside it.
3. fsdp: blip2-opt-6.7b on the largest N: FSDP2 (configs/accelerate/fsdp.yaml) for `--fsdp-steps` steps with a
   checkpoint half-way, the same run resumed from that checkpoint (its final adapter must equal the uninterrupted
   run's), and the same model under DDP for the per-GPU memory and speed beside it.

Writes `--output` after every run (JSON: every run's results.json numbers, the window rates, the command, the GPUs).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import make_data  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs" / "accelerate"


def build_model(arch: str, folder: Path) -> Path:
    """The random-weight model directory, built once."""
    if not (folder / "config.json").exists():
        subprocess.run([sys.executable, str(ROOT / "benchmarks" / "random_blip2.py"), "--arch", arch, "--output",
                        str(folder)], check=True)  # fmt: skip
    return folder


def launch(config: str, processes: int, overrides: list[str], log: Path, cpu: bool = False) -> tuple[float, int]:
    """One `captune train` under `accelerate launch`; returns (wall seconds, exit status)."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / config),
               "--num_processes", str(processes), *(["--cpu"] if cpu else []), "-m", "captune.cli", "train",
               *overrides]  # fmt: skip
    start = time.perf_counter()
    with log.open("w") as out:
        done = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, check=False)
    if done.returncode:
        print(f"FAILED ({done.returncode}): {shlex.join(command)}\n{log.read_text()[-3000:]}", flush=True)
    return time.perf_counter() - start, done.returncode


def read_run(run_dir: Path, processes: int, wall: float, status: int) -> dict[str, Any]:
    """results.json's numbers: the last epoch's rate, else (a run shorter than an epoch) the median window rate after
    the first logged window, else (no window logged) the whole run's."""
    out: dict[str, Any] = {"processes": processes, "wall_seconds": wall, "exit_status": status}
    if status or not (run_dir / "results.json").exists():
        return out
    results = json.loads((run_dir / "results.json").read_text())
    log = run_dir / "train_log.jsonl"
    windows = [json.loads(line)["samples_per_s"] for line in log.read_text().splitlines()] if log.exists() else []
    steady = windows[1:] or windows
    by_epoch = results.get("samples_per_second_by_epoch") or []
    rate, source = results["samples_per_second"], "whole run"
    if by_epoch:
        rate, source = by_epoch[-1], "last epoch"
    elif steady:
        rate, source = statistics.median(steady), "median 10-step window after the first"
    out.update({
        "samples_per_s": rate,
        "rate_from": source,
        "samples_per_s_by_epoch": by_epoch,
        "samples_per_s_windows": windows,
        "samples_per_s_whole_run": results["samples_per_second"],
        "peak_gib_rank0": results["peak_gpu_memory_gib"],
        "setup_peak_gib_rank0": results.get("setup_peak_gpu_memory_gib"),
        "feature_pass_seconds": results["feature_pass_seconds"],
        "image_features_cached": results["image_features_cached"],
        "train_samples": results["train_samples"],
    })  # fmt: skip
    return out


def common(model_dir: Path, manifest: Path, output: Path, batch_size: int, length: str) -> list[str]:
    """The overrides of every run; `length` is `train.max_steps=S` or `train.epochs=E`."""
    return [f"model.name={model_dir}", "data=manifest", f"data.data_dir={manifest}", f"train.output_dir={output}",
            f"train.batch_size={batch_size}", length, "train.validate=false", "train.warmup_steps=10",
            "train.log_every=10", "data.num_workers=4", "data.max_caption_tokens=40"]  # fmt: skip


def same_adapter(a: Path, b: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    x, y = load_file(str(a / "adapter_model.safetensors")), load_file(str(b / "adapter_model.safetensors"))
    diff = max((x[k].float() - y[k].float()).abs().max().item() for k in x) if x.keys() == y.keys() else None
    return {"tensors": len(x), "same_keys": x.keys() == y.keys(), "max_abs_diff": diff,
            "bitwise_equal": x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--stages", default="ddp,fsdp")
    parser.add_argument("--gpus", default="", help="comma-separated process counts (default 1, 2, 4, ... up to all)")
    parser.add_argument("--images", type=int, default=6000)
    parser.add_argument("--batch-size", type=int, default=128, help="per GPU")
    parser.add_argument("--epochs", type=int, default=2, help="of the DDP scaling runs")
    parser.add_argument("--fsdp-batch-size", type=int, default=64, help="per GPU")
    parser.add_argument("--fsdp-steps", type=int, default=40)
    parser.add_argument("--cpu-dry-run", action="store_true", help="the ddp stage on the tiny model, 1-2 CPU processes")
    args = parser.parse_args(argv)
    available = torch.cuda.device_count()
    counts = [int(n) for n in args.gpus.split(",") if n] or [n for n in (1, 2, 4, 8) if n <= max(available, 2)]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args.work.mkdir(parents=True, exist_ok=True)
    manifest = make_data(args.work / "data", args.images)
    result: dict[str, Any] = {
        "what": __doc__.splitlines()[0],
        "gpus": [torch.cuda.get_device_name(i) for i in range(available)],
        "command": shlex.join(["python", "benchmarks/multi_gpu.py", *(argv or sys.argv[1:])]),
        "date": datetime.date.today().isoformat(),
        "data": {"images": args.images, "captions_per_image": 5},
    }

    def save() -> None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=2) + "\n")

    stages = set(args.stages.split(","))
    if "ddp" in stages:
        model = Path("tiny") if args.cpu_dry_run else build_model("opt-2.7b", args.work / "blip2-opt-2.7b-random")
        result["ddp_opt_2.7b"] = {"batch_per_gpu": args.batch_size, "epochs": args.epochs, "runs": {}}
        runs = result["ddp_opt_2.7b"]["runs"]
        for n in counts:
            out = args.work / f"ddp-{n}"
            overrides = common(model, manifest, out, args.batch_size, f"train.epochs={args.epochs}")
            wall, status = launch("ddp.yaml", n, overrides, args.work / f"ddp-{n}.log", args.cpu_dry_run)
            runs[n] = read_run(out, n, wall, status)
            base = runs[counts[0]].get("samples_per_s")
            if base and runs[n].get("samples_per_s"):
                runs[n]["scaling_efficiency"] = runs[n]["samples_per_s"] / (n / counts[0] * base)
            print(f"DDP {n} GPU(s): {runs[n]}", flush=True)
            save()
    if "fsdp" in stages:
        model = build_model("opt-6.7b", args.work / "blip2-opt-6.7b-random")
        n = counts[-1]
        half = args.fsdp_steps // 2
        section: dict[str, Any] = {"processes": n, "batch_per_gpu": args.fsdp_batch_size, "steps": args.fsdp_steps}
        result["opt_6.7b"] = section
        plain = common(model, manifest, args.work / "fsdp", args.fsdp_batch_size, f"train.max_steps={args.fsdp_steps}")
        wall, status = launch("fsdp.yaml", n, [*plain, f"train.save_every={half}"], args.work / "fsdp.log")
        section["fsdp"] = read_run(args.work / "fsdp", n, wall, status)
        save()
        resumed = common(
            model, manifest, args.work / "fsdp-resumed", args.fsdp_batch_size, f"train.max_steps={args.fsdp_steps}"
        )
        checkpoint = args.work / "fsdp" / "checkpoints" / f"step-{half:06d}"
        wall, status = launch("fsdp.yaml", n, [*resumed, f"train.resume_from={checkpoint}"],
                              args.work / "fsdp-resumed.log")  # fmt: skip
        section["fsdp_resumed"] = read_run(args.work / "fsdp-resumed", n, wall, status)
        if not status:
            section["resume_gives_same_adapter"] = same_adapter(args.work / "fsdp" / "final",
                                                                args.work / "fsdp-resumed" / "final")  # fmt: skip
        save()
        ddp = common(
            model, manifest, args.work / "ddp-6.7b", args.fsdp_batch_size, f"train.max_steps={args.fsdp_steps}"
        )
        wall, status = launch("ddp.yaml", n, ddp, args.work / "ddp-6.7b.log")
        section["ddp"] = read_run(args.work / "ddp-6.7b", n, wall, status)
        print(f"opt-6.7b: {section}", flush=True)
        save()
    print(f"written to {args.output}")


if __name__ == "__main__":
    main()
