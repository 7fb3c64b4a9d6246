"""The `captune` command: train, caption, evaluate, eval, report, data check, data convert, merge, serve, demo.

Every subcommand is a thin shell over the Python API; `main(argv)` is called directly by the tests.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import itertools
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from captune.config import Config
from captune.errors import CaptuneError
from captune.files import check_writable

if TYPE_CHECKING:
    from captune.data import ReadOptions
    from captune.metrics import EvalResult

log = logging.getLogger("captune")


def _quiet_libraries() -> None:
    """Keeps the terminal for captune's own progress: no hub lookups offline, no weight-loading bars."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _add_generation_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("generation (defaults: the model's training config, else beam 5, 8-30 tokens)")
    group.add_argument("--num-beams", type=int, help="beam width; 1 is greedy")
    group.add_argument("--min-new-tokens", type=int, help="shortest caption in tokens")
    group.add_argument("--max-new-tokens", type=int, help="longest caption in tokens")
    group.add_argument("--repetition-penalty", type=float, help="1.0 is none")
    group.add_argument("--batch-size", type=int, help="images per generate call (default: captune picks it)")
    group.add_argument("--static-cache", action=argparse.BooleanOptionalAction, default=None,
                       help="force the static KV cache on or off (default: captune decides: on for long GPU runs; "
                       "on a GPU the decode step is compiled, faster in bulk)")  # fmt: skip
    group.add_argument("--prompt", help="text the caption continues (default: the training prompt)")
    group.add_argument("--merge-adapter", action="store_true",
                       help="merge the LoRA adapter into the base weights at load: no adapter layers per token "
                       "(generate 1.95x faster at batch 256 on an H100; in bf16 a caption can now and then differ "
                       "from base + adapter's)")  # fmt: skip
    group.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                       help="processes decoding images while the model captions (default: up to 8)")  # fmt: skip
    parser.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda, cuda:1, ...")


def _run_config(args: argparse.Namespace) -> Config:
    """The config a model was trained with (defaults for a plain BLIP-2), command-line generation options on top."""
    from captune.config import validate
    from captune.model_dir import saved_config

    config = saved_config(Path(args.model_dir).expanduser())
    for name in ("num_beams", "min_new_tokens", "max_new_tokens", "repetition_penalty", "batch_size", "static_cache"):
        value = getattr(args, name)
        if value is not None:
            setattr(config.generate, name, value)
    if args.prompt is not None:
        config.data.prompt = args.prompt
    if args.workers < 0:
        raise CaptuneError(f"--workers {args.workers}: give 0 (decode in this process) or more worker processes")
    validate(config)
    return config


def _output_path(name: str) -> Path:
    """The file an `--output` names, its folder created; a path that cannot be a file is an error, not a traceback."""
    path = Path(name).expanduser()
    if path.is_dir():
        raise CaptuneError(f"--output {path} is a folder; give a file name")
    check_writable(path.parent, "--output")
    return path


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
        kept = (
            f"best model (val CIDEr {state.best_cider:.4f}) in {out / 'best'}" if state.best_cider is not None else ""
        )
        print(f"done: {state.global_step} steps; {kept or 'no validation'}; last model in {out / 'final'}")
    return 0


