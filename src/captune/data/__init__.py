"""Caption datasets: one small reader per on-disk layout, behind a name registry.

Every reader turns a folder into a `CaptionSet`: records (one per image, with all its captions and its split) and
problems (anything that could not be used, named by image file and reason). Nothing is dropped without a `Problem`
or a note that counts it; an image is its resolved file (`listings.usable`).

    cs = read("flickr8k", "~/data/flickr8k")
    cs = check_images(cs)  # decode every image; failures move from records to problems
    print(summary(cs))
"""

from __future__ import annotations

import dataclasses
import gc
import importlib
import json
import os
import random
import sys
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from captune.data.images import ImageError, load_rgb
from captune.errors import CaptuneError
from captune.files import read_utf8

SPLITS = ("train", "val", "test")
SPLIT_ALIASES = {"train": "train", "val": "val", "validation": "val", "dev": "val", "test": "test", "restval": "train"}
"""Split of each accepted spelling of a split column (manifests, Hugging Face datasets), lower case; `restval`
(Karpathy's extra training images) joins train."""


@dataclass(frozen=True)
class Record:
    """One image and its reference captions."""

    image_id: str
    """Stable identifier: the image file name as the dataset names it (e.g. `1000268201_693b08cb0e.jpg`)."""
    image_path: Path
    """Absolute path of the image file."""
    captions: tuple[str, ...]
    """Reference captions, stripped, in file order."""
    split: str
    """One of `SPLITS`; `dev` in source files is reported as `val`."""


@dataclass(frozen=True)
class Problem:
    """Something a reader or the image check could not use."""

    image: str
    """Image file name (or the row's identifier when there is no file name)."""
    problem: str
    """What is wrong, with the file and line where known, and what to do."""


@dataclass
class CaptionSet:
    """What a reader returns."""

    records: list[Record]
    problems: list[Problem] = field(default_factory=list)
    unassigned: int = 0
    """Captioned images that belong to no split (e.g. the 91 Flickr8k images outside the official split files)."""
    notes: list[str] = field(default_factory=list)
    """Informational messages: repaired known defects, how a split was made, what the image check covered."""

    def split(self, name: str) -> list[Record]:
        """Records of one split, in reader order."""
        return [r for r in self.records if r.split == name]

    def left_out(self) -> int:
        """Images named by a problem and not among the records: fewer than the problems when an image has several,
        or a problem (a bad caption line) left its image in."""
        kept = {r.image_id for r in self.records}
        return len({p.image for p in self.problems} - kept)


@dataclass(frozen=True)
class ReadOptions:
    """How a reader finds and splits a dataset."""

    seed: int = 0
    """Seed of the image-level split for layouts without split files (`flickr8k-kaggle`)."""
    val_fraction: float = 0.125
    """Share of images in `val` for layouts without split files (0.125: about 1000 of the 8091 Flickr8k images)."""
    test_fraction: float = 0.125
    """Share of images in `test` for layouts without split files."""
    images_dir: str | None = None
    """Image folder, relative to the data folder or absolute; by default each reader looks in the usual places."""
    annotations: str | None = None
    """Annotation file, relative to the data folder or absolute: the token file (`flickr8k`, split files are read beside
    it), the CSV (`flickr8k-kaggle`), which `dataset_*.json` (`karpathy`), the `captions_train*.json` of `coco` (its
    `captions_val*.json` is read beside it) or the manifest file (`manifest`)."""
    restval: str = "train"
    """Where Karpathy's COCO `restval` images go: `train` (the usual practice) or `none` (left out, counted in
    `unassigned`)."""
    image_column: str = "image"
    """Column holding the image (`manifest`: its path, relative to the manifest; `hf`: an Image feature or a path)."""
    caption_column: str = "caption"
    """Column holding the caption: a string, or (JSON lines, `hf`) a list of strings."""
    split_column: str = "split"
    """Optional column naming each row's split (`train`, `val`/`validation`/`dev`, `test`, `restval`); without it
    images are split by the seeded fractions above (`hf`: by the dataset's own splits when it has several)."""

    def __post_init__(self) -> None:
        for name in ("val_fraction", "test_fraction"):
            value = getattr(self, name)
            if not 0 <= value < 1:
                raise CaptuneError(f"{name} is {value}; it must be at least 0 and below 1")
        if self.restval not in ("train", "none"):
            raise CaptuneError(f"restval is {self.restval!r}; choose 'train' or 'none'")
        if self.val_fraction + self.test_fraction >= 1:
            raise CaptuneError(
                f"val_fraction + test_fraction is {self.val_fraction + self.test_fraction}; it must be below 1 "
                "so that some images are left to train on"
            )


