"""`captune evaluate`: score COCO-format predictions against references."""

from __future__ import annotations

import argparse
from pathlib import Path

from captune.cli.output import output_path, print_metrics


def cmd_evaluate(args: argparse.Namespace) -> int:
    from captune.metric_inputs import load_predictions, load_references
    from captune.metrics import per_image_rows, score_captions, write_metrics, write_per_image

    # Output paths are checked before the scorers run, not after.
    output = output_path(args.output) if args.output else None
    per_image = output_path(args.per_image) if args.per_image else None
    references, predictions = load_references(Path(args.references)), load_predictions(Path(args.predictions))
    result = score_captions(references, predictions, allow_missing=args.allow_missing, source=args.predictions,
                            per_image=per_image is not None, progress=True)  # fmt: skip
    if output:
        write_metrics(output, result)
    if per_image:
        write_per_image(per_image, per_image_rows(references, predictions, result))
    print_metrics(result)
    return 0


def add_evaluate_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`captune evaluate` and its flags."""
    p = sub.add_parser("evaluate", help="score COCO-format predictions against references")
    p.add_argument("--predictions", required=True, help='COCO results JSON: [{"image_id": ..., "caption": ...}]')
    p.add_argument("--references", required=True, help="COCO captions annotation JSON (images, annotations)")
    p.add_argument("--output", help="metrics JSON to write")
    p.add_argument("--allow-missing", action="store_true", help="score images that have predictions; count the rest")
    p.add_argument("--per-image", help="JSON lines to write: image id, prediction, references, BLEU-4, CIDEr")
    p.set_defaults(func=cmd_evaluate)
