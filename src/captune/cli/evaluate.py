"""`captune evaluate`: score COCO-format caption predictions against references (`--task caption`, the default), or
official VQA results against the official annotation (and questions) files (`--task vqa`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from captune.cli.output import output_path, print_metrics
from captune.errors import CaptuneError

# Each task's required file, and the flags of one task only: given with the other task, a flag is an error naming
# it, never silently ignored.
_TASK_FILE = {"caption": ("references", "--references FILE (COCO captions annotation JSON)"),
              "vqa": ("annotations", "--annotations FILE (the split's official VQA annotation JSON)")}  # fmt: skip
_TASK_OF_FLAG = {"references": "caption", "allow_missing": "caption", "per_image": "caption", "annotations": "vqa",
                 "questions": "vqa"}  # fmt: skip
_TASK_TAKES = {
    "caption": "--task caption (the default) takes --references, --allow-missing and --per-image",
    "vqa": "--task vqa takes --annotations and --questions (and scores every annotated question)",
}


def cmd_evaluate(args: argparse.Namespace) -> int:
    _check_task_flags(args)
    if args.task == "vqa":
        return _evaluate_vqa(args)
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


def _check_task_flags(args: argparse.Namespace) -> None:
    """The task's required file given, and no flag of the other task."""
    for name, task in _TASK_OF_FLAG.items():
        if task != args.task and getattr(args, name) not in (None, False):
            flag = "--" + name.replace("_", "-")
            raise CaptuneError(
                f"{flag} is a flag of --task {task}, not of --task {args.task}; {_TASK_TAKES[args.task]}"
            )
    name, what = _TASK_FILE[args.task]
    if getattr(args, name) is None:
        raise CaptuneError(f"--task {args.task} needs {what}")


def _evaluate_vqa(args: argparse.Namespace) -> int:
    from captune.vqa_files import evaluate_vqa_files, write_vqa_metrics

    output = output_path(args.output) if args.output else None  # checked before scoring, as for captions
    accuracy = evaluate_vqa_files(args.predictions, args.annotations, args.questions)
    if output:
        write_vqa_metrics(output, accuracy)
    print(f"{'overall':8s} {accuracy.overall:.2f}")
    for answer_type, value in accuracy.per_answer_type.items():
        print(f"{answer_type:8s} {value:.2f}")
    return 0


def add_evaluate_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`captune evaluate` and its flags."""
    p = sub.add_parser("evaluate", help="score COCO-format caption predictions, or VQA answers (--task vqa)")
    p.add_argument("--task", choices=["caption", "vqa"], default="caption",
                   help="caption (COCO caption metrics, the default) or vqa (official VQA accuracy)")  # fmt: skip
    p.add_argument("--predictions", required=True, help='COCO results JSON: [{"image_id": ..., "caption": ...}]; '
                   'with --task vqa the official VQA results: [{"question_id": ..., "answer": ...}]')  # fmt: skip
    p.add_argument("--references", help="COCO captions annotation JSON (images, annotations); --task caption")
    p.add_argument("--annotations", help="--task vqa: the official VQA annotation JSON (v2_mscoco_*_annotations.json)")
    p.add_argument("--questions", help="--task vqa: the split's official questions JSON, checked against the "
                   "annotations (optional)")  # fmt: skip
    p.add_argument("--output", help="metrics JSON to write")
    p.add_argument("--allow-missing", action="store_true", help="score images that have predictions; count the rest")
    p.add_argument("--per-image", help="JSON lines to write: image id, prediction, references, BLEU-4, CIDEr")
    p.set_defaults(func=cmd_evaluate)
