"""`captune data check` and `captune data convert`: read a dataset (the reading flags they share), then decode and
summarise it, or write it as a manifest. `data check` also reads VQA datasets (`--task vqa`, or a VQA-only layout such
as `vqav2`), with the question and answer column flags."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import TYPE_CHECKING

from captune.cli.output import output_path
from captune.errors import CaptuneError

if TYPE_CHECKING:
    from captune.data import ReadOptions
    from captune.data.vqa import VqaReadOptions


# The reading flags of `data check` / `data convert`: each sets the `data` config field of the same name.
_READING_FIELDS = ("split_seed", "images_dir", "annotations", "restval", "image_column", "caption_column",
                   "split_column")  # fmt: skip


def _read_options(args: argparse.Namespace) -> ReadOptions:
    """The reader options of the flags `_add_reading_options` adds (the data config's defaults where none is given)."""
    from captune.config import DataConfig, read_options

    return read_options(DataConfig(**{name: getattr(args, name) for name in _READING_FIELDS}))


# The VQA column flags of `data check`: each sets the `VqaReadOptions` field of the same name (its default if none).
_VQA_FIELDS = ("question_column", "answers_column", "answer_column", "answer_separator", "question_id_column")


def _vqa_read_options(args: argparse.Namespace) -> VqaReadOptions:
    """The reading flags' options with the VQA column flags that were given."""
    from captune.data.vqa import VqaReadOptions

    base = _read_options(args)
    columns = {name: getattr(args, name) for name in _VQA_FIELDS if getattr(args, name) is not None}
    return VqaReadOptions(**{f.name: getattr(base, f.name) for f in dataclasses.fields(base)}, **columns)


def _vqa_only_format(name: str) -> bool:
    """Whether `--format` names a layout only the VQA readers have (`vqav2`, `okvqa`, `aokvqa`)."""
    from captune.data import FORMATS
    from captune.data.vqa import VQA_FORMATS

    return name in VQA_FORMATS and name not in FORMATS


def _task(args: argparse.Namespace) -> str:
    """The task `data check` reads for: `--task`, else `vqa` for a VQA-only layout, else `caption`; a VQA column
    flag with the caption task is an error, not ignored."""
    if args.task == "caption" and _vqa_only_format(args.format):
        raise CaptuneError(f"--format {args.format} is a VQA layout; check it with --task vqa (or without --task)")
    task = args.task or ("vqa" if _vqa_only_format(args.format) else "caption")
    given = [name for name in _VQA_FIELDS if getattr(args, name) is not None]
    if task == "caption" and given:
        flag = "--" + given[0].replace("_", "-")
        raise CaptuneError(f"{flag} is a flag of VQA datasets; add --task vqa to read --format {args.format} as one")
    return task


def cmd_data_check(args: argparse.Namespace) -> int:
    if _task(args) == "vqa":
        from captune.data.vqa import check_vqa_images, read_vqa, vqa_summary

        questions = check_vqa_images(read_vqa(args.format, args.data_dir, _vqa_read_options(args)),
                                     workers=args.workers, sample=args.sample)  # fmt: skip
        result, problems = vqa_summary(questions), len(questions.problems)
        counted = f"{result['questions']} usable questions on {result['images']} images"
    else:
        from captune.data import check_images, read, summary

        captions = check_images(read(args.format, args.data_dir, _read_options(args)), workers=args.workers,
                                sample=args.sample)  # fmt: skip
        result, problems = summary(captions), len(captions.problems)
        counted = f"{result['images']} usable images"
    text = json.dumps(result, indent=2)
    if args.output:
        output_path(args.output).write_text(text + "\n")
    print(text if not args.output else f"{counted}, {problems} problem(s); summary in {args.output}")
    return 1 if problems else 0


def cmd_data_convert(args: argparse.Namespace) -> int:
    from captune.data import SPLITS, read
    from captune.data.manifest import manifest_kind, write_manifest

    if _vqa_only_format(args.format):
        raise CaptuneError(f"--format {args.format} is a VQA layout; data convert writes caption manifests only (the "
                           "VQA readers read it where it is: check it with captune data check)")  # fmt: skip
    output = output_path(args.output)
    manifest_kind(output)  # a suffix the reader would refuse is refused before reading, not after
    captions = read(args.format, args.data_dir, _read_options(args))
    # Images are not decoded here (`captune data check --format manifest` does that); what could not be read is
    # listed, and the split a reader made (a seeded one included) is fixed in the manifest from now on.
    for problem in captions.problems:
        print(f"problem: {problem.problem}", file=sys.stderr)
    for note in captions.notes:
        print(f"note: {note}", file=sys.stderr)
    if captions.unassigned:
        print(f"note: {captions.unassigned} captioned image(s) in no split are not in the manifest", file=sys.stderr)
    rows = write_manifest(captions, output)
    splits = "/".join(str(len(captions.split(name))) for name in SPLITS)
    print(f"{rows} rows ({len(captions.records)} images; train/val/test {splits}) written to {output}")
    if captions.problems:
        print(f"{len(captions.problems)} problem(s): what they name is not in the manifest (listed above)",
              file=sys.stderr)  # fmt: skip
    return 1 if captions.problems else 0


def _add_reading_options(parser: argparse.ArgumentParser) -> None:
    """The dataset and how to read it; `_read_options` turns these flags into reader options."""
    parser.add_argument("--format", required=True, help="flickr8k, flickr8k-kaggle, karpathy, coco, manifest, hf or "
                        "synthetic")  # fmt: skip
    parser.add_argument("--data-dir", required=True, help="the dataset folder (manifest: also the manifest file)")
    parser.add_argument("--images-dir", help="image folder, if not the layout's usual one")
    parser.add_argument("--annotations", help="annotation file name, if not the layout's usual one")
    parser.add_argument("--split-seed", type=int, default=0, help="seed of the split for data without one")
    parser.add_argument("--restval", choices=["train", "none"], default="train",
                        help="where 'restval' images (karpathy, manifest) go: train, or none (left out)")  # fmt: skip
    parser.add_argument("--image-column", default="image", help="image column of a manifest or hf dataset")
    parser.add_argument("--caption-column", default="caption", help="caption column of a manifest or hf dataset")
    parser.add_argument("--split-column", default="split", help="split column of a manifest or hf dataset")


def _add_vqa_options(parser: argparse.ArgumentParser) -> None:
    """The task and the VQA column flags (`_vqa_read_options`); without a value each is `VqaReadOptions`' default."""
    parser.add_argument("--task", choices=["caption", "vqa"], help="read a caption or a VQA dataset (default: vqa "
                        "for vqav2, okvqa and aokvqa, else caption); VQA formats: vqav2, okvqa, aokvqa, manifest, hf, "
                        "synthetic")  # fmt: skip
    parser.add_argument("--question-column", help="--task vqa: question column of a manifest or hf dataset "
                        "(default question)")  # fmt: skip
    parser.add_argument("--answers-column", help="--task vqa: column of the annotators' answers, a list or "
                        "separated text (default answers)")  # fmt: skip
    parser.add_argument("--answer-column", help="--task vqa: column of one answer a row (default answer)")
    parser.add_argument("--answer-separator", help="--task vqa: what separates answers in text (default |; empty: "
                        "one answer)")  # fmt: skip
    parser.add_argument("--question-id-column", help="--task vqa: optional column of question ids (default "
                        "question_id)")  # fmt: skip


def add_data_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`captune data` and its subcommands `check` and `convert`, with their flags."""
    p = sub.add_parser("data", help="inspect datasets")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    c = data_sub.add_parser("check", help="read a dataset, decode every image, summarise and list problems")
    _add_reading_options(c)
    c.add_argument("--output", help="summary JSON to write")
    c.add_argument("--workers", type=int, help="decoding threads (default: all cores)")
    c.add_argument("--sample", type=int, help="decode a seeded sample of N images only")
    _add_vqa_options(c)
    c.set_defaults(func=cmd_data_check)
    c = data_sub.add_parser("convert", help="read a dataset in any format and write it as a manifest",
                            description="captune data convert --format F --data-dir D --to manifest --output "
                            "D/manifest.jsonl")  # fmt: skip
    _add_reading_options(c)
    c.add_argument("--to", choices=["manifest"], default="manifest", help="format to write (default: manifest)")
    c.add_argument("--output", required=True, help="manifest to write: .jsonl (a row per image) or .csv (per caption)")
    c.set_defaults(func=cmd_data_convert)
