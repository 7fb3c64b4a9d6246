"""`captune train`, `captune report` and `captune demo`: fine-tune from a config, write a run's HTML report, run
the whole path on the built-in synthetic data."""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def cmd_train(args: argparse.Namespace) -> int:
    from captune.config import describe
    from captune.config_loading import load_config
    from captune.training.recipe import train

    if args.help_config:
        print(describe())
        return 0
    overrides = list(args.overrides) + (["data.skip_bad_images=true"] if args.skip_bad_images else [])
    config = load_config(args.config, overrides)
    state = train(config)
    if int(os.environ.get("RANK", "0")) == 0:
        out = Path(config.train.output_dir)
        metric = {"vqa": "VQA accuracy", "retrieval": "r_mean"}.get(config.data.task, "CIDEr")
        kept = (
            f"best model (val {metric} {state.best_cider:.4f}) in {out / 'best'}"
            if state.best_cider is not None
            else ""
        )
        print(f"done: {state.global_step} steps; {kept or 'no validation'}; last model in {out / 'final'}")
    return 0


def add_train_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`captune train` and its flags."""
    p = sub.add_parser("train", help="fine-tune with LoRA", description="captune train --config C.yaml [key=value ...]")
    p.add_argument("--config", help="YAML config (see configs/)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. lr=3e-4 data_dir=~/data/flickr8k")
    p.add_argument("--skip-bad-images", action="store_true", help="train on usable images; report the rest")
    p.add_argument("--help-config", action="store_true", help="list every config key with its default")
    p.set_defaults(func=cmd_train)


def cmd_report(args: argparse.Namespace) -> int:
    from captune.report import write_report

    print(f"report: {write_report(Path(args.run_dir))}")
    return 0


def add_report_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`captune report` and its flags."""
    p = sub.add_parser("report", help="write RUN_DIR/report.html: curves, metrics, a gallery of val captions")
    p.add_argument("run_dir", help="a training run directory (train.output_dir)")
    p.set_defaults(func=cmd_report)


def cmd_demo(args: argparse.Namespace) -> int:
    from captune.data.synthetic import SyntheticSpec
    from captune.demo import run_demo

    spec = SyntheticSpec(train=args.train_images) if args.train_images else SyntheticSpec()
    result = run_demo(Path(args.output_dir), spec, args.overrides, args.task)
    if args.task == "vqa":
        print(f"held-out VQA accuracy before fine-tuning {result.before['vqa_accuracy']:.1f}%, after "
              f"{result.after['vqa_accuracy']:.1f}%")  # fmt: skip
    elif args.task == "retrieval":
        print(f"held-out text->image R@1 before fine-tuning {result.before['img_r1']:.1f}%, after "
              f"{result.after['img_r1']:.1f}% (image->text R@1 {result.before['txt_r1']:.1f}% -> "
              f"{result.after['txt_r1']:.1f}%)")  # fmt: skip
    else:
        print(f"CIDEr before fine-tuning {result.before['CIDEr']:.3f}, after {result.after['CIDEr']:.3f}")
        print("held-out captions naming it right, before -> after: " + ", ".join(
            f"{key} {result.before[f'{key}_right']:.0%} -> {result.after[f'{key}_right']:.0%}"
            for key in ("colour", "shape", "size", "position")))  # fmt: skip
    for image, caption in result.samples:
        print(f"  {image}: {caption}")
    use = {"vqa": "captune ask IMAGE --question Q", "retrieval": "captune eval --task retrieval"}
    print(f"metrics in {args.output_dir}/metrics.json; model in {args.output_dir}/model "
          f"({use.get(args.task, 'captune caption IMAGE')} --model-dir {args.output_dir}/model)")  # fmt: skip
    return 0


def add_demo_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`captune demo` and its flags."""
    p = sub.add_parser("demo", help="train, evaluate and caption (answer, rank) on the built-in synthetic data")
    p.add_argument("--task", choices=["caption", "vqa", "retrieval"], default="caption",
                   help="caption (configs/demo.yaml, the default); vqa: answer the synthetic questions, VQA accuracy "
                   "before and after (configs/demo-vqa.yaml); retrieval: rank held-out images and captions, Recall@K "
                   "before and after (configs/demo-retrieval.yaml)")  # fmt: skip
    p.add_argument("--output-dir", default="demo-out")
    p.add_argument("--train-images", type=int, help="synthetic training images (default 1200)")
    p.add_argument("overrides", nargs="*",
                   help="key=value overrides of configs/demo.yaml (demo-vqa.yaml, demo-retrieval.yaml)")  # fmt: skip
    p.set_defaults(func=cmd_demo)
