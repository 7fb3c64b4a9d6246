"""VQA datasets of Hugging Face `datasets` (`--format hf`): loaded as the caption reader loads them (a `save_to_disk`
folder, an `imagefolder`, a hub name), a question a row, with configurable columns.

Images are found or extracted exactly as for captions (`captune.data.hf`, the same cache): files are used where
they are, embedded bytes written once into `<captune cache>/hf-images/<fingerprint>/<split>/<row>.<ext>`; rows that
embed the same `path` in a split share one image. `answers` may be a list of strings, a list of `{"answer": ...}`
(VQAv2 on the hub), or a separated string; `answer` one answer.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm import tqdm

from captune.data.hf import BATCH_ROWS, _image_column, _key, _new_image, _notes, _Row, _Scan, opened
from captune.data.vqa import VqaReadOptions, VqaSet
from captune.data.vqa.rows import RowQuestions, row_of_cells
from captune.errors import CaptuneError

if TYPE_CHECKING:
    from datasets import Dataset


def read_vqa_hf(data_dir: Path, options: VqaReadOptions) -> VqaSet:
    """Read a Hugging Face VQA dataset: a `save_to_disk` folder, an `imagefolder`, or a name for `load_dataset`.

    Args:
        data_dir: Absolute dataset folder, or a dataset name (a path that does not exist).
        options: The image, question, answers / answer, split, question id and type columns; `seed` and the
            fractions split a dataset that has neither several splits nor a split column; `images_dir` is the
            folder relative image paths are relative to (default: the dataset folder).

    Returns:
        Questions by split in row order; a split's name is the dataset's (`validation` read as `val`) unless every
        split has the split column.

    Raises:
        CaptuneError: The dataset does not load, or lacks the image, question or answer columns.
    """
    sources, by_column, scan = opened(data_dir, options, _check_columns)
    collected = RowQuestions(scan.name, options)
    for source, dataset in sources:
        # Each row's split: its column, the split's name, or none (seeded) for a dataset of one split.
        fixed = None if by_column or len(sources) == 1 else source
        _scan_split(scan, collected, source, dataset, options, fixed)
    found = collected.vqa_set()
    return VqaSet(found.questions, scan.problems + found.problems, found.notes + _notes(scan))


def _check_columns(name: str, source: str, dataset: Dataset, options: VqaReadOptions) -> None:
    columns = dataset.column_names
    for option in ("image_column", "question_column"):
        if getattr(options, option) not in columns:
            raise CaptuneError(f"--format hf: {name} (split {source}) has no column {getattr(options, option)!r}; its "
                               f"columns are {', '.join(columns)}. Name it with data.{option}=COLUMN")  # fmt: skip
    if options.answers_column not in columns and options.answer_column not in columns:
        raise CaptuneError(f"--format hf: {name} (split {source}) has no column {options.answers_column!r} or "
                           f"{options.answer_column!r}; its columns are {', '.join(columns)}. Name one with "
                           "data.answers_column=COLUMN or data.answer_column=COLUMN")  # fmt: skip


def _scan_split(
    scan: _Scan, collected: RowQuestions, source: str, dataset: Dataset, options: VqaReadOptions, fixed: str | None
) -> None:
    """Add the rows of one split to `collected`; `fixed` is every row's split, or None to read the split column."""
    wanted = [options.image_column, options.question_column, options.answers_column, options.answer_column,
              options.split_column, options.question_id_column, options.answer_type_column,
              options.question_type_column]  # fmt: skip
    columns = [c for c in dict.fromkeys(wanted) if c in dataset.column_names]
    folder = scan.cache / source
    names = [p.name for p in folder.iterdir()] if folder.is_dir() else []
    existing = {name.split(".")[0]: folder / name for name in names if not name.startswith(".")}  # not temporary files
    images: dict[tuple[object, ...], tuple[Path, str]] = {}
    index = 0
    with tqdm(total=len(dataset), desc=f"reading {source}", unit="row", file=sys.stderr) as bar:
        for table in dataset.select_columns(columns).with_format("arrow").iter(batch_size=BATCH_ROWS):
            paths, blobs = _image_column(table.column(options.image_column))
            cells = {c: table.column(c).to_pylist() for c in columns if c != options.image_column}
            for offset, path in enumerate(paths):
                where = f"{scan.name}: {source} row {index}"
                image = _image(scan, _Row(source, index, where, path, blobs, offset, None, None), images, existing)
                if image is not None:  # else its image clashes with another's name: a problem in `scan` already
                    values = {column: cell[offset] for column, cell in cells.items()}
                    split = fixed if fixed is not None else values.get(options.split_column)
                    collected.add(row_of_cells(where, image, f"{source}/{index}", values, split, options))
                index += 1
            bar.update(len(paths))


def _image(
    scan: _Scan, row: _Row, images: dict[tuple[object, ...], tuple[Path, str]], existing: dict[str, Path]
) -> tuple[Path | None, str, str | None] | None:
    """The row's image (file, id, None) or why it has none (None, label, reason); None when its name clashes."""
    key = _key(scan, row)
    if isinstance(key, str):
        return None, f"{row.source}/{row.index}", key
    if key not in images:
        image = _new_image(scan, row, key, "", [], existing)
        if image is None:
            return None
        images[key] = (image.path.resolve(), image.image_id)
    return (*images[key], None)
