"""Custom data as a manifest (`--format manifest`): a CSV or JSON-lines file naming each image and its captions.

    {"image": "images/cat.jpg", "caption": ["A cat sleeps .", "A grey cat on a bed ."], "split": "train"}

    image,caption,split
    images/cat.jpg,A cat sleeps .,train

`image` is a path relative to the manifest's folder (or to `images_dir`), or absolute; `caption` a string (JSON
lines: also a list of strings); the optional `split` is `train`, `val` (`validation`, `dev`), `test` or `restval`, in
any case. Rows that name the same image (the same resolved file, however spelled) add to its captions. When no row
gives a split, images are split by the seeded fractions, as for `flickr8k-kaggle`. `write_manifest` writes any
`CaptionSet` in this format.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, NamedTuple

from captune.data import (
    SPLIT_ALIASES,
    SPLITS,
    CaptionSet,
    ImageNames,
    Problem,
    ReadOptions,
    Record,
    find_images_dir,
    missing_annotations,
    read_text,
    resolve,
    seeded_split,
)
from captune.data.lines import csv_table, numbered_lines
from captune.data.listings import Listing, usable
from captune.errors import CaptuneError
from captune.files import atomic_open

DEFAULT_FILES = ("manifest.jsonl", "manifest.csv")
"""Manifests looked for in the data folder, in this order, when `annotations` names none."""
SUFFIXES = {".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl"}
"""Manifest kind by file suffix (any case); a `.json` manifest holds JSON lines too."""
_REQUIRED = ("image_column", "caption_column")
"""Options naming the columns every manifest has."""


def read_manifest(data_dir: Path, options: ReadOptions) -> CaptionSet:
    """Read a CSV or JSON-lines manifest and the images it names.

    Args:
        data_dir: Absolute dataset folder.
        options: `annotations` names the manifest (default `manifest.jsonl`, then `manifest.csv`); `images_dir` the
            folder image paths are relative to (default: the manifest's folder); the column names; the split seed and
            fractions (used when no row gives a split); `restval`.

    Returns:
        Records in the order the manifest first names each image.

    Raises:
        CaptuneError: No manifest, an unknown suffix, a CSV header without the image or caption column, a JSON-lines
            file in which no row has one of them, a JSON array instead of JSON lines, or text that is not UTF-8.
    """
    if options.annotations is not None:
        candidates = [resolve(data_dir, options.annotations)]
    else:
        candidates = [data_dir / name for name in DEFAULT_FILES]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        raise missing_annotations("manifest", data_dir, candidates)
    parse = _csv_rows if manifest_kind(path) == "csv" else _jsonl_rows
    root = find_images_dir(data_dir, options, ()) if options.images_dir is not None else path.parent
    collected = _Collected(path, root, options)
    for row in parse(path, options):
        collected.add(row)
    return collected.caption_set()


def manifest_kind(path: Path) -> str:
    """`csv` or `jsonl`, by the suffix of `path`.

    Raises:
        CaptuneError: Any other suffix.
    """
    kind = SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise CaptuneError(f"{path}: a manifest is CSV or JSON lines; name it with one of {', '.join(SUFFIXES)}")
    return kind


class _Row(NamedTuple):
    """One manifest row as parsed: the values of the image, caption and split columns (None where absent)."""

    line: int
    image: object
    caption: object
    split: object
    error: str | None = None
    """Why the row could not be parsed at all (malformed JSON, not an object, wrong number of CSV fields)."""


def _csv_rows(path: Path, options: ReadOptions) -> Iterator[_Row]:
    """Rows of a CSV manifest; its header must have the image and caption columns, the split column is optional."""
    header, lines = csv_table(path)
    columns: dict[str, int] = {}
    for index, name in enumerate(header):
        columns.setdefault(name, index)
    for option in _REQUIRED:
        if getattr(options, option) not in columns:
            column = getattr(options, option)
            raise CaptuneError(f"{path}:1: no column {column!r} in the header; it {_has(header, option)}")
    image, caption = columns[options.image_column], columns[options.caption_column]
    split = columns.get(options.split_column)
    for row in lines:
        if row.error is not None:
            yield _Row(row.line, row.fields[image] if image < len(row.fields) else None, None, None, row.error)
        else:
            yield _Row(row.line, row.fields[image], row.fields[caption], None if split is None else row.fields[split])


def _jsonl_rows(path: Path, options: ReadOptions) -> Iterator[_Row]:
    """Rows of a JSON-lines manifest, one object per line; blank lines are skipped."""
    text = read_text(path)
    if text.lstrip().startswith("["):
        raise CaptuneError(f"{path}: holds a JSON array; a manifest has one JSON object per line (JSON lines)")
    decode = json.JSONDecoder().decode
    first: dict[str, object] | None = None
    has_image = has_caption = False
    for number, line in numbered_lines(text):
        try:
            value = decode(line)
        except json.JSONDecodeError as exc:
            yield _Row(number, None, None, None, f"not valid JSON: {exc.msg} (column {exc.colno})")
            continue
        if not isinstance(value, dict):
            yield _Row(number, None, None, None, f"expected a JSON object, found {_shown(value)}")
            continue
        first = value if first is None else first
        image, caption = value.get(options.image_column), value.get(options.caption_column)
        has_image, has_caption = has_image or image is not None, has_caption or caption is not None
        yield _Row(number, image, caption, value.get(options.split_column))
    # A column that no row has is a misnamed column, not a problem in every row.
    for option, present in zip(_REQUIRED, (has_image, has_caption), strict=True):
        if first is not None and not present:
            column = getattr(options, option)
            raise CaptuneError(f"{path}: no column {column!r} in any row; the first row {_has(first, option)}")


def _has(names: Iterable[str], option: str) -> str:
    """The end of a missing-column error: the columns there are, and the option that names the column."""
    found = ", ".join(repr(name) for name in names) or "nothing"
    return f"has {found}. Name the column with data.{option} / --{option.replace('_', '-')}"


def _shown(value: object) -> str:
    """A JSON value as the manifest shows it, cut to a readable length."""
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 60 else f"{text[:57]}..."


@dataclass(slots=True)
class _Split:
    """Rows of one image that give its split."""

    line: int
    """First of them."""
    split: str
    captions: list[str] = field(default_factory=list)


@dataclass(slots=True)
class _Unsplit:
    """Rows of one image that give no split."""

    lines: list[int] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)


class _Collected:
    """Captions by image (its resolved file), collected in one pass over the rows, with a problem for every row that
    is not used."""

    def __init__(self, path: Path, root: Path, options: ReadOptions) -> None:
        self.path, self.root, self.options = path, root, options
        # With restval `none`, restval images keep their own name and are left out at the end.
        # `restval` follows data.restval.
        self.split_names = SPLIT_ALIASES | ({"restval": "restval"} if options.restval == "none" else {})
        self.problems: list[Problem] = []
        self.names = ImageNames(path, root)
        self.with_split: dict[Path, _Split] = {}
        self.without_split: dict[Path, _Unsplit] = {}
        self.first_split: int | None = None
        """Line of the first row that gives a split (a valid one or not)."""
        self.restval: set[Path] = set()

    def problem(self, image: str, line: int, what: str) -> None:
        self.problems.append(Problem(image or f"{self.path.name}:{line}", f"{self.path}:{line}: {what}"))

    def add(self, row: _Row) -> None:
        """Add the captions of one row to its image, or a problem for the row."""
        name = row.image.strip() if isinstance(row.image, str) else ""
        if row.error is not None or not name:
            self.problem(name, row.line, row.error or self._no_image(row.image))
            return
        key = self.names.key(name)
        given = row.split.strip() if isinstance(row.split, str) else row.split
        split = None if given in (None, "") else self._split(key, name, row.line, given)
        if split == "":
            return  # an unknown or conflicting split: a problem already
        captions = self._captions(name, row.line, row.caption)
        if not captions:
            return
        self.names.use(key, name, row.line)
        if split is None:
            unsplit = self.without_split.setdefault(key, _Unsplit())
            unsplit.lines.append(row.line)
            unsplit.captions += captions
        else:
            self.with_split.setdefault(key, _Split(row.line, split)).captions += captions

    def _no_image(self, value: object) -> str:
        column = self.options.image_column
        if isinstance(value, str) or value is None:
            return f"no image path in {column!r}"
        return f"{column!r} is {_shown(value)}, not an image path"

    def _split(self, key: Path, name: str, line: int, given: object) -> str:
        """The split a row gives, or "" with a problem when it is unknown or differs from the image's earlier rows."""
        self.first_split = self.first_split or line
        spelling = given.lower() if isinstance(given, str) else None
        split = self.split_names.get(spelling) if spelling is not None else None
        if split is None:
            accepted = ", ".join(SPLIT_ALIASES)
            self.problem(name, line, f"split {given!r} is not one of {accepted} (in any case)")
            return ""
        earlier = self.with_split.get(key)
        if earlier is not None and earlier.split != split:
            first = self.names.first[key][0]
            same = f" (as {first!r}, the same file)" if first != name else ""
            self.problem(name, line, f"split {given!r} differs from {earlier.split!r} given at line {earlier.line}"
                                     f"{same}; an image belongs to one split, so this row is not used")  # fmt: skip
            return ""
        if spelling == "restval":
            self.restval.add(key)
        return split

    def _captions(self, name: str, line: int, value: object) -> list[str]:
        """The stripped captions of a row: a string or a list of strings; a problem for each one that is not usable."""
        column = self.options.caption_column
        if isinstance(value, str):
            if value.strip():
                return [value.strip()]
            self.problem(name, line, "empty caption")
            return []
        if value is None or value == []:
            self.problem(name, line, f"no caption in {column!r}")
            return []
        if not isinstance(value, list):
            self.problem(name, line, f"{column!r} is {_shown(value)}, not a string or a list of strings")
            return []
        captions = []
        for index, item in enumerate(value):
            if not isinstance(item, str):
                self.problem(name, line, f"{column}[{index}] is {_shown(item)}, not a string")
            elif not item.strip():
                self.problem(name, line, f"{column}[{index}] is an empty caption")
            else:
                captions.append(item.strip())
        return captions

    def caption_set(self) -> CaptionSet:
        """Records of the collected images whose files exist, with every problem and note."""
        notes: list[str] = []
        listed: list[tuple[Path, int, list[str], str]]
        if self.first_split is None:
            splits = {key: self.names.canonical(key) for key in self.without_split}
            split_of = seeded_split(list(splits.values()), self.options)
            listed = [(key, rows.lines[0], rows.captions, split_of[splits[key]])
                      for key, rows in self.without_split.items()]  # fmt: skip
            counts = "/".join(str(sum(1 for split in split_of.values() if split == name)) for name in SPLITS)
            notes.append(f"{self.path.name} gives no {self.options.split_column!r}: split its {len(split_of)} images "
                         f"with seed {self.options.seed} into train/val/test {counts}")  # fmt: skip
        else:
            for key, rows in self.without_split.items():
                for line in rows.lines:
                    self.problem(self.names.first[key][0], line, f"no split, though line {self.first_split} gives "
                                 "one; give every row a split, or none to split by the seed")  # fmt: skip
            listed = [(key, rows.line, rows.captions, rows.split) for key, rows in self.with_split.items()]
        if self.restval:
            fate = "left out (restval: none)" if self.options.restval == "none" else "joined train"
            notes.append(f"{self.path.name}: {len(self.restval)} 'restval' images {fate}")
        found = usable(
            Listing(self.names.first[key][0], resolve(self.root, self.names.first[key][0]), captions, split,
                    f"{self.path}:{line}")
            for key, line, captions, split in listed
            if split != "restval"
        )  # fmt: skip
        unassigned = len(self.restval) if self.options.restval == "none" else 0
        return CaptionSet(found.records, self.problems + found.problems, unassigned,
                          notes + self.names.notes() + found.notes)  # fmt: skip


def write_manifest(cs: CaptionSet, path: Path, *, relative_to: Path | None = None) -> int:
    """Write the records of `cs` as a manifest that `read_manifest` reads back to the same images, captions and splits.

    JSON lines (one row per image, `caption` a list) unless `path` ends in `.csv` (one row per caption). The file is
    written to a temporary file beside it and moved into place, so a reader never sees half a manifest.

    Args:
        cs: What a reader returned; its problems are not written.
        path: The manifest to write (`.jsonl`, `.json` or `.csv`); its folder is created.
        relative_to: Folder image paths are written relative to (default: the manifest's folder; read a manifest
            written with another folder with `images_dir` set to it). Images outside it are written absolute.

    Returns:
        The number of rows written.

    Raises:
        CaptuneError: `path` has another suffix.
    """
    path = Path(path).expanduser()
    kind = manifest_kind(path)
    root = Path(relative_to or path.parent).expanduser().resolve()
    images = [r.image_path.relative_to(root).as_posix() if r.image_path.is_relative_to(root) else str(r.image_path)
              for r in cs.records]  # fmt: skip
    with atomic_open(path, "w", encoding="utf-8", newline="") as out:
        return _write_rows(out, kind, zip(images, cs.records, strict=True))


def _write_rows(out: IO[str], kind: str, rows: Iterable[tuple[str, Record]]) -> int:
    """Write (image path, record) rows after the header (CSV); returns the number of rows."""
    count = 0
    if kind == "csv":
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["image", "caption", "split"])
        for image, record in rows:
            broken = next((caption for caption in record.captions if "\n" in caption or "\r" in caption), None)
            if broken is not None:
                # The CSV reader takes a line as a record, as a caption that runs over a line end is a broken quote.
                raise CaptuneError(f"{record.image_id}: caption {broken!r} holds a line break, which a CSV manifest "
                                   "cannot hold; write the manifest as .jsonl")  # fmt: skip
            writer.writerows([image, caption, record.split] for caption in record.captions)
            count += len(record.captions)
        return count
    for image, record in rows:
        row = {"image": image, "caption": list(record.captions), "split": record.split}
        out.write(json.dumps(row, ensure_ascii=False) + "\n")
        count += 1
    return count
