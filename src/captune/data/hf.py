"""Hugging Face `datasets` (`--format hf`): a `save_to_disk` folder, an `imagefolder`, or any `load_dataset` name.

A folder with `dataset_info.json` or `dataset_dict.json` is opened with `datasets.load_from_disk`; one with
`metadata.csv` or `metadata.jsonl` (a `file_name` column and caption columns beside the images) with
`load_dataset("imagefolder", data_dir=...)`; any other folder, or a name such as `nlphuji/flickr30k`, with
`load_dataset(name)`, which downloads into the Hugging Face cache on first use.

The image column (an `Image` feature or a path string) is read as stored, never decoded. Images that are files are
used where they are; images embedded as bytes (`save_to_disk`, hub parquet files) are written once into
`<captune cache>/hf-images/<fingerprint>/<split>/<row>.<ext>`, because every later step opens images by path.
"""

from __future__ import annotations

import hashlib
import io
import os
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from captune.data import (
    SPLIT_ALIASES,
    SPLITS,
    CaptionSet,
    Problem,
    ReadOptions,
    resolve,
    seeded_split,
)
from captune.data.lines import OPEN_QUOTE, csv_table
from captune.data.listings import Listing, usable
from captune.errors import CaptuneError
from captune.files import cache_dir, write_atomically

if TYPE_CHECKING:
    import pyarrow as pa
    from datasets import Dataset, DatasetDict

Options = TypeVar("Options", bound=ReadOptions)
"""A reader's options: the caption `ReadOptions` or the VQA reader's."""

SAVED_FILES = ("dataset_info.json", "dataset_dict.json")
"""Files `save_to_disk` writes: a folder with one of them is opened with `load_from_disk`."""
METADATA_FILES = ("metadata.csv", "metadata.jsonl")
"""Files of an `imagefolder`: a folder with one of them is opened with `load_dataset("imagefolder")`."""
BATCH_ROWS = 512
"""Rows read at a time; the image bytes of one batch are the most held in memory."""


@dataclass
class _Image:
    """An image as the rows give it, before it becomes a `Record`."""

    image_id: str
    path: Path
    split: str
    """One of `SPLITS` (train until the seeded split, where there is one, assigns them)."""
    where: str
    """The first row that names the image."""
    captions: list[str]


@dataclass
class _Scan:
    """What reading the rows of every split has found so far."""

    name: str
    """The dataset as the user named it: its folder or its hub name."""
    base: Path | None
    """Folder that relative image paths are relative to; None for a hub name without `images_dir`."""
    cache: Path
    """Folder of this dataset's extracted images."""
    local: Path | None
    """The dataset folder, whose files are named relative to it; None for a hub name."""
    images: dict[tuple[object, ...], _Image] = field(default_factory=dict)
    ids: dict[str, tuple[object, ...]] = field(default_factory=dict)
    """Image id -> key, so that two images with one name are caught."""
    problems: list[Problem] = field(default_factory=list)
    unused: dict[tuple[object, ...], str] = field(default_factory=dict)
    """Images of splits the reader does not use, with the split's name."""
    extracted: int = 0
    reused: int = 0


def read_hf(data_dir: Path, options: ReadOptions) -> CaptionSet:
    """Read a Hugging Face dataset: a `save_to_disk` folder, an `imagefolder` folder, or a name for `load_dataset`.

    Args:
        data_dir: Absolute dataset folder, or a name such as `nlphuji/flickr30k` (a path that does not exist).
        options: `image_column`, `caption_column` and `split_column` name the columns; `seed` and the fractions
            split a dataset that has neither several splits nor a split column; `images_dir` is the folder that
            relative image paths are relative to (default: the dataset folder).

    Returns:
        Records by split (train, val, test), in row order within a split. Rows that name the same image (the same
        path) make one record with all their captions.

    Raises:
        CaptuneError: The dataset does not load, or lacks the image or caption column.
    """
    sources, by_column, scan = opened(data_dir, options, _check_columns)
    seeded = not by_column and len(sources) == 1
    for source, dataset in sources:
        # Every row's split: a placeholder until the seeded split, the split's name, or None to read it per row.
        fixed = "train" if seeded else None if by_column else source
        _scan_split(scan, source, dataset, options, fixed)
    notes = [_split_by_seed(scan, sources[0][0], options)] if seeded else []
    notes += _notes(scan)
    found = usable(
        Listing(image.image_id, image.path, image.captions, image.split, image.where)
        for split in SPLITS
        for image in scan.images.values()
        if image.split == split
    )
    unassigned = len(scan.unused.keys() - scan.images.keys())
    return CaptionSet(found.records, scan.problems + found.problems, unassigned, notes + found.notes)


