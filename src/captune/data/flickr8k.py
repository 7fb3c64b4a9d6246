"""Flickr8k as distributed: the original archive (`--format flickr8k`) and the Kaggle copy (`--format flickr8k-kaggle`).

Original: `Flickr8k.token.txt` (`<image>#<k><TAB><caption>`), the split files `Flickr_8k.{train,dev,test}Images.txt`
(in the data folder or in `Flickr8k_text/`) and the images in `Flicker8k_Dataset/` (sic) or `Flickr8k_Dataset/`.
Kaggle: `captions.txt` (CSV `image,caption`) and `Images/`, with no split files.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from captune.data import (
    SPLITS,
    CaptionSet,
    ImageNames,
    Problem,
    ReadOptions,
    find_images_dir,
    missing_annotations,
    read_text,
    resolve,
    seeded_split,
)
from captune.data.lines import csv_table, numbered_lines
from captune.data.listings import Listing, usable
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
    name: str = ""
    """The image as that row names it (Kaggle CSV)."""
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
    captions = _read_token_file(token_file, problems, notes)
    _repair_stray_keys(captions, token_file, problems, notes)
    listed = _read_split_files(split_files, problems)
    found = usable(
        Listing(name, images_dir / name, captions[name].captions if name in captions else [], split, where)
        for name, (split, where) in listed.items()
    )
    unassigned = sum(1 for name in captions if name not in listed)
    return CaptionSet(found.records, problems + found.problems, unassigned, notes + found.notes)


def _find_token_file(data_dir: Path, options: ReadOptions) -> Path:
    if options.annotations is not None:
        candidates = [resolve(data_dir, options.annotations)]
    else:
        candidates = [data_dir / folder / TOKEN_FILE for folder in TEXT_DIRS]
    for path in candidates:
        if path.is_file():
            return path
    raise missing_annotations("flickr8k", data_dir, candidates)


def _read_token_file(path: Path, problems: list[Problem], notes: list[str]) -> dict[str, _Captions]:
    """Captions by image key, from lines `<image>#<k><TAB><caption>`; a line that does not parse is a problem, and a
    note counts the keys that repeat an earlier one (their captions are used too)."""
    captions: dict[str, _Captions] = {}
    keys: dict[str, int] = {}
    repeated: list[tuple[int, str]] = []
    for number, line in numbered_lines(read_text(path)):
        where = f"{path}:{number}"
        key, tab, caption = line.partition("\t")
        name, hash_sign, k = key.strip().rpartition("#")
        if not tab:
            image = line.split("#")[0].strip() if "#" in line else f"{path.name}:{number}"
            problems.append(Problem(image, f"{where}: no tab between the image key and the caption"))
        elif "\t" in caption:
            # Lines run together (a lost line break) leave a caption that holds the next key and caption.
            problems.append(Problem(name or key.strip(), f"{where}: {line.count(chr(9)) + 1} tab-separated fields; a "
                                    "line is <image>#<k><TAB><caption>, one caption a line"))  # fmt: skip
        elif not (hash_sign and name and k.isdigit()):
            problems.append(Problem(key.strip(), f"{where}: key {key.strip()!r} is not `<image>#<k>`"))
        else:
            entry = captions.setdefault(name, _Captions(number))
            if key.strip() in keys:
                repeated.append((number, key.strip()))
            keys.setdefault(key.strip(), number)
            if caption.strip():
                entry.captions.append(caption.strip())
            else:
                problems.append(Problem(name, f"{where}: empty caption"))
    if repeated:
        number, key = repeated[0]
        notes.append(f"{path}: {len(repeated)} key(s) repeat an earlier key; the first: line {number} {key!r} (first "
                     f"at line {keys[key]}); their captions are used")  # fmt: skip
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
        for number, line in numbered_lines(read_text(path)):
            name = line.strip()
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
    names = ImageNames(csv_path, images_dir)
    captions = {names.canonical(key): entry for key, entry in _read_captions_csv(csv_path, names, problems).items()}
    splits = seeded_split(list(captions), options)
    found = usable(
        Listing(entry.name, resolve(images_dir, entry.name), entry.captions, split, f"{csv_path}:{entry.line}")
        for split in SPLITS
        for entry in (captions[name] for name in sorted(captions) if splits[name] == split)
    )
    counts = "/".join(str(list(splits.values()).count(split)) for split in SPLITS)
    note = (
        f"{csv_path.name} comes without split files: split its {len(splits)} images with seed {options.seed} "
        f"into train/val/test {counts}"
    )
    return CaptionSet(found.records, problems + found.problems, notes=[note, *names.notes(), *found.notes])


def _read_captions_csv(path: Path, names: ImageNames, problems: list[Problem]) -> dict[Path, _Captions]:
    """Captions by image (its resolved file) from a CSV with the header `image,caption`."""
    header, rows = csv_table(path)
    if header != ["image", "caption"]:
        found = "an empty file" if not header else repr(",".join(header))
        raise CaptuneError(
            f"{path}:1: expected the header 'image,caption' of the Kaggle Flickr8k captions.txt, found {found}"
        )
    captions: dict[Path, _Captions] = {}
    for row in rows:
        where = f"{path}:{row.line}"
        name = row.fields[0].strip() if row.fields else ""
        if row.error is not None:
            problems.append(Problem(name or f"{path.name}:{row.line}", f"{where}: {row.error}"))
        elif not name:
            problems.append(Problem(f"{path.name}:{row.line}", f"{where}: no image name"))
        else:
            key = names.key(name)
            names.use(key, name, row.line)
            entry = captions.setdefault(key, _Captions(row.line, name))
            if row.fields[1].strip():
                entry.captions.append(row.fields[1].strip())
            else:
                problems.append(Problem(name, f"{where}: empty caption"))
    return captions