Reader = Callable[[Path, ReadOptions], CaptionSet]


def _lazy(module: str, function: str) -> Reader:
    """A reader that imports `captune.data.<module>` only when called, so one layout's module never costs another."""

    def reader(data_dir: Path, options: ReadOptions) -> CaptionSet:
        read_layout: Reader = getattr(importlib.import_module(f"captune.data.{module}"), function)
        return read_layout(data_dir, options)

    reader.__name__ = function
    return reader


FORMATS: dict[str, Reader] = {
    "flickr8k": _lazy("flickr8k", "read_flickr8k"),
    "flickr8k-kaggle": _lazy("flickr8k", "read_flickr8k_kaggle"),
    "karpathy": _lazy("karpathy", "read_karpathy"),
    "coco": _lazy("coco", "read_coco"),
    "manifest": _lazy("manifest", "read_manifest"),
    "hf": _lazy("hf", "read_hf"),
    "synthetic": _lazy("synthetic", "read_synthetic"),
}
"""Reader of each `--format` name."""

_LAYOUT_FILES: dict[str, tuple[str, ...]] = {
    "flickr8k": ("Flickr8k.token.txt", "Flickr8k_text/Flickr8k.token.txt"),
    "flickr8k-kaggle": ("captions.txt",),
    "karpathy": ("dataset_*.json",),
    "coco": ("captions_train*.json", "annotations/captions_train*.json"),
    "manifest": ("manifest.jsonl", "manifest.csv"),
    "hf": ("dataset_dict.json", "dataset_info.json", "metadata.csv", "metadata.jsonl"),
}
"""Files (glob patterns, relative to the data folder) by which a layout is recognised when suggesting `--format`."""


def read(format: str, data_dir: Path | str, options: ReadOptions | None = None) -> CaptionSet:
    """Read a dataset folder with the reader registered for `format`.

    Args:
        format: A key of `FORMATS`.
        data_dir: The dataset folder (`~` is expanded).
        options: Split and location options; defaults to `ReadOptions()`.

    Returns:
        Usable records in a deterministic order, and a `Problem` for everything that could not be used.

    `hf` also takes a dataset name (anything that is not an existing path goes to `datasets.load_dataset`), and
    `manifest` the manifest file itself.

    Raises:
        CaptuneError: Unknown format, missing data folder, or missing annotation files.
    """
    if format not in FORMATS:
        raise CaptuneError(f"unknown data format {format!r}; choose one of: {', '.join(FORMATS)}")
    folder = Path(data_dir).expanduser()
    options = options or ReadOptions()
    if format == "hf" and not folder.exists():
        # A dataset name on the Hugging Face hub (or in the local datasets cache), not a folder.
        return FORMATS[format](Path(data_dir), options)
    if format == "manifest" and folder.is_file():
        # The manifest file itself given as the data: image paths are relative to its folder.
        folder, options = folder.parent, dataclasses.replace(options, annotations=str(folder.resolve()))
    if format == "synthetic":
        folder.mkdir(parents=True, exist_ok=True)  # the built-in dataset is generated into its folder on first use
    if not folder.exists():
        raise CaptuneError(f"data folder {folder} does not exist; check the path given for --format {format}")
    if not folder.is_dir():
        raise CaptuneError(f"data folder {folder} is not a folder; give the folder that holds the dataset")
    return FORMATS[format](folder.resolve(), options)