def cmd_caption(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from captune.generation.files import caption_paths, expand_inputs
    from captune.model_dir import load_model_dir

    config = _run_config(args)
    output = _output_path(args.output) if args.output else None
    paths, failures = expand_inputs(args.paths)
    skipped = 0
    if args.resume:
        if output is None or args.format != "jsonl":
            raise CaptuneError("--resume needs --output FILE and --format jsonl: it skips the images that file holds")
        # An image is its resolved file: a relative, absolute or linked spelling of one captioned before is done.
        done = {Path(image).expanduser().resolve() for image in _captioned_images(output)}
        skipped = sum(1 for p in paths if p.resolve() in done)
        paths = [p for p in paths if p.resolve() not in done]
    loaded = load_model_dir(args.model_dir, device=args.device, merge=args.merge_adapter)
    ok = failed = 0
    # The bare caption only when the one input names the image itself; otherwise each line says which image it is.
    bare = len(args.paths) == 1 and paths == [Path(args.paths[0]).expanduser()] and not args.resume
    results = caption_paths(loaded.model, loaded.processor, paths, config.generate, config.data.prompt, args.workers)
    # Captions streamed to a file leave stderr free for a progress bar; on a log file it prints a line every 30 s.
    bar = tqdm(itertools.chain(failures, results), total=len(failures) + len(paths), unit="img", desc="captioning",
               disable=output is None, file=sys.stderr, mininterval=0.5 if sys.stderr.isatty() else 30.0)  # fmt: skip
    mode = "a" if args.resume else "w"
    with open(output, mode, newline="") if output else contextlib.nullcontext(sys.stdout) as out:
        writer = csv.writer(out) if args.format == "csv" else None
        if writer:
            writer.writerow(["image", "caption"])
        for result in bar:
            if result.error is not None:
                bar.write(f"error: {result.error}", file=sys.stderr)
                failed += 1
                continue
            ok += 1
            if writer:
                writer.writerow([result.image, result.caption])
            elif args.format == "jsonl":
                out.write(json.dumps({"image": result.image, "caption": result.caption}) + "\n")
            else:
                out.write(f"{result.caption}\n" if bare else f"{result.image}\t{result.caption}\n")
            out.flush()
    if skipped:
        print(f"--resume: {skipped} image(s) already in {output} were skipped", file=sys.stderr)
    if failed:
        print(f"captioned {ok} image(s); {failed} input(s) failed (listed above)", file=sys.stderr)
    return 1 if failed else 0


def _captioned_images(path: Path) -> set[str]:
    """The images a `--format jsonl` output already holds; a line cut by a kill is removed so appending is safe."""
    if not path.exists():
        return set()
    data = path.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]
    if len(complete) != len(data):
        path.write_bytes(complete)
    images = set()
    for number, line in enumerate(complete.decode("utf-8", errors="replace").splitlines(), 1):
        try:
            images.add(json.loads(line)["image"])
        except (json.JSONDecodeError, KeyError, TypeError):
            raise CaptuneError(
                f"{path}:{number}: not a line of `captune caption --format jsonl`; --resume appends only to such a file"
            ) from None
    return images


def cmd_evaluate(args: argparse.Namespace) -> int:
    from captune.metric_inputs import load_predictions, load_references
    from captune.metrics import per_image_rows, score_captions, write_metrics, write_per_image

    # Output paths are checked before the scorers run, not after.
    output = _output_path(args.output) if args.output else None
    per_image = _output_path(args.per_image) if args.per_image else None
    references, predictions = load_references(Path(args.references)), load_predictions(Path(args.predictions))
    result = score_captions(references, predictions, allow_missing=args.allow_missing, source=args.predictions,
                            per_image=per_image is not None, progress=True)  # fmt: skip
    if output:
        write_metrics(output, result)
    if per_image:
        write_per_image(per_image, per_image_rows(references, predictions, result))
    _print_metrics(result)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from captune.report import write_report

    print(f"report: {write_report(Path(args.run_dir))}")
    return 0


def _print_metrics(result: EvalResult) -> None:
    for name, value in result.metrics.items():
        print(f"{name:8s} {value:.4f}")
    for name, why in result.skipped.items():
        print(f"{name:8s} skipped: {why}")
    if result.missing:
        print(f"left out {len(result.missing)} image(s) without a prediction (--allow-missing)", file=sys.stderr)


def cmd_eval(args: argparse.Namespace) -> int:
    from captune.config import read_options
    from captune.data import check_images, read
    from captune.evaluation import evaluate_records, write_evaluation
    from captune.model_dir import load_model_dir

    # Split seed and folders default to the training run's, so "test" means the images the run held out.
    config = _run_config(args)
    if args.split_seed is not None:
        config.data.split_seed = args.split_seed
    config.data.images_dir = args.images_dir or config.data.images_dir
    config.data.annotations = args.annotations or config.data.annotations
    captions = check_images(read(args.data, args.data_dir, read_options(config.data)))
    records = captions.split(args.split)[: args.max_images]
    if captions.problems:
        print(f"warning: {len(captions.problems)} problem(s) in the data; {captions.left_out()} image(s) left out "
              "(captune data check lists them)", file=sys.stderr)  # fmt: skip
    if not records:
        raise CaptuneError(f"{args.data_dir}: the {args.split} split has no usable images")
    loaded = load_model_dir(args.model_dir, device=args.device, merge=args.merge_adapter)
    evaluation = evaluate_records(loaded.model, loaded.processor, records, config.generate, config.data.prompt,
                                  args.workers)  # fmt: skip
    output_dir = Path(args.output_dir or Path(args.model_dir) / f"eval-{args.split}")
    write_evaluation(output_dir, evaluation, records)
    _print_metrics(evaluation.result)
    print(f"metrics, predictions and references in {output_dir}")
    return 0


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
        _output_path(args.output).write_text(text + "\n")
    print(text if not args.output else f"{result['images']} usable images, {len(captions.problems)} problem(s); "
          f"summary in {args.output}")  # fmt: skip
    return 1 if captions.problems else 0


