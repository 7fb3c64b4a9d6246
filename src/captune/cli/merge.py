"""`captune merge`: a standalone BLIP-2, the LoRA adapter merged into the base weights."""

from __future__ import annotations

import argparse
from pathlib import Path


def cmd_merge(args: argparse.Namespace) -> int:
    from captune.export import merge_model_dir

    output = merge_model_dir(Path(args.model_dir), Path(args.output), dtype=args.dtype, overwrite=args.overwrite)
    print(f"merged model in {output}: Blip2ForConditionalGeneration.from_pretrained({str(output)!r}) loads it, "
          f"as does --model-dir {output}")  # fmt: skip
    return 0


def add_merge_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`captune merge` and its flags."""
    p = sub.add_parser("merge", help="merge the LoRA adapter into the base weights: a standalone BLIP-2 for serving",
                       description="captune merge --model-dir RUN/best --output DIR")  # fmt: skip
    p.add_argument("--model-dir", required=True, help="RUN/best, RUN/final or a checkpoint (base + adapter)")
    p.add_argument("--output", required=True, help="directory to write; must be absent or empty unless --overwrite")
    p.add_argument("--dtype", choices=["auto", "bf16", "fp16", "fp32"], default="auto",
                   help="weight dtype written (auto: fp32); the merge itself runs in fp32 on the CPU")  # fmt: skip
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    p.set_defaults(func=cmd_merge)
