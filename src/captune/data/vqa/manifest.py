"""Your own VQA data as a manifest (`--format manifest`): a CSV or JSON-lines file, a question (or an answer) a row.

    {"image": "images/kitchen.jpg", "question": "What is on the table?", "answers": ["a cup", "cup", "mug"],
     "split": "train"}

    image,question,answers,split
    images/kitchen.jpg,What is on the table?,a cup|cup|mug,train

`image` is a path relative to the manifest's folder (or to `images_dir`), or absolute; `answers` a list (JSON
lines) or answers separated by `|` (`answer_separator`), or `answer` one answer; rows of the same question (the
same `question_id`, or the same image and question) add their answers. Optional columns: `split`, `question_id`,
`answer_type`, `question_type`. As for captions, a CSV record is one line, and without any split the images are
split by the seeded fractions.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path

from captune.data import ImageNames, find_images_dir, read_text, resolve
from captune.data.lines import csv_table, numbered_lines
from captune.data.manifest import manifest_kind
from captune.data.vqa import VqaReadOptions, VqaSet
from captune.data.vqa.rows import Row, RowQuestions, row_of_cells
from captune.errors import CaptuneError

DEFAULT_FILES = ("questions.jsonl", "questions.csv")
"""Manifests looked for in the data folder, in this order, when `annotations` names none."""


def read_vqa_manifest(data_dir: Path, options: VqaReadOptions) -> VqaSet:
    """Read a CSV or JSON-lines VQA manifest and the images it names.

    Args:
        data_dir: Absolute dataset folder.
        options: `annotations` names the manifest (default `questions.jsonl`, then `questions.csv`); `images_dir`
            the folder image paths are relative to (default: the manifest's folder); the column names and the
            answer separator; the split seed and fractions (used when no row gives a split).

    Returns:
        Questions in the order the manifest first names each.

    Raises:
        CaptuneError: No manifest, an unknown suffix, a CSV header without the image, question or answer columns,
            a JSON-lines file in which no row has one of them, or text that is not UTF-8.
    """
    given = options.annotations
    candidates = [resolve(data_dir, given)] if given is not None else [data_dir / name for name in DEFAULT_FILES]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        raise CaptuneError(f"--format manifest: no VQA manifest; looked for {', '.join(map(str, candidates))}. Name "
                           "it with --annotations, or give the manifest file as the data folder")  # fmt: skip
    root = find_images_dir(data_dir, options, ()) if options.images_dir is not None else path.parent
    names = ImageNames(path, root)
    collected = RowQuestions(path.name, options)
    cells = _csv_cells if manifest_kind(path) == "csv" else _jsonl_cells
    for line, values, error in cells(path, options):
        collected.add(_row(path, line, values, error, names, options))
    found = collected.vqa_set()
    return VqaSet(found.questions, found.problems, found.notes + names.notes())


def _row(
    path: Path, line: int, values: Mapping[str, object], error: str | None, names: ImageNames, options: VqaReadOptions
) -> Row:
    """One manifest line as a `Row`; its image named by the resolved file (`ImageNames`)."""
    image = values.get(options.image_column)
    name = image.strip() if isinstance(image, str) else ""
    found: tuple[Path | None, str, str | None] = (None, name, error)
    if error is None and not name:
        found = (None, name, f"no image path in {options.image_column!r}")
    elif error is None:
        key = names.key(name)
        names.use(key, name, line)
        found = (resolve(names.root, names.first[key][0]), names.canonical(key), None)
    return row_of_cells(f"{path}:{line}", found, line, values, values.get(options.split_column), options)


Cells = Iterator[tuple[int, Mapping[str, object], str | None]]
"""(line, column -> value, why the line is not a row)."""


def _columns(options: VqaReadOptions) -> tuple[str, str]:
    return options.image_column, options.question_column


def _missing_answers(path: Path, names: object, options: VqaReadOptions) -> CaptuneError:
    return CaptuneError(f"{path}: no column {options.answers_column!r} or {options.answer_column!r}; it has {names}. "
                        "Name the column with data.answers_column / data.answer_column")  # fmt: skip


def _csv_cells(path: Path, options: VqaReadOptions) -> Cells:
    """The lines of a CSV manifest as cells by column; empty cells are absent (None)."""
    header, lines = csv_table(path)
    for column in _columns(options):
        if column not in header:
            raise CaptuneError(f"{path}:1: no column {column!r} in the header; it has {header}. Name the column with "
                               "data.image_column / data.question_column")  # fmt: skip
    if options.answers_column not in header and options.answer_column not in header:
        raise _missing_answers(path, header, options)
    for row in lines:
        values = {name: cell for name, cell in zip(header, row.fields, strict=False) if cell.strip()}
        yield row.line, values, row.error


def _jsonl_cells(path: Path, options: VqaReadOptions) -> Cells:
    """The lines of a JSON-lines manifest, one object each; blank lines are skipped."""
    text = read_text(path)
    if text.lstrip().startswith("["):
        raise CaptuneError(f"{path}: holds a JSON array; a manifest has one JSON object per line (JSON lines)")
    seen: set[str] = set()
    first: list[str] | None = None
    for number, line in numbered_lines(text):
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            yield number, {}, f"not valid JSON: {exc.msg} (column {exc.colno})"
            continue
        if not isinstance(value, dict):
            yield number, {}, f"expected a JSON object, found {type(value).__name__}"
            continue
        first = first if first is not None else list(value)
        seen.update(value)
        yield number, value, None
    # A column that no row has is a misnamed column, not a problem in every row.
    if first is not None:
        for column in _columns(options):
            if column not in seen:
                raise CaptuneError(f"{path}: no column {column!r} in any row; the first row has {first}")
        if options.answers_column not in seen and options.answer_column not in seen:
            raise _missing_answers(path, first, options)
