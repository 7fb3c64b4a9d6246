"""The PEFT methods side by side (issue 30, `lora.method` and the LoRA variants): the built-in demo on the CPU, and
training speed and memory of blip2-opt-2.7b on one GPU.

    python benchmarks/peft_methods.py demo --output benchmarks/results/peft-methods-demo-cpu.json
    PYTHONPATH=src:benchmarks:.gpu/site python benchmarks/peft_methods.py gpu --model-dir DIR \
        --output benchmarks/results/peft-methods-opt2.7b-h200.json
    (DIR from `python benchmarks/random_blip2.py --arch opt-2.7b --output DIR`; `gpu --tiny` for a CPU dry run on the
    twin of blip2-opt-2.7b)

`demo`: per method, `captune demo`'s own steps (`captune.demo.run_demo`: the synthetic shapes data, the tiny random
BLIP-2, configs/demo.yaml's training with the method's keys on top, the saved model reloaded and scored on the
held-out test split) and records held-out CIDEr after training, the trainable parameters (of the model as
`apply_train_mode` makes it) and the mean optimizer-step time (results.json's training seconds / steps). torch runs
on one thread, as the demo does. The numbers say that each method learns something on this toy task at the demo's
settings (one learning rate for all, chosen for LoRA); they do not rank the methods' quality on real data, which
cannot be compared here (a random base and synthetic captions).

`gpu`: per method and batch size, `train_throughput.run_captune` (captune's real `train` path on generated JPEGs,
`train_throughput.make_data`) for `--steps` optimizer steps with the method's keys on top of the defaults (LoRA r 8
on q_proj/v_proj: the language model only, so every method runs on cached image features), and records samples/s and
peak GPU memory from results.json, and the trainable parameters. An out-of-memory error is recorded and the next
configuration runs. The speed and memory of a random-weight model are those of the real one.

Both write `--output` (JSON: every number, versions, device, this command) after every method, and print a table.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
import traceback
from pathlib import Path
from typing import Any

import torch
from train_throughput import _environment, make_data, run_captune

from captune.config import Config
from captune.config_loading import load_config
from captune.demo import DEMO_CONFIG, run_demo
from captune.model import apply_train_mode, load_base
from captune.twins import write_checkpoint

DEFAULTS = ["lora.r=8", "lora.alpha=32", "lora.dropout=0.1"]
"""The `lora` keys IA³ (no rank, scale or dropout) and LoHa/LoKr (no input dropout) must leave at their defaults,
which configs/demo.yaml changes."""
METHODS = {
    "lora": [],
    "lora-dora": ["lora.use_dora=true"],
    "lora-rslora": ["lora.use_rslora=true"],
    "lora-pissa": ["lora.init_lora_weights=pissa"],
    "lora-olora": ["lora.init_lora_weights=olora"],
    "adalora": ["lora.method=adalora"],
    "ia3": ["lora.method=ia3"],
    "loha": ["lora.method=loha"],
    "lokr": ["lora.method=lokr"],
}
"""Each row's overrides: one config key (two where IA³, LoHa and LoKr take no r, alpha or dropout)."""
RESET = {"ia3": DEFAULTS, "loha": DEFAULTS[2:], "lokr": DEFAULTS[2:]}


def overrides_of(name: str, demo: bool) -> list[str]:
    """The row's keys; on the demo's config, first the keys the method does not take put back to their defaults."""
    return [*(RESET.get(name, []) if demo else []), *METHODS[name]]


def trainable_parameters(config: Config) -> int:
    """Trainable parameters of the config's model as the recipe makes it trainable."""
    model = apply_train_mode(load_base(config.model.name, seed=config.train.seed).model, config)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def run_demo_rows(args: argparse.Namespace, result: dict[str, Any], save: Any) -> None:
    """Part (a): the demo, one row per method."""
    result["config"] = str(DEMO_CONFIG.name)
    for name in args.methods:
        overrides = overrides_of(name, demo=True)
        out = args.work / f"demo-{name}"
        start = time.perf_counter()
        demo = run_demo(out, overrides=overrides)
        run = json.loads((out / "run" / "results.json").read_text())
        config = load_config(DEMO_CONFIG, overrides)
        result["rows"][name] = {
            "overrides": overrides,
            "cider_before": demo.before["CIDEr"],
            "cider_after": demo.after["CIDEr"],
            "colour_right_after": demo.after.get("colour_right"),
            "shape_right_after": demo.after.get("shape_right"),
            "trainable_parameters": trainable_parameters(config),
            "steps": run["total_steps"],
            "step_seconds": run["train_seconds"] / run["total_steps"],
            "wall_seconds": time.perf_counter() - start,
            "sample_caption": demo.samples[0][1] if demo.samples else None,
        }
        print(f"{name}: {result['rows'][name]}", flush=True)
        save()