def resolve(data_dir: Path, name: str) -> Path:
    """`name` (with `~` expanded) if absolute, else `data_dir / name`."""
    path = Path(name).expanduser()
    return path if path.is_absolute() else data_dir / path


def missing_annotations(format: str, data_dir: Path, looked_for: Sequence[Path]) -> CaptuneError:
    """The error for a reader that cannot find its annotation files, suggesting a `--format` whose files are there."""
    message = f"--format {format}: annotation file not found; looked for {', '.join(str(p) for p in looked_for)}"
    others = [
        name
        for name, patterns in _LAYOUT_FILES.items()
        if name != format and any(next(data_dir.glob(pattern), None) for pattern in patterns)
    ]
    if others:
        return CaptuneError(f"{message}. {data_dir} has the files of --format {' or '.join(others)}; try that")
    return CaptuneError(f"{message}. Point the data folder at the dataset, or name the file with --annotations")


def read_text(path: Path) -> str:
    """The text of an annotation file (UTF-8, an optional BOM removed, newlines as `\\n`).

    Raises:
        CaptuneError: The file is not UTF-8 (the message names line and column).
    """
    return read_utf8(path)


def read_json(path: Path) -> object:
    """The JSON value of an annotation file (read as `read_text` reads it).

    Raises:
        CaptuneError: The file is not UTF-8, or not valid JSON (the message names line and column).
    """
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as exc:
        raise CaptuneError(f"{path}:{exc.lineno}:{exc.colno}: not valid JSON: {exc.msg}") from None


def find_images_dir(data_dir: Path, options: ReadOptions, candidates: Sequence[str]) -> Path:
    """`options.images_dir` if given, else the first candidate folder (relative to `data_dir`) that exists.

    Raises:
        CaptuneError: The given folder does not exist, or none of the candidates does.
    """
    if options.images_dir is not None:
        folder = resolve(data_dir, options.images_dir)
        if not folder.is_dir():
            raise CaptuneError(f"image folder {folder} (from --images-dir) does not exist or is not a folder")
        return folder
    for name in candidates:
        if (data_dir / name).is_dir():
            return data_dir / name
    raise CaptuneError(f"no image folder in {data_dir}; looked for {', '.join(candidates)}. Name it with --images-dir")


class SameFile:
    """The resolved path of a file (symlinks followed, `.` and `..` gone): what identifies an image, so that one file
    under several spellings (relative, absolute, `./`, through a link) is one image.

    Each folder is resolved once and each file checked for being a link, so a large listing costs one `lstat` a file.
    """

    def __init__(self) -> None:
        self._folders: dict[Path, Path] = {}

    def __call__(self, path: Path) -> Path:
        folder = self._folders.get(path.parent)
        if folder is None:
            folder = self._folders[path.parent] = path.parent.resolve()
        file = folder / path.name
        return file.resolve() if path.name in ("", ".", "..") or file.is_symlink() else file


class ImageNames:
    """The images an annotation file names, each identified by its resolved file (`SameFile`), with the spelling and
    line that first named it; a note counts the rows that name an image under another spelling."""

    def __init__(self, path: Path, root: Path) -> None:
        self.path, self.root = path, root
        self._resolved = SameFile()
        self._root = root.resolve()
        self.first: dict[Path, tuple[str, int]] = {}
        """Spelling and line of the first row naming each image."""
        self._respelled: list[tuple[str, int, Path]] = []

    def key(self, name: str) -> Path:
        """The image `name` (relative to `root`, or absolute) names."""
        return self._resolved(resolve(self.root, name))

    def use(self, key: Path, name: str, line: int) -> None:
        """Record that the row on `line` names image `key` as `name`, and is used."""
        first = self.first.setdefault(key, (name, line))
        if first[0] != name:
            self._respelled.append((name, line, key))

    def canonical(self, key: Path) -> str:
        """The image's name for seeded splits: its path relative to the root when inside it (as on any machine)."""
        return key.relative_to(self._root).as_posix() if key.is_relative_to(self._root) else str(key)

    def notes(self) -> list[str]:
        if not self._respelled:
            return []
        name, line, key = self._respelled[0]
        first, first_line = self.first[key]
        return [f"{self.path}: {len(self._respelled)} row(s) name an image under another spelling than its first row; "
                f"the first: line {line} {name!r} is {first!r} of line {first_line}"]  # fmt: skip


