"""`captune data check` and `captune data convert`: read a dataset (the reading flags they share), then decode and
summarise it, or write it as a manifest."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

from captune.cli.output import output_path

if TYPE_CHECKING:
    from captune.data import ReadOptions


# The reading flags of `data check` / `data convert`: each sets the `data` config field of the same name.
_READING_FIELDS = ("split_seed", "images_dir", "annotations", "restval", "image_column", "caption_column",
                   "split_column")  # fmt: skip


def _read_options(args: argparse.Namespace) -> ReadOptions:
    """The reader options of the flags `_add_reading_options` adds (the data config's defaults where none is given)."""
    from captune.config import DataConfig, read_options

    return read_options(DataConfig(**{name: getattr(args, name) for name in _READING_FIELDS}))


def cmd_data_check(args: argparse.Namespace) -> int:
    from captune.data import check_images, read, summary

    captions = check_images(read(args.format, args.data_dir, _read_options(args)), workers=args.workers,
                            sample=args.sample)  # fmt: skip
    result = summary(captions)
    text = json.dumps(result, indent=2)
    if args.output:
        output_path(args.output).write_text(text + "\n")
    print(text if not args.output else f"{result['images']} usable images, {len(captions.problems)} problem(s); "
          f"summary in {args.output}")  # fmt: skip
    return 1 if captions.problems else 0


def cmd_data_convert(args: argparse.Namespace) -> int:
    from captune.data import SPLITS, read
    from captune.data.manifest import manifest_kind, write_manifest

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


def add_data_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`captune data` and its subcommands `check` and `convert`, with their flags."""
    p = sub.add_parser("data", help="inspect datasets")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    c = data_sub.add_parser("check", help="read a dataset, decode every image, summarise and list problems")
    _add_reading_options(c)
    c.add_argument("--output", help="summary JSON to write")
    c.add_argument("--workers", type=int, help="decoding threads (default: all cores)")
    c.add_argument("--sample", type=int, help="decode a seeded sample of N images only")
    c.set_defaults(func=cmd_data_check)
    c = data_sub.add_parser("convert", help="read a dataset in any format and write it as a manifest",
                            description="captune data convert --format F --data-dir D --to manifest --output "
                            "D/manifest.jsonl")  # fmt: skip
    _add_reading_options(c)
    c.add_argument("--to", choices=["manifest"], default="manifest", help="format to write (default: manifest)")
    c.add_argument("--output", required=True, help="manifest to write: .jsonl (a row per image) or .csv (per caption)")
    c.set_defaults(func=cmd_data_convert)