def run_gpu_rows(args: argparse.Namespace, result: dict[str, Any], save: Any) -> bool:
    """Part (b): captune's training path per method and batch size; returns whether every configuration ran."""
    model_dir = args.model_dir
    if args.tiny:  # the twin of blip2-opt-2.7b: the real tokenizer and ids at tiny sizes
        model_dir = write_checkpoint("Salesforce/blip2-opt-2.7b", args.work / "twin-model")
    assert model_dir is not None, "gpu needs --model-dir or --tiny"
    manifest = make_data(args.work / "data", args.images)
    result["data"] = {"images": args.images, "captions": 5}
    ok = True
    for name in args.methods:
        overrides = overrides_of(name, demo=False)
        row: dict[str, Any] = {"overrides": overrides}
        row["trainable_parameters"] = trainable_parameters(load_config(None, [f"model.name={model_dir}", *overrides]))
        for batch_size in args.batch_sizes:
            steps = [f"train.max_steps={args.steps}", "train.save_every=0", *overrides]
            try:
                run = run_captune(model_dir, manifest, args.work / f"run-{name}-{batch_size}", batch_size, steps)
                kept = ("samples_per_s", "peak_gib", "train_samples", "train_seconds", "image_features_cached")
                row[str(batch_size)] = {key: run[key] for key in kept}
            except torch.OutOfMemoryError:
                row[str(batch_size)] = {"error": "out of memory"}
            except Exception as err:  # noqa: BLE001 - recorded, and the script exits 1 at the end
                traceback.print_exc()
                row[str(batch_size)] = {"error": f"{type(err).__name__}: {err}"}
                ok = False
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            print(f"{name} batch {batch_size}: {row[str(batch_size)]}", flush=True)
            result["rows"][name] = row
            save()
    return ok


def table(result: dict[str, Any]) -> str:
    """The result as a Markdown table (as benchmarks/README.md shows it)."""
    rows = result["rows"]
    if result["part"] == "demo":
        lines = ["| method | overrides | held-out CIDEr after | trainable parameters | step (ms) |"]
        lines.append("|---|---|---|---|---|")
        lines += [f"| {name} | `{' '.join(row['overrides']) or '(demo.yaml)'}` | {row['cider_after']:.3f} | "
                  f"{row['trainable_parameters']:,} | {1000 * row['step_seconds']:.0f} |"
                  for name, row in rows.items()]  # fmt: skip
        return "\n".join(lines)
    sizes = [str(b) for b in result["batch_sizes"]]
    head = " | ".join(f"batch {b} samples/s | batch {b} peak GiB" for b in sizes)
    lines = [f"| method | trainable parameters | {head} |", "|---|---|" + "---|---|" * len(sizes)]
    for name, row in rows.items():
        cells = []
        for b in sizes:
            cell = row.get(b, {})
            if "error" in cell:
                cells += [cell["error"], "-"]
            else:
                peak = cell.get("peak_gib")
                cells += [f"{cell.get('samples_per_s', 0):.1f}", f"{peak:.1f}" if peak is not None else "-"]
        lines.append(f"| {name} | {row['trainable_parameters']:,} | {' | '.join(cells)} |")
    return "\n".join(lines)


def _git_state() -> dict[str, Any]:
    """The commit, and the files the demo's numbers depend on that differ from it (its config, the tiny model)."""
    import subprocess

    def git(*words: str) -> str:
        return subprocess.run(["git", *words], capture_output=True, text=True, check=False).stdout.strip()

    watched = ["src/captune/configs/demo.yaml", "src/captune/tiny.py", "src/captune/demo.py", "src/captune/model.py"]
    return {"commit": git("rev-parse", "HEAD"), "changed": git("diff", "--name-only", "HEAD", "--", *watched).split()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("part", choices=("demo", "gpu"))
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=Path(".bench/peft-methods"))
    parser.add_argument("--methods", type=lambda s: s.split(","), default=list(METHODS),
                        help=f"comma-separated, of {','.join(METHODS)}")  # fmt: skip
    parser.add_argument("--model-dir", type=Path, help="gpu: a BLIP-2 directory (benchmarks/random_blip2.py)")
    parser.add_argument("--tiny", action="store_true", help="gpu: a CPU dry run on the twin of blip2-opt-2.7b")
    parser.add_argument("--batch-sizes", type=lambda s: [int(b) for b in s.split(",")], default=[8, 256])
    parser.add_argument("--steps", type=int, default=30, help="gpu: optimizer steps per configuration")
    parser.add_argument("--images", type=int, default=3000, help="gpu: generated images (5 captions each)")
    args = parser.parse_args(argv)
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        parser.error(f"--methods {','.join(unknown)}: use {','.join(METHODS)}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    result: dict[str, Any] = {"what": __doc__.splitlines()[0], "part": args.part, "rows": {}}
    result.update(_environment(device, argv))
    if args.part == "demo":
        result["threads"] = 1  # as captune demo runs
        result["git"] = _git_state()
    else:
        result |= {"batch_sizes": args.batch_sizes, "steps": args.steps, "tiny": args.tiny}
    args.work.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after every row, so that a run cut short keeps what it measured
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=2) + "\n")

    ok = True
    if args.part == "demo":
        run_demo_rows(args, result, save)
    else:
        ok = run_gpu_rows(args, result, save)
    save()
    print(table(result))
    print(f"written to {args.output}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
