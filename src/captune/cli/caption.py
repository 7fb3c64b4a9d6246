"""`captune caption` and `captune eval`: caption images with a saved model, or caption and score a dataset split;
the generation flags they share and the config they caption with."""

from __future__ import annotations

import argparse
import contextlib
import csv
import itertools
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from captune.cli.output import output_path, print_metrics
from captune.config import Config
from captune.errors import CaptuneError

if TYPE_CHECKING:
    from captune.data import Record


def add_generation_options(parser: argparse.ArgumentParser, prompt: bool = True) -> None:
    """The generation flags of `caption`, `eval` and `ask` (`ask` has `--template` instead of `--prompt`)."""
    group = parser.add_argument_group("generation (defaults: the model's training config, else beam 5, 8-30 tokens)")
    group.add_argument("--num-beams", type=int, help="beam width; 1 is greedy")
    group.add_argument("--min-new-tokens", type=int, help="shortest caption in tokens")
    group.add_argument("--max-new-tokens", type=int, help="longest caption in tokens")
    group.add_argument("--repetition-penalty", type=float, help="1.0 is none")
    group.add_argument("--batch-size", type=int, help="images per generate call (default: captune picks it)")
    group.add_argument("--static-cache", action=argparse.BooleanOptionalAction, default=None,
                       help="force the static KV cache on or off (default: captune decides: on for long GPU runs; "
                       "on a GPU the decode step is compiled, faster in bulk)")  # fmt: skip
    if prompt:
        group.add_argument("--prompt", help="text the caption continues (default: the training prompt)")
    else:
        parser.set_defaults(prompt=None)
    group.add_argument("--merge-adapter", action="store_true",
                       help="merge the LoRA adapter into the base weights at load: no adapter layers per token "
                       "(generate 1.95x faster at batch 256 on an H100; in bf16 a caption can now and then differ "
                       "from base + adapter's)")  # fmt: skip
    group.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                       help="processes decoding images while the model captions (default: up to 8)")  # fmt: skip
    parser.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda, cuda:1, ...")


def run_config(args: argparse.Namespace) -> Config:
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


def cmd_caption(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from captune.generation.files import caption_paths, expand_inputs
    from captune.model_dir import load_model_dir

    config = run_config(args)
    output = output_path(args.output) if args.output else None
    paths, failures = expand_inputs(args.paths)
    skipped = 0
    if args.resume:
        if output is None or args.format != "jsonl":
            raise CaptuneError("--resume needs --output FILE and --format jsonl: it skips the images that file holds")
        # An image is its resolved file: a relative, absolute or linked spelling of one captioned before is done.
        done = {Path(image).expanduser().resolve() for image in written_values(output, "image", "captune caption")}
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


def written_values(path: Path, key: str, command: str) -> set:
    """The values of `key` in the lines a `--format jsonl` output of `command` already holds (the images `captune
    caption` captioned, the question ids `captune ask` answered); a line cut by a kill is removed so appending is
    safe.

    Raises:
        CaptuneError: a line that is not JSON holding `key`, naming the file and line.
    """
    if not path.exists():
        return set()
    data = path.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]
    if len(complete) != len(data):
        path.write_bytes(complete)
    values = set()
    for number, line in enumerate(complete.decode("utf-8", errors="replace").splitlines(), 1):
        try:
            values.add(json.loads(line)[key])
        except (json.JSONDecodeError, KeyError, TypeError):
            raise CaptuneError(
                f"{path}:{number}: not a line of `{command} --format jsonl`; --resume appends only to such a file"
            ) from None
    return values


