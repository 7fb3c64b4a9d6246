"""Flickr8k as distributed: the original archive (`--format flickr8k`) and the Kaggle copy (`--format flickr8k-kaggle`).

Original: `Flickr8k.token.txt` (`<image>#<k><TAB><caption>`), the split files `Flickr_8k.{train,dev,test}Images.txt`
(in the data folder or in `Flickr8k_text/`) and the images in `Flicker8k_Dataset/` (sic) or `Flickr8k_Dataset/`.
Kaggle: `captions.txt` (CSV `image,caption`) and `Images/`, with no split files.
"""

from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass, field
from pathlib import Path

from captune.data import (
    SPLITS,
    CaptionSet,
    Listing,
    Problem,
    ReadOptions,
    find_images_dir,
    missing_annotations,
    read_text,
    resolve,
    seeded_split,
    usable,
)
from captune.errors import CaptuneError

TOKEN_FILE = "Flickr8k.token.txt"
TEXT_DIRS = (".", "Flickr8k_text")
SPLIT_FILES = {
    "train": "Flickr_8k.trainImages.txt",
    "val": "Flickr_8k.devImages.txt",
    "test": "Flickr_8k.testImages.txt",
}
IMAGE_DIRS = (
    "Flicker8k_Dataset",
    "Flickr8k_Dataset/Flicker8k_Dataset",
    "Flickr8k_Dataset/Flickr8k_Dataset",
    "Flickr8k_Dataset",
)
"""Where the archives unpack the images, most specific first (some unpack one folder deeper)."""
KAGGLE_CSV = "captions.txt"
KAGGLE_IMAGE_DIRS = ("Images",)

# The token file keys the captions of 2258277193_586949ec62.jpg as `2258277193_586949ec62.jpg.1#k`.
_STRAY_KEY = re.compile(r"(?P<base>.+\.jpg)\.\d+", re.IGNORECASE)


@dataclass
class _Captions:
    """Captions of one image as an annotation file gives them."""

    line: int
    """Line of the first row that names the image."""
    captions: list[str] = field(default_factory=list)


def read_flickr8k(data_dir: Path, options: ReadOptions) -> CaptionSet:
    """Read the original Flickr8k distribution with its official train/dev/test split files.

    Args:
        data_dir: Absolute dataset folder.
        options: `annotations` names the token file (split files are read beside it); `images_dir` the image folder.

    Returns:
        Records in split-file order (train, then val, then test); captioned images in no split file are counted in
        `unassigned`.

    Raises:
        CaptuneError: The token file, a split file or the image folder is not found.
    """
    token_file = _find_token_file(data_dir, options)
    split_files = {split: token_file.parent / name for split, name in SPLIT_FILES.items()}
    absent = [path for path in split_files.values() if not path.is_file()]
    if absent:
        raise missing_annotations("flickr8k", data_dir, absent)
    images_dir = find_images_dir(data_dir, options, IMAGE_DIRS)

    problems: list[Problem] = []
    notes: list[str] = []
    captions = _read_token_file(token_file, problems)
    _repair_stray_keys(captions, token_file, problems, notes)
    listed = _read_split_files(split_files, problems)
    records, unusable = usable(
        Listing(name, images_dir / name, captions[name].captions if name in captions else [], split, where)
        for name, (split, where) in listed.items()
    )
    problems += unusable
    unassigned = sum(1 for name in captions if name not in listed)
    return CaptionSet(records, problems, unassigned, notes)


def _find_token_file(data_dir: Path, options: ReadOptions) -> Path:
    if options.annotations is not None:
        candidates = [resolve(data_dir, options.annotations)]
    else:
        candidates = [data_dir / folder / TOKEN_FILE for folder in TEXT_DIRS]
    for path in candidates:
        if path.is_file():
            return path
    raise missing_annotations("flickr8k", data_dir, candidates)