def cmd_data_convert(args: argparse.Namespace) -> int:
    from captune.data import SPLITS, read
    from captune.data.manifest import manifest_kind, write_manifest

    output = _output_path(args.output)
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


def cmd_merge(args: argparse.Namespace) -> int:
    from captune.export import merge_model_dir

    output = merge_model_dir(Path(args.model_dir), Path(args.output), dtype=args.dtype, overwrite=args.overwrite)
    print(f"merged model in {output}: Blip2ForConditionalGeneration.from_pretrained({str(output)!r}) loads it, "
          f"as does --model-dir {output}")  # fmt: skip
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from captune.data.synthetic import SyntheticSpec
    from captune.demo import run_demo

    spec = SyntheticSpec(train=args.train_images) if args.train_images else SyntheticSpec()
    result = run_demo(Path(args.output_dir), spec, args.overrides)
    print(f"CIDEr before fine-tuning {result.before['CIDEr']:.3f}, after {result.after['CIDEr']:.3f}")
    for image, caption in result.samples:
        print(f"  {image}: {caption}")
    print(f"metrics in {args.output_dir}/metrics.json; model in {args.output_dir}/model "
          f"(captune caption IMAGE --model-dir {args.output_dir}/model)")  # fmt: skip
    return 0


# The flags of `captune serve` that set the `ServeSettings` field of the same name (None keeps its default).
_SERVE_SETTINGS = ("device", "merge_adapter", "max_upload_bytes", "max_images", "max_image_pixels", "max_new_tokens",
                   "max_num_beams", "max_batch", "max_wait_ms", "max_queue", "retry_after_s", "idle_timeout_s",
                   "header_timeout_s", "body_timeout_s", "max_connections", "max_connections_per_client",
                   "warm_up")  # fmt: skip


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from captune.serve import ServeSettings, run_server
    except ImportError as err:
        raise CaptuneError(f"captune serve needs the serve extra ({err.name} is not installed): "
                           "pip install 'captune[serve]'") from None  # fmt: skip
    given = {name: getattr(args, name) for name in _SERVE_SETTINGS if getattr(args, name) is not None}
    run_server(args.model_dir, host=args.host, port=args.port, settings=ServeSettings(**given))
    return 0


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="captune", description="Fine-tune BLIP-2 for captioning; caption; score.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="fine-tune with LoRA", description="captune train --config C.yaml [key=value ...]")
    p.add_argument("--config", help="YAML config (see configs/)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. lr=3e-4 data_dir=~/data/flickr8k")
    p.add_argument("--skip-bad-images", action="store_true", help="train on usable images; report the rest")
    p.add_argument("--help-config", action="store_true", help="list every config key with its default")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("caption", help="caption images, folders or globs")
    p.add_argument("paths", nargs="+", help="image files, folders (searched recursively) or glob patterns")
    p.add_argument(
        "--model-dir", required=True, help="RUN/best, RUN/final, a checkpoint, or a plain BLIP-2 directory or hub id"
    )
    p.add_argument("--format", choices=["text", "jsonl", "csv"], default="text")
    p.add_argument("--output", help="write here instead of standard output")
    p.add_argument("--resume", action="store_true",
                   help="append to --output (jsonl), skipping the images it already holds")  # fmt: skip
    _add_generation_options(p)
    p.set_defaults(func=cmd_caption)

    p = sub.add_parser("evaluate", help="score COCO-format predictions against references")
    p.add_argument("--predictions", required=True, help='COCO results JSON: [{"image_id": ..., "caption": ...}]')
    p.add_argument("--references", required=True, help="COCO captions annotation JSON (images, annotations)")
    p.add_argument("--output", help="metrics JSON to write")
    p.add_argument("--allow-missing", action="store_true", help="score images that have predictions; count the rest")
    p.add_argument("--per-image", help="JSON lines to write: image id, prediction, references, BLEU-4, CIDEr")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("report", help="write RUN_DIR/report.html: curves, metrics, a gallery of val captions")
    p.add_argument("run_dir", help="a training run directory (train.output_dir)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("eval", help="caption a dataset split with a model and score it")
    p.add_argument("--model-dir", required=True)
    p.add_argument("--data", required=True, help="dataset format, as for data check --format")
    p.add_argument("--data-dir", required=True)
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--split-seed", type=int, help="split seed for layouts without split files (default: the run's)")
    p.add_argument("--images-dir", help="image folder, if not the layout's usual one (default: the run's)")
    p.add_argument("--annotations", help="annotation file name, if not the layout's usual one (default: the run's)")
    p.add_argument("--max-images", type=int, help="score the first N images of the split only")
    p.add_argument("--output-dir", help="default: MODEL_DIR/eval-SPLIT")
    _add_generation_options(p)
    p.set_defaults(func=cmd_eval)

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

    p = sub.add_parser("merge", help="merge the LoRA adapter into the base weights: a standalone BLIP-2 for serving",
                       description="captune merge --model-dir RUN/best --output DIR")  # fmt: skip
    p.add_argument("--model-dir", required=True, help="RUN/best, RUN/final or a checkpoint (base + adapter)")
    p.add_argument("--output", required=True, help="directory to write; must be absent or empty unless --overwrite")
    p.add_argument("--dtype", choices=["auto", "bf16", "fp16", "fp32"], default="auto",
                   help="weight dtype written (auto: fp32); the merge itself runs in fp32 on the CPU")  # fmt: skip
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("serve", help="serve captions over a REST API and a web page",
                       description="captune serve --model-dir RUN/best [--host 127.0.0.1] [--port 8000]; "
                       "page at /, API POST /v1/captions, OpenAPI at /openapi.json")  # fmt: skip
    p.add_argument(
        "--model-dir", required=True, help="RUN/best, RUN/final, a checkpoint, or a plain BLIP-2 directory or hub id"
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; the server has no "
                   "authentication, so expose it only behind one)")  # fmt: skip
    p.add_argument("--port", type=int, default=8000, help="1-65535 (default 8000)")
    p.add_argument("--device", help="auto (default: a GPU when there is one), cpu, cuda, cuda:1, ...")
    p.add_argument("--merge-adapter", action="store_true", default=None,
                   help="merge the LoRA adapter into the base weights at load (as captune caption)")  # fmt: skip
    group = p.add_argument_group("limits and batching")
    group.add_argument("--max-upload-bytes", type=int, help="largest request body (default 20 MiB); 413 beyond")
    group.add_argument("--max-images", type=int, help="images per request (default 16); 422 beyond")
    group.add_argument("--max-image-pixels", type=int, help="width x height of one image, checked before decoding "
                       "(default 40,000,000); 413 beyond")  # fmt: skip
    group.add_argument("--max-new-tokens", type=int, help="highest max_new_tokens a request may ask (default 100)")
    group.add_argument("--max-num-beams", type=int, help="widest beam a request may ask (default 10)")
    group.add_argument("--max-batch", type=int, help="images per generate call (default 16)")
    group.add_argument("--max-wait-ms", type=float, help="wait after the first queued image to fill a batch "
                       "(default 10)")  # fmt: skip
    group.add_argument("--max-queue", type=int, help="images admitted at once (default 64); 503 with Retry-After "
                       "beyond")  # fmt: skip
    group.add_argument("--retry-after-s", type=int, help="Retry-After of a 503, in seconds (default 1)")
    group = p.add_argument_group("connections (beyond a limit: 503 and closed; past a timeout: closed, 408 for a "
                                 "request under way)")  # fmt: skip
    group.add_argument("--idle-timeout-s", type=float, help="close a connection after this long without a byte "
                       "between requests or after it opens (default 5)")  # fmt: skip
    group.add_argument("--header-timeout-s", type=float, help="a request's headers must all come within this long "
                       "of its first byte (default 10)")  # fmt: skip
    group.add_argument("--body-timeout-s", type=float, help="a request's body must all come within this long of its "
                       "headers (default 60)")  # fmt: skip
    group.add_argument("--max-connections", type=int, help="open connections in all (default 256)")
    group.add_argument("--max-connections-per-client", type=int, help="open connections from one IP address "
                       "(default 32; behind a proxy, set it to --max-connections)")  # fmt: skip
    p.add_argument("--warm-up", action="store_true", default=None,
                   help="with a static-cache model: compile every batch size before taking requests")  # fmt: skip
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("demo", help="train, evaluate and caption on the built-in synthetic data")
    p.add_argument("--output-dir", default="demo-out")
    p.add_argument("--train-images", type=int, help="synthetic training images (default 1200)")
    p.add_argument("overrides", nargs="*", help="key=value overrides of configs/demo.yaml")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the CLI; bad input a user can fix prints `error: ...` and returns 2, never a traceback."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s",
                        stream=sys.stderr)  # fmt: skip
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _quiet_libraries()
    try:
        return int(args.func(args))
    except CaptuneError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except OSError as err:
        # A file the system refused (a folder made read-only, a full disk) is the user's to fix, not a traceback.
        if err.filename is None or err.strerror is None:
            raise
        print(f"error: {err.filename}: {err.strerror}; check its folder's permissions and free space, then run again",
              file=sys.stderr)  # fmt: skip
        return CaptuneError.exit_code


if __name__ == "__main__":
    sys.exit(main())