def add_caption_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`captune caption` and its flags."""
    p = sub.add_parser("caption", help="caption images, folders or globs")
    p.add_argument("paths", nargs="+", help="image files, folders (searched recursively) or glob patterns")
    p.add_argument(
        "--model-dir", required=True, help="RUN/best, RUN/final, a checkpoint, or a plain BLIP-2 directory or hub id"
    )
    p.add_argument("--format", choices=["text", "jsonl", "csv"], default="text")
    p.add_argument("--output", help="write here instead of standard output")
    p.add_argument("--resume", action="store_true",
                   help="append to --output (jsonl), skipping the images it already holds")  # fmt: skip
    add_generation_options(p)
    p.set_defaults(func=cmd_caption)


def cmd_eval(args: argparse.Namespace) -> int:
    from captune.evaluation import evaluate_records, write_evaluation
    from captune.model_dir import load_model_dir

    # Split seed and folders default to the training run's, so "test" means the images the run held out.
    config = run_config(args)
    if args.split_seed is not None:
        config.data.split_seed = args.split_seed
    config.data.images_dir = args.images_dir or config.data.images_dir
    config.data.annotations = args.annotations or config.data.annotations
    if (args.task or config.data.task) == "vqa":
        return _eval_vqa(args, config)
    if args.task == "retrieval":
        return _eval_retrieval(args, config)
    records = _split_records(args, config)
    loaded = load_model_dir(args.model_dir, device=args.device, merge=args.merge_adapter)
    evaluation = evaluate_records(loaded.model, loaded.processor, records, config.generate, config.data.prompt,
                                  args.workers)  # fmt: skip
    output_dir = Path(args.output_dir or Path(args.model_dir) / f"eval-{args.split}")
    write_evaluation(output_dir, evaluation, records)
    print_metrics(evaluation.result)
    print(f"metrics, predictions and references in {output_dir}")
    return 0


def _eval_vqa(args: argparse.Namespace, config: Config) -> int:
    """`captune eval --task vqa`: answer a split's questions (the run's `data.question_template`), score them with
    the VQA accuracy, write metrics.json (the official shape), results.json (the official results list) and
    per_question.jsonl, and print the overall and per answer type accuracy."""
    import dataclasses

    from captune.config import read_options
    from captune.data.vqa import VQA_FORMATS, VqaReadOptions, check_vqa_images, read_vqa
    from captune.evaluation import evaluate_questions, write_vqa_evaluation
    from captune.model_dir import load_model_dir

    if args.data not in VQA_FORMATS:
        raise CaptuneError(f"--data {args.data}: not a VQA data format; choose one of: {', '.join(VQA_FORMATS)}")
    base = read_options(config.data)  # the run's split seed, fractions and folders; VQA columns at their defaults
    options = VqaReadOptions(**{f.name: getattr(base, f.name) for f in dataclasses.fields(base)})
    data = check_vqa_images(read_vqa(args.data, args.data_dir, options))
    questions = data.split(args.split)
    if args.max_images is not None:  # the questions of the split's first N images
        kept = list(dict.fromkeys(q.image_path for q in questions))[: args.max_images]
        questions = [q for q in questions if q.image_path in set(kept)]
    if data.problems:
        print(f"warning: {len(data.problems)} problem(s) in the data (captune data check lists them)", file=sys.stderr)
    if not questions:
        raise CaptuneError(f"{args.data_dir}: the {args.split} split has no usable questions")
    loaded = load_model_dir(args.model_dir, device=args.device, merge=args.merge_adapter)
    evaluation = evaluate_questions(loaded.model, loaded.processor, questions, config.generate,
                                    config.data.question_template, args.workers)  # fmt: skip
    output_dir = Path(args.output_dir or Path(args.model_dir) / f"eval-{args.split}")
    write_vqa_evaluation(output_dir, evaluation, questions)
    accuracy = evaluation.accuracy
    print(f"{'overall':8s} {accuracy.overall:.4f}  ({len(questions)} questions)")
    for kind, value in accuracy.per_answer_type.items():
        print(f"{kind:8s} {value:.4f}")
    print(f"metrics, results and per-question answers in {output_dir}")
    return 0


def _split_records(args: argparse.Namespace, config: Config) -> list[Record]:
    """The usable images of `--split` (the first `--max-images`), with a warning for what the data check left out."""
    from captune.config import read_options
    from captune.data import check_images, read

    captions = check_images(read(args.data, args.data_dir, read_options(config.data)))
    records = captions.split(args.split)[: args.max_images]
    if captions.problems:
        print(f"warning: {len(captions.problems)} problem(s) in the data; {captions.left_out()} image(s) left out "
              "(captune data check lists them)", file=sys.stderr)  # fmt: skip
    if not records:
        raise CaptuneError(f"{args.data_dir}: the {args.split} split has no usable images")
    return records


def _eval_retrieval(args: argparse.Namespace, config: Config) -> int:
    """`captune eval --task retrieval`: Recall@1/5/10 image->text and text->image on a split's images and captions
    (every caption of an image a match), contrastive alone and after the matching head re-ranked each query's top
    `--k-test`; writes metrics.json and prints both."""
    from captune.files import write_json
    from captune.retrieval import evaluate_retrieval, load_retrieval

    records = _split_records(args, config)
    if args.k_test is not None and args.k_test < 0:
        raise CaptuneError(f"--k-test {args.k_test}: give the candidates to re-rank (128, as LAVIS), or 0 for none")
    loaded = load_retrieval(args.model_dir, device=args.device)
    k_test = args.k_test if args.k_test is not None else 128
    result = evaluate_retrieval(loaded, records, batch_size=config.generate.batch_size or 64, k_test=k_test or None)
    recalls = {"contrastive": result.contrastive.as_dict()}
    if result.reranked is not None:
        recalls["reranked"] = result.reranked.as_dict()
    metrics = {"images": len(records), "texts": len(result.text_image), "k_test": k_test,
               "reranked": None, **recalls}  # fmt: skip
    output_dir = Path(args.output_dir or Path(args.model_dir) / f"eval-{args.split}")
    output_dir.mkdir(parents=True, exist_ok=True)
    write_json(output_dir / "metrics.json", metrics)
    for name, values in recalls.items():
        print(f"{name:11s} " + "  ".join(f"{key} {value:.2f}" for key, value in values.items()))
    print(f"metrics in {output_dir / 'metrics.json'} ({len(records)} images, {len(result.text_image)} captions)")
    return 0


def add_eval_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`captune eval` and its flags."""
    p = sub.add_parser("eval", help="caption a dataset split with a model and score it")
    p.add_argument("--model-dir", required=True)
    p.add_argument("--task", choices=["caption", "vqa", "retrieval"],
                   help="caption (COCO metrics), vqa (answer the split's questions, VQA accuracy) or retrieval "
                   "(Recall@K of a Blip2ForImageTextRetrieval or tiny-retrieval); default: the run's task")  # fmt: skip
    p.add_argument("--k-test", type=int,
                   help="--task retrieval: each query's top candidates re-ranked by the matching head (default 128, "
                   "as LAVIS; 0: contrastive only)")  # fmt: skip
    p.add_argument("--data", required=True, help="dataset format, as for data check --format")
    p.add_argument("--data-dir", required=True)
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--split-seed", type=int, help="split seed for layouts without split files (default: the run's)")
    p.add_argument("--images-dir", help="image folder, if not the layout's usual one (default: the run's)")
    p.add_argument("--annotations", help="annotation file name, if not the layout's usual one (default: the run's)")
    p.add_argument("--max-images", type=int,
                   help="score the first N images of the split only (vqa: their questions)")  # fmt: skip
    p.add_argument("--output-dir", help="default: MODEL_DIR/eval-SPLIT")
    add_generation_options(p)
    p.set_defaults(func=cmd_eval)
