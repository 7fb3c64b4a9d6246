"""`captune ask`: answer questions about images with a saved model, one image on the command line or a JSONL or CSV
file of questions in bulk (streamed, resumable), through the same bulk path as `captune caption`."""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from captune.cli.caption import add_generation_options, run_config, written_values
from captune.cli.output import output_path
from captune.config import Config
from captune.errors import CaptuneError

QUESTION_COLUMNS = ("image", "question", "question_id")
"""The fields of a row of a `--questions` file (`question_id` optional: the row's line by default)."""


@dataclass(frozen=True)
class AskRow:
    """One question of a `--questions` file."""

    question_id: int | str
    image: str
    """The image as the file names it (written back so)."""
    path: Path
    """The image file: the name as it is when absolute, else relative to the questions file's folder."""
    question: str


def read_questions(path: Path) -> tuple[list[AskRow], list[str]]:
    """The rows of a JSON lines (`.jsonl`) or CSV (`.csv`, with a header) file of questions, and a problem naming
    file and line for each row that cannot be used (a field missing or not text, a question id twice).

    Raises:
        CaptuneError: no such file, another suffix, not UTF-8, or a CSV file without the image and question columns.
    """
    from captune.files import read_utf8

    if not path.is_file():
        raise CaptuneError(f"--questions {path}: no such file; give a .jsonl or .csv file of image and question")
    if path.suffix.lower() not in (".jsonl", ".csv"):
        raise CaptuneError(
            f"--questions {path}: expected a .jsonl or .csv file (rows of {', '.join(QUESTION_COLUMNS)})"
        )
    text = read_utf8(path)
    cells = _csv_cells(path, text) if path.suffix.lower() == ".csv" else _jsonl_cells(path, text)
    rows: list[AskRow] = []
    problems: list[str] = []
    seen: dict[int | str, int] = {}
    for line, entry in cells:
        where = f"{path}:{line}"
        if isinstance(entry, str):
            problems.append(f"{where}: {entry}")
            continue
        row = _row(path, line, entry)
        if isinstance(row, str):
            problems.append(f"{where}: {row}")
        elif row.question_id in seen:
            problems.append(f"{where}: question_id {row.question_id!r} is also on line {seen[row.question_id]}; "
                            "give each question its own id")  # fmt: skip
        else:
            seen[row.question_id] = line
            rows.append(row)
    return rows, problems


def _jsonl_cells(path: Path, text: str) -> list[tuple[int, dict | str]]:
    """Each non-empty line's object, or what is wrong with it."""
    cells: list[tuple[int, dict | str]] = []
    for line, raw in enumerate(text.splitlines(), 1):
        if not raw.strip():
            continue
        try:
            value = json.loads(raw)
        except json.JSONDecodeError as err:
            cells.append((line, f"not JSON ({err.msg}); each line is an object with image and question"))
            continue
        cells.append((line, value if isinstance(value, dict) else "not an object with image and question"))
    return cells


def _csv_cells(path: Path, text: str) -> list[tuple[int, dict | str]]:
    """Each row as a dict by the header's names, with the line it starts on."""
    reader = csv.DictReader(io.StringIO(text))
    missing = [c for c in QUESTION_COLUMNS[:2] if c not in (reader.fieldnames or [])]
    if missing:
        raise CaptuneError(f"{path}:1: the header lacks {' and '.join(missing)}; name the columns "
                           f"{', '.join(QUESTION_COLUMNS)} (question_id optional)")  # fmt: skip
    cells: list[tuple[int, dict | str]] = []
    start = reader.line_num + 1
    for entry in reader:
        cells.append((start, {k: v for k, v in entry.items() if k is not None and v != ""}))
        start = reader.line_num + 1
    return cells


def _row(path: Path, line: int, entry: dict) -> AskRow | str:
    """The question of one entry, or what is wrong with it."""
    for name in QUESTION_COLUMNS[:2]:
        value = entry.get(name)
        if not isinstance(value, str) or not value.strip():
            found = "missing" if name not in entry else f"{json.dumps(value)}"
            return f"{name} is {found}; expected text"
    question_id = entry.get("question_id", line)
    if isinstance(question_id, bool) or not isinstance(question_id, int | str):
        return f"question_id is {json.dumps(question_id)}; expected an integer or a string"
    image = entry["image"].strip()
    where = Path(image).expanduser()
    return AskRow(question_id, image, where if where.is_absolute() else path.parent / where, entry["question"].strip())


def cmd_ask(args: argparse.Namespace) -> int:
    from captune.config import validate

    config = run_config(args)
    if args.format is None:  # results.json: the official list; anything else a line per question
        args.format = "official" if args.output and args.output.endswith(".json") else "jsonl"
    if args.template is not None:
        config.data.question_template = args.template
        validate(config)
    template = config.data.question_template
    if args.questions is None:
        return _ask_one(args, config, template)
    return _ask_file(args, config, template)