def opened(
    data_dir: Path, options: Options, check_columns: Callable[[str, str, Dataset, Options], None]
) -> tuple[list[tuple[str, Dataset]], bool, _Scan]:
    """A dataset loaded (`_load`) and its splits' columns checked, for the caption reader and the VQA reader: its
    splits as (name, dataset), whether every split has the split column, and an empty scan whose extracted images go
    to `<captune cache>/hf-images/<the splits' fingerprints>`."""
    name = str(data_dir)
    local = data_dir if data_dir.is_dir() else None
    sources = _sources(_load(data_dir, local is not None))
    for source, dataset in sources:
        check_columns(name, source, dataset, options)
    by_column = all(options.split_column in dataset.column_names for _, dataset in sources)
    images_dir = resolve(local or Path.cwd(), options.images_dir) if options.images_dir else None
    fingerprint = hashlib.sha256(" ".join(f"{s}={d._fingerprint}" for s, d in sources).encode()).hexdigest()[:16]
    return sources, by_column, _Scan(name, images_dir or local, cache_dir() / "hf-images" / fingerprint, local)


def _load(data_dir: Path, is_folder: bool) -> Dataset | DatasetDict:
    """The dataset, loaded the way its folder (or name) asks for."""
    import datasets

    if is_folder and any((data_dir / name).is_file() for name in METADATA_FILES):
        _check_metadata_csv(data_dir)
    try:
        if is_folder and any((data_dir / name).is_file() for name in SAVED_FILES):
            return datasets.load_from_disk(str(data_dir))
        if is_folder and any((data_dir / name).is_file() for name in METADATA_FILES):
            return datasets.load_dataset("imagefolder", data_dir=str(data_dir))
        loaded = datasets.load_dataset(str(data_dir))
    except Exception as exc:  # datasets raises many types (OSError, ValueError, its own); all mean "cannot load"
        reason = f"{type(exc).__name__}: {exc}".rstrip(". ")
        if is_folder:
            check = (
                "check that the folder holds a dataset saved with save_to_disk (dataset_info.json or "
                "dataset_dict.json), an imagefolder (the images and a metadata.csv or metadata.jsonl whose file_name "
                "column names them), or data files that datasets.load_dataset reads (parquet, arrow, csv, json)"
            )
        else:
            check = (
                "check the name (owner/name, as huggingface.co/datasets spells it) and that the hub can be reached: "
                "HF_HUB_OFFLINE and HF_DATASETS_OFFLINE must be unset until the dataset is in the local cache. A "
                "dataset that needs a configuration name or a login: load it in Python, save_to_disk, give the folder"
            )
        raise CaptuneError(f"--format hf: cannot load {data_dir}: {reason}. To fix, {check}") from None
    if not isinstance(loaded, datasets.Dataset | datasets.DatasetDict):
        raise CaptuneError(f"--format hf: {data_dir} loads as {type(loaded).__name__}; expected a Dataset(Dict)")
    return loaded


def _check_metadata_csv(data_dir: Path) -> None:
    """Refuse an imagefolder whose `metadata.csv` has a line with a quote not closed on it (as `csv_table` reads it).

    `datasets` reads the file with pandas, where such a quote takes the next lines into the caption, and the rows it
    takes are gone without a trace; captune cannot read the rest itself, so the first such line is an error.

    Raises:
        CaptuneError: The line, what is wrong and what to do.
    """
    for path in sorted(data_dir.rglob("metadata.csv")):
        _, rows = csv_table(path)
        bad = next((row for row in rows if row.error == OPEN_QUOTE), None)
        if bad is not None:
            raise CaptuneError(f"{path}:{bad.line}: {bad.error}")


def _sources(loaded: Dataset | DatasetDict) -> list[tuple[str, Dataset]]:
    """(split name, dataset) of each split; a lone `Dataset` is named by its split, else `data`."""
    if isinstance(loaded, dict):
        return list(loaded.items())
    return [(str(loaded.split) if loaded.split else "data", loaded)]


def _check_columns(name: str, source: str, dataset: Dataset, options: ReadOptions) -> None:
    for option, column in (("image_column", options.image_column), ("caption_column", options.caption_column)):
        if column not in dataset.column_names:
            raise CaptuneError(
                f"--format hf: {name} (split {source}) has no column {column!r}; its columns are "
                f"{', '.join(dataset.column_names)}. Name the {option.split('_')[0]} column with data.{option}=COLUMN"
            )


