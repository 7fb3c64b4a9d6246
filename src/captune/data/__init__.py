"""Caption datasets: one small reader per on-disk layout, behind a name registry.

Every reader turns a folder into a `CaptionSet`: records (one per image, with all its captions and its split) and
problems (anything that could not be used, named by image file and reason). Nothing is dropped without a `Problem`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

SPLITS = ("train", "val", "test")


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
    """Usable images that belong to no split (e.g. the 91 Flickr8k images outside the official split files)."""

    def split(self, name: str) -> list[Record]:
        """Records of one split, in reader order."""
        return [r for r in self.records if r.split == name]