def _ask_one(args: argparse.Namespace, config: Config, template: str) -> int:
    """`captune ask IMAGE --question Q [--question Q2 ...]`: each answer on a line of its own."""
    from captune.generation.files import caption_paths
    from captune.model_dir import load_model_dir

    if args.image is None or not args.question:
        raise CaptuneError("give an image and --question TEXT, or --questions FILE (.jsonl or .csv) for many")
    if args.output or args.resume or args.format == "official":
        raise CaptuneError("--output, --resume and --format go with --questions FILE; one image's answers are printed")
    image = Path(args.image).expanduser()
    loaded = load_model_dir(args.model_dir, device=args.device, merge=args.merge_adapter)
    prompts = [template.format(q.strip()) for q in args.question]
    results = caption_paths(loaded.model, loaded.processor, [image] * len(prompts), config.generate, prompts,
                            args.workers)  # fmt: skip
    for result in results:
        if result.error is not None:
            raise CaptuneError(result.error)
        print(result.caption)
    return 0


def _ask_file(args: argparse.Namespace, config: Config, template: str) -> int:
    """`captune ask --questions FILE`: every row answered, streamed to --output (or standard output)."""
    from captune.files import progress_bar, write_json
    from captune.generation.files import caption_paths
    from captune.model_dir import load_model_dir

    if args.image is not None or args.question:
        raise CaptuneError("give either an image with --question, or --questions FILE, not both")
    output = output_path(args.output) if args.output else None
    rows, problems = read_questions(Path(args.questions).expanduser())
    if not rows and not problems:
        raise CaptuneError(f"--questions {args.questions}: holds no questions")
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    skipped = 0
    if args.resume:
        if output is None or args.format != "jsonl":
            raise CaptuneError(
                "--resume needs --output FILE and --format jsonl: it skips the questions that file holds"
            )
        done = written_values(output, "question_id", "captune ask")
        skipped = sum(1 for r in rows if r.question_id in done)
        rows = [r for r in rows if r.question_id not in done]
    loaded = load_model_dir(args.model_dir, device=args.device, merge=args.merge_adapter)
    prompts = [template.format(r.question) for r in rows]
    results = caption_paths(loaded.model, loaded.processor, [r.path for r in rows], config.generate, prompts,
                            args.workers)  # fmt: skip
    official: list[dict[str, object]] = []
    failed = 0
    bar = progress_bar(len(rows), "answering", enabled=output is not None)
    with open(output, "a" if args.resume else "w") if output and args.format == "jsonl" else (
        contextlib.nullcontext(sys.stdout)
    ) as out:  # fmt: skip
        for row, result in zip(rows, results, strict=True):
            bar.update()
            if result.error is not None:
                bar.write(f"error: question {row.question_id!r}: {result.error}", file=sys.stderr)
                failed += 1
                continue
            if args.format == "official":
                official.append({"question_id": row.question_id, "answer": result.caption})
                continue
            line = {"question_id": row.question_id, "image": row.image, "question": row.question,
                    "answer": result.caption}  # fmt: skip
            out.write(json.dumps(line, ensure_ascii=False) + "\n")  # one write a line: a kill leaves whole lines
            out.flush()
    bar.close()
    if args.format == "official":
        if output is not None:
            write_json(output, official)  # the whole list at once: a kill leaves the old file or the new one
        else:
            print(json.dumps(official, indent=2))
    if skipped:
        print(f"--resume: {skipped} question(s) already in {output} were skipped", file=sys.stderr)
    if failed or problems:
        print(f"answered {len(rows) - failed} question(s); {failed} failed and {len(problems)} row(s) of "
              f"{args.questions} could not be used (listed above)", file=sys.stderr)  # fmt: skip
    return 1 if failed or problems else 0


def add_ask_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`captune ask` and its flags."""
    p = sub.add_parser("ask", help="answer questions about images")
    p.add_argument("image", nargs="?", help="the image to ask about (with --question)")
    p.add_argument("--question", action="append", default=[], help="a question about IMAGE (repeat for more)")
    p.add_argument("--questions", help="a .jsonl or .csv file of rows: image, question, optional question_id "
                   "(an image relative to the file's folder; questions of one image on consecutive rows share its "
                   "decoding)")  # fmt: skip
    p.add_argument(
        "--model-dir", required=True, help="RUN/best, RUN/final, a checkpoint, or a plain BLIP-2 directory or hub id"
    )
    p.add_argument("--format", choices=["jsonl", "official"],
                   help="jsonl: a line per question {question_id, image, question, answer}, streamed; official: the "
                   "VQA results list [{question_id, answer}], written at the end (default: official for an --output "
                   "ending in .json, else jsonl)")  # fmt: skip
    p.add_argument("--output", help="write here instead of standard output")
    p.add_argument("--resume", action="store_true",
                   help="append to --output (jsonl), skipping the question ids it already holds")  # fmt: skip
    p.add_argument("--template", help="the prompt, {} the question (default: the run's data.question_template)")
    add_generation_options(p, prompt=False)
    p.set_defaults(func=cmd_ask)
