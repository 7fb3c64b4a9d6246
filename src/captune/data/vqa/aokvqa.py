"""A-OKVQA as it is distributed (`--format aokvqa`): `aokvqa_v1p0_<split>.json` per split, each a list of
`{"question_id", "image_id", "question", "direct_answers", "choices", "correct_choice_idx", "rationales", ...}`, and
COCO 2017's images, `<split>2017/<image_id:012d>.jpg`.

The direct answers (ten per question) are the answers; the test split has none. The multiple-choice fields and
the rationales are not read. The JSON files are looked for in the data folder and `aokvqa/`; the image folders in
the data folder, `coco/`, `images/`, or `images_dir`.
"""

from __future__ import annotations

import re
from pathlib import Path

from captune.data import Problem, read_json, resolve
from captune.data.vqa import QuestionListing, VqaReadOptions, VqaSet, split_name, usable_questions
from captune.errors import CaptuneError

FILE = re.compile(r"aokvqa_v(?P<version>[0-9p]+)_(?P<split>[a-z]+)\.json")
IMAGE_ROOTS = (".", "coco", "images")
"""Folders (relative to the data folder) that may hold COCO's `train2017/`, `val2017/` and `test2017/`."""


def read_aokvqa(data_dir: Path, options: VqaReadOptions) -> VqaSet:
    """Read every A-OKVQA split file found and the COCO images it names.

    Args:
        data_dir: Absolute dataset folder.
        options: `annotations` names one split file to read alone; `images_dir` the folder of COCO's split folders.

    Returns:
        Questions by split (train, val, test), in file order.

    Raises:
        CaptuneError: No split file, two versions of one split, or a file that is not a JSON list.
    """
    files = _find_files(data_dir, options)
    problems: list[Problem] = []
    listings: list[QuestionListing] = []
    for split, path in files.items():
        entries = read_json(path)
        if not isinstance(entries, list):
            raise CaptuneError(f"{path}: expected a JSON list of questions (the A-OKVQA format)")
        folder = _image_folder(data_dir, options, split)
        for index, entry in enumerate(entries):
            listing = _listing(f"{path}: [{index}]", entry, split, folder, problems)
            if listing is not None:
                listings.append(listing)
    found = usable_questions(listings)
    notes = [f"{path.name}: no direct answers (a test split)" for split, path in files.items() if split == "test"]
    return VqaSet(found.questions, problems + found.problems, notes + found.notes)


def _find_files(data_dir: Path, options: VqaReadOptions) -> dict[str, Path]:
    """Split -> its file, train, val, test first."""
    if options.annotations is not None:
        paths = [resolve(data_dir, options.annotations)]
    else:
        paths = sorted(p for folder in (".", "aokvqa") for p in (data_dir / folder).glob("aokvqa_v*_*.json"))
    files: dict[str, Path] = {}
    for path in paths:
        match = FILE.fullmatch(path.name)
        if match is None or not path.is_file():
            raise CaptuneError(f"{path}: not an A-OKVQA split file (aokvqa_v1p0_<split>.json)")
        split = split_name(match["split"])
        if split in files:
            raise CaptuneError(f"{files[split]} and {path} are both of {split}; name the one to read with "
                               "--annotations")  # fmt: skip
        files[split] = path
    if not files:
        raise CaptuneError(f"--format aokvqa: no aokvqa_v1p0_<split>.json in {data_dir} or {data_dir / 'aokvqa'}; "
                           "point the data folder at the dataset, or name the file with --annotations")  # fmt: skip
    order = ("train", "val", "test")
    return dict(sorted(files.items(), key=lambda item: order.index(item[0]) if item[0] in order else len(order)))


def _image_folder(data_dir: Path, options: VqaReadOptions, split: str) -> Path:
    """`<root>/<split>2017` for the first root that has it, else the first root (so a missing file is named)."""
    roots = [resolve(data_dir, options.images_dir)] if options.images_dir is not None else \
        [data_dir / root for root in IMAGE_ROOTS]  # fmt: skip
    name = f"{split}2017"
    return next((root / name for root in roots if (root / name).is_dir()), roots[0] / name)


def _listing(where: str, entry: object, split: str, folder: Path, problems: list[Problem]) -> QuestionListing | None:
    """The question of one entry, or None with a problem."""
    value = entry if isinstance(entry, dict) else {}
    question_id, image_id, text = value.get("question_id"), value.get("image_id"), value.get("question")
    label = f"{image_id:012d}.jpg" if isinstance(image_id, int) else where
    answers = value.get("direct_answers", [])
    if not isinstance(entry, dict):
        reason = "not an object"
    elif not isinstance(question_id, str | int) or isinstance(question_id, bool) or question_id == "":
        reason = f"'question_id' is {question_id!r}; expected a text"
    elif not isinstance(image_id, int) or isinstance(image_id, bool):
        reason = f"'image_id' is {image_id!r}; expected an integer (COCO's id)"
    elif not isinstance(text, str) or not text.strip():
        reason = f"'question' is {text!r}; expected the question's text"
    elif not isinstance(answers, list) or not all(isinstance(a, str) and a.strip() for a in answers):
        reason = f"'direct_answers' is {answers!r}; expected a list of answers"
    elif not answers and split != "test":
        reason = "no 'direct_answers'"
    else:
        return QuestionListing(question_id, text.strip(), label, folder / label,
                               tuple(a.strip() for a in answers), split, where)  # fmt: skip
    problems.append(Problem(label, f"{where}: {reason}; the question is not used"))
    return None