def _scan_split(scan: _Scan, source: str, dataset: Dataset, options: ReadOptions, fixed: str | None) -> None:
    """Add the images and captions of one split's rows to `scan`.

    `fixed` names the split of every row, or is None to read each row's split from `options.split_column`.
    """
    columns = [options.image_column, options.caption_column] + ([options.split_column] if fixed is None else [])
    table_rows = dataset.select_columns(columns).with_format("arrow")
    folder = scan.cache / source
    names = os.listdir(folder) if folder.is_dir() else []
    existing = {name.split(".")[0]: folder / name for name in names if not name.startswith(".")}  # not temporary files
    row = 0
    with tqdm(total=len(dataset), desc=f"reading {source}", unit="row", file=sys.stderr) as bar:
        for table in table_rows.iter(batch_size=BATCH_ROWS):
            paths, blobs = _image_column(table.column(options.image_column))
            captions = table.column(options.caption_column).to_pylist()
            splits = table.column(options.split_column).to_pylist() if fixed is None else [fixed] * len(paths)
            for offset, (path, caption, split) in enumerate(zip(paths, captions, splits, strict=True)):
                where = f"{scan.name}: {source} row {row + offset}"
                _add_row(scan, _Row(source, row + offset, where, path, blobs, offset, caption, split), existing)
            row += len(paths)
            bar.update(len(paths))


def _image_column(column: pa.ChunkedArray) -> tuple[list[object], pa.ChunkedArray | None]:
    """Each row's image path (or the value, when it is not a path) and the column's bytes, without decoding."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if pa.types.is_struct(column.type) and {"path", "bytes"} <= {f.name for f in column.type}:
        return pc.struct_field(column, "path").to_pylist(), pc.struct_field(column, "bytes")
    return column.to_pylist(), None


@dataclass
class _Row:
    """One row of a split, as `_add_row` needs it."""

    source: str
    index: int
    where: str
    path: object
    """The image path, or whatever the image column holds instead of an Image or a path."""
    blobs: pa.ChunkedArray | None
    """The batch's image bytes, None when the column holds paths."""
    offset: int
    """The row's position in `blobs`."""
    caption: object
    split: object

    def blob(self) -> bytes:
        """The embedded image; only for a row whose image `_key` found as bytes."""
        assert self.blobs is not None
        data: bytes = self.blobs[self.offset].as_py()
        return data


def _add_row(scan: _Scan, row: _Row, existing: dict[str, Path]) -> None:
    """Add one row's captions to its image in `scan`, or a problem naming the row."""
    split = _split(row.split)
    key = _key(scan, row)
    label = (
        _file_id(scan, Path(str(key[1])))
        if isinstance(key, tuple) and key[0] == "file"
        else f"{row.source}/{row.index}"
    )
    if split is None:
        scan.problems.append(Problem(label, f"{row.where}: split is {row.split!r}; expected train, validation or test"))
        return
    if isinstance(key, str):
        scan.problems.append(Problem(label, f"{row.where}: {key}"))
        return
    if split not in SPLITS:
        scan.unused.setdefault(key, split)
        return
    captions, caption_problems = _captions(row.caption)
    scan.problems += [Problem(label, f"{row.where}: {problem}") for problem in caption_problems]
    image = scan.images.get(key)
    if not captions:
        return
    if image is None:
        image = _new_image(scan, row, key, split, captions, existing)
        if image is not None:
            scan.images[key] = image
    elif image.split != split:
        clash = f"the image is in {image.split} already ({image.where}); this row puts it in {split}"
        scan.problems.append(Problem(image.image_id, f"{row.where}: {clash}: its captions are not used"))
    else:
        image.captions += captions


def _split(value: object) -> str | None:
    """The split a split name stands for (an unknown name as it is), or None if `value` is not a name."""
    if not isinstance(value, str) or not value.strip():
        return None
    return SPLIT_ALIASES.get(value.strip().lower(), value.strip())