def seeded_split(names: list[str], options: ReadOptions) -> dict[str, str]:
    """Split of each name: the sorted names shuffled with `options.seed`, test first, then val, the rest train.

    It depends only on the set of names, the seed and the fractions, so a layout without split files gets the same
    split on every machine and in every file order.
    """
    order = sorted(names)
    random.Random(options.seed).shuffle(order)
    n_test = round(len(order) * options.test_fraction)
    n_val = round(len(order) * options.val_fraction)
    return {name: "test" if i < n_test else "val" if i < n_test + n_val else "train" for i, name in enumerate(order)}


def freeze_inherited_objects(worker_id: int) -> None:
    """DataLoader `worker_init_fn`: keeps the worker's garbage collector away from the objects it inherited.

    A forked worker shares the training process's memory until it writes to it, and a full collection writes to the
    header of every object it visits: without this, the first one copies the parent's whole Python heap (~0.4 GB in
    a test session) into each worker. `gc.freeze` moves those objects out of the collector's reach in O(1).
    """
    gc.freeze()


def check_images(
    cs: CaptionSet, *, workers: int | None = None, sample: int | None = None, progress: bool = True
) -> CaptionSet:
    """Decode every image (or a seeded random sample) with `load_rgb`; failures move from records to problems.

    Args:
        cs: What a reader returned.
        workers: Decoding threads (Pillow releases the GIL while decoding); default `os.cpu_count()`.
        sample: Check only this many records, drawn with a fixed seed (0); the others are kept unchecked and a note
            says so.
        progress: Show a progress bar on stderr.

    Returns:
        A new `CaptionSet`; `cs` is not changed.

    Raises:
        CaptuneError: `workers` below 1 or `sample` below 0.
    """
    if workers is not None and workers < 1:
        raise CaptuneError(f"workers is {workers}; give at least 1")
    if sample is not None and sample < 0:
        raise CaptuneError(f"sample is {sample}; give 0 or more images to check")
    n = len(cs.records)
    chosen = list(range(n)) if sample is None or sample >= n else sorted(random.Random(0).sample(range(n), sample))
    paths = [cs.records[i].image_path for i in chosen]
    with warnings.catch_warnings(), ThreadPoolExecutor(max_workers=workers or os.cpu_count()) as pool:
        # load_rgb refuses these images itself; Pillow's warning would only interleave with the progress bar.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        results = pool.map(_failure, paths)
        bar = tqdm(results, total=len(paths), desc="checking images", unit="img", file=sys.stderr, disable=not progress)
        failures = {i: failure for i, failure in zip(chosen, bar, strict=True) if failure is not None}
    notes = list(cs.notes)
    if len(chosen) < n:
        notes.append(
            f"image check: decoded a random sample of {len(chosen)} of {n} images (seed 0); "
            f"the other {n - len(chosen)} were not checked"
        )
    return CaptionSet(
        records=[r for i, r in enumerate(cs.records) if i not in failures],
        problems=cs.problems + [Problem(cs.records[i].image_id, reason) for i, reason in failures.items()],
        unassigned=cs.unassigned,
        notes=notes,
    )


def _failure(path: Path) -> str | None:
    """Why `path` cannot be used, or None if it decodes."""
    try:
        load_rgb(path)
    except ImageError as exc:
        return str(exc)
    return None


def summary(cs: CaptionSet) -> dict[str, object]:
    """Counts of usable images and captions, per split, with every problem and note (JSON-ready)."""
    return {
        "images": len(cs.records),
        "captions": sum(len(r.captions) for r in cs.records),
        "splits": {name: len(cs.split(name)) for name in SPLITS},
        "problems": [{"image": p.image, "problem": p.problem} for p in cs.problems],
        "unassigned": cs.unassigned,
        "notes": list(cs.notes),
    }