def _read_token_file(path: Path, problems: list[Problem]) -> dict[str, _Captions]:
    """Captions by image key, from lines `<image>#<k><TAB><caption>`; a line that does not parse is a problem."""
    captions: dict[str, _Captions] = {}
    for number, line in enumerate(read_text(path).split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        key, tab, caption = line.partition("\t")
        name, hash_sign, k = key.strip().rpartition("#")
        if not tab:
            image = line.split("#")[0].strip() if "#" in line else f"{path.name}:{number}"
            problems.append(Problem(image, f"{where}: no tab between the image key and the caption"))
        elif not (hash_sign and name and k.isdigit()):
            problems.append(Problem(key.strip(), f"{where}: key {key.strip()!r} is not `<image>#<k>`"))
        else:
            entry = captions.setdefault(name, _Captions(number))
            if caption.strip():
                entry.captions.append(caption.strip())
            else:
                problems.append(Problem(name, f"{where}: empty caption"))
    return captions


def _repair_stray_keys(captions: dict[str, _Captions], path: Path, problems: list[Problem], notes: list[str]) -> None:
    """Give the captions of a key `<name>.jpg.<n>` to `<name>.jpg` when that image has none of its own."""
    for key in list(captions):
        match = _STRAY_KEY.fullmatch(key)
        if match is None:
            continue
        base = match["base"]
        entry = captions.pop(key)
        if base in captions:
            problems.append(
                Problem(
                    key,
                    f"{path}:{entry.line}: key {key!r} looks like a misspelling of {base!r}, which already has "
                    f"captions (line {captions[base].line}); its {len(entry.captions)} captions are not used",
                )
            )
        else:
            captions[base] = entry
            notes.append(
                f"{path}:{entry.line}: the {len(entry.captions)} captions keyed {key!r} are used for {base!r} "
                "(a known defect of the Flickr8k token file)"
            )


def _read_split_files(files: dict[str, Path], problems: list[Problem]) -> dict[str, tuple[str, str]]:
    """(split, `file:line`) by image name, in file order; an image listed twice stays where it was listed first."""
    listed: dict[str, tuple[str, str]] = {}
    for split, path in files.items():
        for number, line in enumerate(read_text(path).split("\n"), start=1):
            name = line.strip()
            if not name:
                continue
            where = f"{path}:{number}"
            if name in listed:
                first_split, first_where = listed[name]
                problems.append(Problem(name, f"{where}: also listed at {first_where}; kept in {first_split} only"))
            else:
                listed[name] = (split, where)
    return listed


def read_flickr8k_kaggle(data_dir: Path, options: ReadOptions) -> CaptionSet:
    """Read the Kaggle Flickr8k copy and split it by image with `options.seed`.

    The split depends only on the set of image names and the options, not on the row order of the CSV: the sorted
    names are shuffled with `random.Random(seed)`, then `round(n * test_fraction)` go to test, `round(n *
    val_fraction)` to val and the rest to train.

    Args:
        data_dir: Absolute dataset folder.
        options: Split seed and fractions; `annotations` names the CSV, `images_dir` the image folder.

    Returns:
        Records by split (train, val, test), sorted by image name within a split.

    Raises:
        CaptuneError: The CSV or the image folder is not found, or the CSV header is not `image,caption`.
    """
    csv_path = resolve(data_dir, options.annotations or KAGGLE_CSV)
    if not csv_path.is_file():
        raise missing_annotations("flickr8k-kaggle", data_dir, [csv_path])
    images_dir = find_images_dir(data_dir, options, KAGGLE_IMAGE_DIRS)

    problems: list[Problem] = []
    captions = _read_captions_csv(csv_path, problems)
    splits = seeded_split(list(captions), options)
    records, unusable = usable(
        Listing(name, images_dir / name, captions[name].captions, split, f"{csv_path}:{captions[name].line}")
        for split in SPLITS
        for name in sorted(name for name in captions if splits[name] == split)
    )
    problems += unusable
    counts = "/".join(str(list(splits.values()).count(split)) for split in SPLITS)
    note = (
        f"{csv_path.name} comes without split files: split its {len(splits)} images with seed {options.seed} "
        f"into train/val/test {counts}"
    )
    return CaptionSet(records, problems, notes=[note])


def _read_captions_csv(path: Path, problems: list[Problem]) -> dict[str, _Captions]:
    """Captions by image name from a CSV with the header `image,caption`."""
    rows = csv.reader(io.StringIO(read_text(path)))
    header = next(rows, None)
    if header is None or [cell.strip() for cell in header] != ["image", "caption"]:
        found = "an empty file" if header is None else repr(",".join(header))
        raise CaptuneError(
            f"{path}:1: expected the header 'image,caption' of the Kaggle Flickr8k captions.txt, found {found}"
        )
    captions: dict[str, _Captions] = {}
    try:
        for row in rows:
            _add_csv_row(row, path, rows.line_num, captions, problems)
    except csv.Error as exc:
        raise CaptuneError(f"{path}:{rows.line_num}: not readable as CSV: {exc}") from None
    return captions


def _add_csv_row(
    row: list[str], path: Path, line: int, captions: dict[str, _Captions], problems: list[Problem]
) -> None:
    """Add the caption of one CSV row to `captions`, or a problem if the row is not `image,caption`."""
    where = f"{path}:{line}"
    if not row:
        return
    if len(row) != 2:
        image = row[0].strip() or f"{path.name}:{line}"
        problems.append(Problem(image, f"{where}: expected 2 fields (image,caption), found {len(row)}; quote commas"))
        return
    name, caption = row[0].strip(), row[1].strip()
    if not name:
        problems.append(Problem(f"{path.name}:{line}", f"{where}: no image name"))
        return
    entry = captions.setdefault(name, _Captions(line))
    if caption:
        entry.captions.append(caption)
    else:
        problems.append(Problem(name, f"{where}: empty caption"))