def _captions(value: object) -> tuple[list[str], list[str]]:
    """The non-empty captions of a caption cell (a string or a list of strings), and a problem for each other one."""
    if isinstance(value, str):
        return ([value.strip()], []) if value.strip() else ([], ["empty caption"])
    if value is None:
        return [], ["no caption"]
    if not isinstance(value, list):
        return [], [f"caption is {type(value).__name__} {value!r}; expected a string or a list of strings"]
    if not value:
        return [], ["no caption (an empty list)"]
    good, bad = [], []
    for k, item in enumerate(value):
        if isinstance(item, str) and item.strip():
            good.append(item.strip())
        else:
            bad.append(f"caption [{k}] is {item!r}; expected text")
    return good, bad


def _key(scan: _Scan, row: _Row) -> tuple[object, ...] | str:
    """What identifies the row's image (its file, or its path or row for bytes), or why the row has no image."""
    if row.path is not None and not isinstance(row.path, str):
        return f"image is {type(row.path).__name__} {row.path!r}; expected an Image feature or a path string"
    file = _candidate(scan.base, row.path) if row.path else None
    if file is not None and file.is_file():
        return ("file", file.resolve())
    if row.blobs is not None and row.blobs[row.offset].is_valid:
        return ("bytes", row.source, row.path) if row.path else ("row", row.source, row.index)
    if file is not None:
        return f"image file missing: {file}"
    if row.path:
        return f"image file missing: {row.path} (relative: set data.images_dir to the folder it is relative to)"
    return "no image"


def _candidate(base: Path | None, path: str) -> Path | None:
    """Where the image file of `path` would be: itself if absolute, else under `base`; None without a base."""
    file = Path(path).expanduser()
    if file.is_absolute():
        return file
    return None if base is None else base / file


def _new_image(
    scan: _Scan, row: _Row, key: tuple[object, ...], split: str, captions: list[str], existing: dict[str, Path]
) -> _Image | None:
    """The image of `key`, its bytes written to the cache first if embedded; None, with a problem, on a name clash."""
    if key[0] == "file":
        path = Path(str(key[1]))
        image_id = _file_id(scan, path)
    else:
        if str(row.index) in existing:
            path = existing[str(row.index)]
            scan.reused += 1
        else:
            path = _extract(scan.cache / row.source, row.index, row.blob(), row.path)
            scan.extracted += 1
        image_id = f"{row.source}/{path.name}"
    if image_id in scan.ids:
        clash = f"another image has the same file name ({path}); rename one of them"
        scan.problems.append(Problem(image_id, f"{row.where}: {clash}"))
        return None
    scan.ids[image_id] = key
    return _Image(image_id, path, split, row.where, captions)


def _file_id(scan: _Scan, path: Path) -> str:
    """The image id of a file: its path relative to the dataset folder when inside it, else its name."""
    return str(path.relative_to(scan.local)) if scan.local and path.is_relative_to(scan.local) else path.name


def _extract(folder: Path, index: int, data: bytes, path: object) -> Path:
    """Write an embedded image to `folder/<index>.<ext>` atomically; the extension from its format, else its path."""
    try:
        with Image.open(io.BytesIO(data)) as image:  # reads the header only
            ext = (image.format or "").lower()
    except (UnidentifiedImageError, OSError):
        ext = ""  # `data check` reports the bytes as undecodable
    ext = ext or (Path(path).suffix.lstrip(".").lower() if isinstance(path, str) else "") or "bin"
    target = folder / f"{index}.{ext}"
    write_atomically(target, data)
    return target


def _split_by_seed(scan: _Scan, source: str, options: ReadOptions) -> str:
    """Give each image its split with `seeded_split`; the note that says so."""
    splits = seeded_split([image.image_id for image in scan.images.values()], options)
    for image in scan.images.values():
        image.split = splits[image.image_id]
    counts = "/".join(str(list(splits.values()).count(split)) for split in SPLITS)
    return (
        f"{scan.name} has one split ({source}) and no {options.split_column!r} column: split its {len(splits)} "
        f"images with seed {options.seed} into train/val/test {counts}"
    )


def _notes(scan: _Scan) -> list[str]:
    """Which splits were not used, and where embedded images went."""
    notes = []
    unused = Counter(scan.unused[key] for key in scan.unused.keys() - scan.images.keys())
    if unused:
        listing = ", ".join(f"{split!r} ({n} images)" for split, n in sorted(unused.items()))
        notes.append(
            f"{scan.name}: split(s) {listing} not used, counted as unassigned; the splits used are train (and "
            "restval), validation (val, dev) and test"
        )
    if scan.extracted or scan.reused:
        notes.append(
            f"{scan.name}: {scan.extracted} embedded images written to {scan.cache}, {scan.reused} found there "
            "from an earlier read"
        )
    return notes
