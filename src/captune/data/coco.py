"""COCO captions as COCO distributes them (`--format coco`).

`captions_train2017.json` and `captions_val2017.json` (or the 2014 names) in the data folder or in `annotations/`,
each holding `images[]` (`id`, `file_name`) and `annotations[]` (`image_id`, `caption`; about five per image); the
images in `train2017/` and `val2017/` (named after the annotation file) in the data folder or in `images/`.
COCO publishes no test captions, so the val file's images are split by image into val and test with a fixed seed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from captune.data import (
    CaptionSet,
    Problem,
    ReadOptions,
    find_images_dir,
    missing_annotations,
    read_json,
    resolve,
    seeded_split,
)
from captune.data.listings import Listing, usable
from captune.errors import CaptuneError

ANNOTATION_DIRS = (".", "annotations")
"""Where the annotation files are looked for, relative to the data folder (COCO's zip unpacks `annotations/`)."""
YEARS = ("2017", "2014")
"""Releases tried in turn in each folder; both hold the same images (2017 re-splits 2014's train + val)."""
_JSON_TYPES = {dict: "an object", list: "an array", str: "a string", int: "a number", float: "a number",
               bool: "a boolean", type(None): "null"}  # fmt: skip


@dataclass
class _Image:
    """An entry of `images[]` and the captions its annotations give it."""

    name: str
    """`file_name`, stripped."""
    index: int
    """Position in `images[]`."""
    where: str
    """`file: images[i]`."""
    captions: list[str] = field(default_factory=list)


def read_coco(data_dir: Path, options: ReadOptions) -> CaptionSet:
    """Read COCO's caption annotation files and the images they name.

    The train file's images are `train`. The val file's images are split by image (all captions of an image go to
    the same split): the sorted file names are shuffled with `random.Random(options.seed)`, the first
    `round(n * options.test_fraction)` go to `test` and the rest to `val`. A val file without a train file gives an
    empty train split; a train file without a val file gives empty val and test splits. A note says which.

    Args:
        data_dir: Absolute dataset folder.
        options: `annotations` names the train file (its val file is the one beside it with `val` for `train` in the
            name; a name with `val` and no `train` is read as a val file alone); `images_dir` the folder that holds
            `train2017/` and `val2017/` (or the images themselves); `seed` and `test_fraction` the val/test split.

    Returns:
        Records in file order: the train file's, then the val file's. `image_id` is COCO's `file_name`.

    Raises:
        CaptuneError: No annotation file, no image folder, invalid JSON, or a file that is not COCO captions.
    """
    train_file, val_file = _find_annotations(data_dir, options)
    # Image folders before parsing: a wrong folder fails before a 90 MB annotation file is read.
    folders = {path: _image_folder(data_dir, options, path) for path in (train_file, val_file) if path is not None}
    problems: list[Problem] = []
    notes: list[str] = []
    listings: list[Listing] = []
    first_listed: dict[str, str] = {}
    if train_file is not None:
        images = _read_images(train_file, first_listed, problems)
        listings += [Listing(i.name, folders[train_file] / i.name, i.captions, "train", i.where) for i in images]
    if val_file is not None:
        images = _read_images(val_file, first_listed, problems)
        splits = _val_test_split([i.name for i in images], options)
        listings += [Listing(i.name, folders[val_file] / i.name, i.captions, splits[i.name], i.where) for i in images]
        n_test = list(splits.values()).count("test")
        notes.append(
            f"{val_file.name}: COCO has no public test captions; split its {len(images)} images with seed "
            f"{options.seed} into val/test {len(images) - n_test}/{n_test} (test_fraction {options.test_fraction})"
        )
    if train_file is None:
        notes.append(f"{val_file}: no train annotation file beside it; the train split is empty")
    elif val_file is None:
        notes.append(f"{train_file}: no {_val_beside(train_file).name} beside it; the val and test splits are empty")
    found = usable(listings)
    return CaptionSet(found.records, problems + found.problems, notes=notes + found.notes)


def _val_test_split(names: list[str], options: ReadOptions) -> dict[str, str]:
    """`val` or `test` for each name: the shared seeded split with no val share, whose `train` is COCO's val."""
    splits = seeded_split(names, dataclasses.replace(options, val_fraction=0.0))
    return {name: "test" if split == "test" else "val" for name, split in splits.items()}


def _val_beside(train_file: Path) -> Path:
    return train_file.with_name(train_file.name.replace("train", "val"))


def _find_annotations(data_dir: Path, options: ReadOptions) -> tuple[Path | None, Path | None]:
    """(train file, val file), at least one of them an existing file."""
    if options.annotations is not None:
        path = resolve(data_dir, options.annotations)
        if not path.is_file():
            raise missing_annotations("coco", data_dir, [path])
        if "train" not in path.name and "val" in path.name:
            return None, path
        val = _val_beside(path)
        return path, val if "train" in path.name and val.is_file() else None
    looked_for: list[Path] = []
    for folder in ANNOTATION_DIRS:
        for year in YEARS:
            train = data_dir / folder / f"captions_train{year}.json"
            val = _val_beside(train)
            if train.is_file() or val.is_file():
                return (train if train.is_file() else None), (val if val.is_file() else None)
            looked_for += [train, val]
    raise missing_annotations("coco", data_dir, looked_for)


def _image_folder(data_dir: Path, options: ReadOptions, annotation_file: Path) -> Path:
    """The folder of one annotation file's images: its split folder (`captions_val2017.json`: `val2017`) in the data
    folder, in `images/` or in `options.images_dir`; else `images/` or `options.images_dir` itself."""
    split_folder = annotation_file.stem.removeprefix("captions_")
    if options.images_dir is not None:
        root = find_images_dir(data_dir, options, ())
        return root / split_folder if (root / split_folder).is_dir() else root
    return find_images_dir(data_dir, options, (split_folder, f"images/{split_folder}", "images"))


def _read_images(path: Path, first_listed: dict[str, str], problems: list[Problem]) -> list[_Image]:
    """The images of one annotation file with their captions, in `images[]` order.

    `first_listed` maps each file name already taken (by this file or the one read before) to where; a name listed
    again is a problem and its captions are not used, so that no image is in two splits.
    """
    entries, annotations = _load(path)
    by_id = _index_images(path, entries, problems)
    _add_captions(path, annotations, by_id, problems)
    kept: list[_Image] = []
    for image in by_id.values():
        if image.name in first_listed:
            problems.append(
                Problem(
                    image.name,
                    f"{image.where}: {image.name!r} is already listed at {first_listed[image.name]}; "
                    f"its {len(image.captions)} captions are not used",
                )
            )
        else:
            first_listed[image.name] = image.where
            kept.append(image)
    return kept


def _load(path: Path) -> tuple[list[object], list[object]]:
    """The `images` and `annotations` lists of a COCO captions file."""
    data = read_json(path)
    if not isinstance(data, dict):
        raise CaptuneError(
            f"{path}: the top level is {_json_type(data)}; expected an object with 'images' and "
            "'annotations' lists (COCO captions format, as in captions_train2017.json)"
        )
    for key in ("images", "annotations"):
        if not isinstance(data.get(key), list):
            found = "missing" if key not in data else _json_type(data[key])
            raise CaptuneError(f"{path}: '{key}' is {found}; expected a list (COCO captions format)")
    return data["images"], data["annotations"]


def _index_images(path: Path, entries: list[object], problems: list[Problem]) -> dict[int | str, _Image]:
    """Images by COCO id, in file order; an entry without `file_name` or `id`, or with a used id, is a problem."""
    images: dict[int | str, _Image] = {}
    for index, entry in enumerate(entries):
        where = f"{path}: images[{index}]"
        name = entry.get("file_name") if isinstance(entry, dict) else None
        if not isinstance(name, str) or not name.strip():
            problems.append(Problem(f"{path.name}: images[{index}]", f"{where}: no 'file_name'"))
            continue
        image_id = entry.get("id") if isinstance(entry, dict) else None
        if not isinstance(image_id, (int, str)):
            problems.append(Problem(name.strip(), f"{where}: no 'id' (an integer); its captions cannot be matched"))
        elif image_id in images:
            first = images[image_id]
            problems.append(
                Problem(
                    name.strip(),
                    f"{where}: id {image_id!r} is already the id of images[{first.index}] ({first.name}); this entry "
                    f"is ignored and the captions with image_id {image_id!r} go to {first.name}",
                )
            )
        else:
            images[image_id] = _Image(name.strip(), index, where)
    return images


def _add_captions(
    path: Path, annotations: list[object], images: dict[int | str, _Image], problems: list[Problem]
) -> None:
    """Append each annotation's caption to its image; an annotation that cannot be used is a problem."""
    for index, entry in enumerate(annotations):
        image_id = entry.get("image_id") if isinstance(entry, dict) else None
        image = images.get(image_id) if isinstance(image_id, (int, str)) else None
        caption = entry.get("caption") if isinstance(entry, dict) else None
        if image is not None and isinstance(caption, str) and caption.strip():
            image.captions.append(caption.strip())
            continue
        where = f"{path}: annotations[{index}]"
        if image is None:
            found = f"image_id {image_id!r} is not an id in 'images'" if isinstance(entry, dict) else "not an object"
            problems.append(Problem(f"{path.name}: annotations[{index}]", f"{where}: {found}; caption not used"))
        elif caption is None:
            problems.append(Problem(image.name, f"{where}: no 'caption'"))
        elif not isinstance(caption, str):
            problems.append(Problem(image.name, f"{where}: 'caption' is {_json_type(caption)}, not text"))
        else:
            problems.append(Problem(image.name, f"{where}: empty caption"))


def _json_type(value: object) -> str:
    """What a parsed JSON value is, in JSON's words."""
    return _JSON_TYPES[type(value)]
