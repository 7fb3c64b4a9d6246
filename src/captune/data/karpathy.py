"""Karpathy split files (`--format karpathy`): `dataset_flickr8k.json`, `dataset_flickr30k.json`, `dataset_coco.json`.

Each file holds `images[]` with `filename`, an optional `filepath` (COCO: `train2014` / `val2014`), `split` (train,
val, test or restval, which joins train unless `restval` is `none`) and `sentences[].raw`.
"""

from __future__ import annotations

from pathlib import Path

from captune.data import (
    CaptionSet,
    Problem,
    ReadOptions,
    find_images_dir,
    missing_annotations,
    read_json,
    resolve,
)
from captune.data.flickr8k import IMAGE_DIRS as FLICKR8K_IMAGE_DIRS
from captune.data.listings import Listing, usable
from captune.errors import CaptuneError

IMAGE_DIRS = (*FLICKR8K_IMAGE_DIRS, "Images", "images", "flickr30k-images", ".")
"""Image folders tried in turn; `.` (the data folder itself) last, where COCO's `filepath` folders are."""
_SPLITS = {"train": "train", "restval": "train", "val": "val", "dev": "val", "test": "test"}


def read_karpathy(data_dir: Path, options: ReadOptions) -> CaptionSet:
    """Read a Karpathy split file and the images it names.

    Args:
        data_dir: Absolute dataset folder.
        options: `annotations` picks the JSON file (default: the one `dataset_*.json` in `data_dir`); `images_dir`
            the image folder; `restval` whether `restval` images join train or are left out (counted in
            `unassigned`).

    Returns:
        Records in file order.

    Raises:
        CaptuneError: No JSON file, several to choose from, invalid JSON, or no or an empty `images` list in it.
    """
    path = _find_annotations(data_dir, options)
    images_dir = find_images_dir(data_dir, options, IMAGE_DIRS)
    data = read_json(path)
    entries = data.get("images") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise CaptuneError(f"{path}: expected an object with an 'images' list, as in Karpathy's dataset_*.json")
    if not entries:
        raise CaptuneError(f"{path}: the 'images' list is empty; give the dataset_*.json that lists the images")

    problems: list[Problem] = []
    listings: dict[str, Listing] = {}
    is_restval = [isinstance(entry, dict) and entry.get("split") == "restval" for entry in entries]
    for index, entry in enumerate(entries):
        if is_restval[index] and options.restval == "none":
            continue  # counted in `unassigned` below
        parsed = _parse_entry(entry, f"images[{index}]", path, images_dir, problems)
        if parsed is None:
            continue
        if parsed.image_id in listings:
            first = listings[parsed.image_id].where
            problems.append(Problem(parsed.image_id, f"{parsed.where}: listed again (first at {first}); ignored"))
        else:
            listings[parsed.image_id] = parsed
    found = usable(listings.values())
    restval = sum(is_restval)
    left_out = restval if options.restval == "none" else 0
    fate = "left out (restval: none); counted in unassigned" if left_out else "joined train"
    notes = [f"{path.name}: {restval} 'restval' images {fate}"] if restval else []
    return CaptionSet(found.records, problems + found.problems, unassigned=left_out, notes=notes + found.notes)


def _find_annotations(data_dir: Path, options: ReadOptions) -> Path:
    if options.annotations is not None:
        path = resolve(data_dir, options.annotations)
        if not path.is_file():
            raise missing_annotations("karpathy", data_dir, [path])
        return path
    found = sorted(data_dir.glob("dataset_*.json"))
    if not found:
        raise missing_annotations("karpathy", data_dir, [data_dir / "dataset_*.json"])
    if len(found) > 1:
        names = ", ".join(path.name for path in found)
        raise CaptuneError(f"{data_dir} has several Karpathy split files ({names}); choose one with --annotations")
    return found[0]


def _parse_entry(entry: object, position: str, path: Path, images_dir: Path, problems: list[Problem]) -> Listing | None:
    """The listing of the entry at `position` (`images[i]`); None, with a problem, if it has no file name or split."""
    where = f"{path}: {position}"
    if not isinstance(entry, dict) or not isinstance(entry.get("filename"), str) or not entry["filename"].strip():
        problems.append(Problem(position, f"{where}: no 'filename'"))
        return None
    name = entry["filename"].strip()
    split = entry.get("split")
    if not isinstance(split, str) or split not in _SPLITS:
        problems.append(Problem(name, f"{where}: split {split!r} is not one of {', '.join(_SPLITS)}"))
        return None
    folder = images_dir / entry["filepath"] if isinstance(entry.get("filepath"), str) else images_dir
    sentences = entry.get("sentences")
    if not isinstance(sentences, list):
        problems.append(Problem(name, f"{where}: no 'sentences' list"))
        sentences = []
    captions = []
    for number, sentence in enumerate(sentences):
        raw = sentence.get("raw") if isinstance(sentence, dict) else None
        if isinstance(raw, str) and raw.strip():
            captions.append(raw.strip())
        else:
            problems.append(Problem(name, f"{where}: sentences[{number}] has no 'raw' text"))
    return Listing(name, folder / name, captions, _SPLITS[split], where)
