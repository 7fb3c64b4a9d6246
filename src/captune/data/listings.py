"""From a reader's listings to records: each listed image that has a caption and a file on disk becomes a `Record`,
every other one a `Problem`; an image is its resolved file (`SameFile`)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from captune.data import CaptionSet, Problem, Record, SameFile


@dataclass(frozen=True)
class Listing:
    """An image as an annotation file lists it, before the checks that make it a `Record`."""

    image_id: str
    """File name as the dataset names it."""
    image_path: Path
    """Where the file should be."""
    captions: Sequence[str]
    """Non-empty, stripped captions (possibly none)."""
    split: str
    """One of `SPLITS`."""
    where: str
    """`file:line` (or another location) that lists the image; starts the text of its problem."""


def usable(listings: Iterable[Listing]) -> CaptionSet:
    """Records of the listed images that have a caption and exist on disk, and a `Problem` for each other one.

    An image is its resolved file (`same_file`): a listing of a file listed before under another name is a problem
    when it puts the file in another split (no image may be in two), else its captions join the first listing's. A
    caption an image has twice is used once. Notes count both.
    """
    resolved = SameFile()
    kept: dict[Path, tuple[Listing, list[str]]] = {}
    problems: list[Problem] = []
    joined: list[tuple[Listing, Listing]] = []
    for item in listings:
        if not item.captions:
            problems.append(Problem(item.image_id, f"{item.where}: no captions for this image"))
            continue
        if not item.image_path.is_file():
            problems.append(Problem(item.image_id, f"{item.where}: image file missing: {item.image_path}"))
            continue
        key = resolved(item.image_path)
        if key not in kept:
            kept[key] = (item, list(item.captions))
            continue
        first, captions = kept[key]
        if first.split != item.split:
            problems.append(Problem(item.image_id, f"{item.where}: {item.image_path} is the file of {first.image_id!r} "
                                    f"({first.where}), which is in {first.split}; an image belongs to one split: "
                                    "list it once"))  # fmt: skip
        else:
            captions += item.captions
            joined.append((item, first))
    found = CaptionSet([], problems)
    repeated: list[tuple[Listing, str]] = []
    for item, captions in kept.values():
        unique = tuple(dict.fromkeys(captions))
        repeated += [(item, caption) for caption in _repeats(captions)]
        found.records.append(Record(item.image_id, item.image_path, unique, item.split))
    if joined:
        item, first = joined[0]
        found.notes.append(f"{len(joined)} listing(s) name the file of an image listed before under another name, in "
                           f"the same split, and their captions join it; the first: {item.where}: {item.image_path} "
                           f"is the file of {first.image_id!r} ({first.where})")  # fmt: skip
    if repeated:
        item, caption = repeated[0]
        found.notes.append(f"{len(repeated)} caption(s) repeat an earlier caption of the same image and are used "
                           f"once; the first: {item.where}: {item.image_id}: {caption!r}")  # fmt: skip
    return found


def _repeats(captions: list[str]) -> list[str]:
    """Each caption of `captions` that an earlier one equals, in order."""
    seen: set[str] = set()
    repeats = []
    for caption in captions:
        if caption in seen:
            repeats.append(caption)
        seen.add(caption)
    return repeats
