"""VQAv2 as it is distributed (`--format vqav2`), and OK-VQA, whose files have the same names and fields
(`--format okvqa`).

Per split, `v2_OpenEnded_mscoco_<split>_questions.json` (`questions[]`: `question_id`, `image_id`, `question`) and,
except for the test splits, `v2_mscoco_<split>_annotations.json` (`annotations[]`: `question_id`, `image_id`,
`answers[]` of `{"answer", "answer_confidence", "answer_id"}`, `answer_type`, `question_type`), in the data folder or
in `Questions/` / `Annotations/` (or lower case); OK-VQA's names lack the `v2_`. The images are COCO's:
`<split>/COCO_<split>_<image_id:012d>.jpg` (`train2014`, `val2014`, `test2015`, which also holds test-dev's), in the
data folder, `Images/mscoco/` (the VQA toolkit's layout), `images/`, or `images_dir`. Every split present is read;
its name without the year is the split (`train2014` -> `train`, `test-dev2015` -> `test-dev`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from captune.data import Problem, read_json, resolve
from captune.data.vqa import QuestionListing, VqaReadOptions, VqaSet, split_name, usable_questions
from captune.data.vqa.rows import answer_list, text_or_none
from captune.errors import CaptuneError

QUESTIONS_FILE = re.compile(r"(?P<v2>v2_)?(?:OpenEnded|MultipleChoice)_(?P<kind>mscoco|abstract_v002)_"
                            r"(?P<subtype>[A-Za-z0-9-]+)_questions\.json")  # fmt: skip
"""A questions file's name: its version, image source and split (`subtype`)."""
FILE_DIRS = (".", "Questions", "Annotations", "questions", "annotations")
"""Where question and annotation files are looked for, relative to the data folder."""
IMAGE_NAMES = {"mscoco": "COCO_{folder}_{id:012d}.jpg", "abstract_v002": "abstract_v002_{folder}_{id:012d}.png"}
"""An image's file name, by image source."""
SPLIT_ORDER = ("train", "val", "test", "test-dev")


@dataclass(frozen=True)
class _SplitFiles:
    questions: Path
    annotations: Path | None
    kind: str
    subtype: str

    @property
    def image_folder(self) -> str:
        """The image folder's name: test-dev's images are in test2015."""
        return self.subtype.replace("test-dev", "test")


@dataclass(frozen=True)
class _Entry:
    """A question of a questions file."""

    where: str
    image_id: int
    question: str


def read_vqav2(data_dir: Path, options: VqaReadOptions) -> VqaSet:
    """Read every split of VQAv2 (or OK-VQA) found in the data folder and the images they name.

    Args:
        data_dir: Absolute dataset folder.
        options: `annotations` names one questions file to read alone (its annotations are looked for beside it
            and in the folders above); `images_dir` the folder that holds `train2014/` ... (or the images).

    Returns:
        Questions by split (train, val, test, test-dev, then others), in file order within a split.

    Raises:
        CaptuneError: No questions file, two of one split (choose one with `annotations`), a file that is not JSON
            or not of the official shape.
    """
    problems: list[Problem] = []
    notes: list[str] = []
    listings: list[QuestionListing] = []
    for files in _find_files(data_dir, options):
        folder = _image_folder(data_dir, options, files)
        entries = _questions(files.questions, problems)
        if folder is None:
            looked = ", ".join(str(data_dir / c) for c in _folder_candidates(files))
            problems.append(Problem(files.questions.name, f"{files.questions}: no image folder {files.image_folder}; "
                            f"looked for {looked}; its {len(entries)} questions are not used. Name the folder that "
                            "holds it with --images-dir"))  # fmt: skip
            continue
        answers = _annotations(files, entries, problems) if files.annotations is not None else None
        if answers is None:
            notes.append(f"{files.questions.name}: no annotation file ({_annotations_name(files)}): its "
                         f"{len(entries)} questions have no answers (a test split)")  # fmt: skip
        split = split_name(re.sub(r"\d{4}$", "", files.subtype))
        for question_id, entry in entries.items():
            given = answers.get(question_id) if answers is not None else ((), None, None)
            if given is None:
                problems.append(Problem(str(entry.image_id), f"{entry.where}: question_id {question_id!r} has no "
                                f"annotation in {files.annotations}; the question is not used"))  # fmt: skip
                continue
            if answers is not None and not given[0]:
                continue  # an annotation without a usable answer: its problems are listed
            name = IMAGE_NAMES[files.kind].format(folder=files.image_folder, id=entry.image_id)
            listings.append(QuestionListing(question_id, entry.question, name, folder / name, given[0], split,
                                            entry.where, given[1], given[2]))  # fmt: skip
    found = usable_questions(listings)
    return VqaSet(found.questions, problems + found.problems, notes + found.notes)


def _annotations_name(files: _SplitFiles) -> str:
    version = "v2_" if files.questions.name.startswith("v2_") else ""
    return f"{version}{files.kind}_{files.subtype}_annotations.json"


def _find_files(data_dir: Path, options: VqaReadOptions) -> list[_SplitFiles]:
    """The questions file of each split, with its annotation file where there is one, in `SPLIT_ORDER`."""
    if options.annotations is not None:
        found = [resolve(data_dir, options.annotations)]
        if not found[0].is_file():
            raise CaptuneError(f"--annotations {found[0]}: no such file; name a VQAv2 questions file")
    else:
        found = sorted({path for folder in FILE_DIRS for path in (data_dir / folder).glob("*_questions.json")})
    by_split: dict[str, list[_SplitFiles]] = {}
    for path in found:
        match = QUESTIONS_FILE.fullmatch(path.name)
        if match is None:
            if options.annotations is not None:
                raise CaptuneError(f"{path}: not a VQAv2 questions file name (v2_OpenEnded_mscoco_<split>_questions."
                                   "json, or OK-VQA's without v2_)")  # fmt: skip
            continue
        files = _SplitFiles(path, None, match["kind"], match["subtype"])
        beside = [folder / _annotations_name(files) for folder in (path.parent, path.parent.parent / "Annotations",
                  path.parent.parent / "annotations", path.parent.parent, data_dir)]  # fmt: skip
        annotations = next((p for p in beside if p.is_file()), None)
        by_split.setdefault(files.subtype, []).append(_SplitFiles(path, annotations, files.kind, files.subtype))
    if not by_split:
        raise CaptuneError(f"--format vqav2: no questions file (v2_OpenEnded_mscoco_<split>_questions.json) in "
                           f"{data_dir} or its {', '.join(FILE_DIRS[1:])} folders; point the data folder at the "
                           "dataset, or name the file with --annotations")  # fmt: skip
    for subtype, candidates in by_split.items():
        if len(candidates) > 1:
            raise CaptuneError(f"{data_dir}: {len(candidates)} questions files of {subtype}: "
                               f"{', '.join(str(c.questions) for c in candidates)}; name the one to read with "
                               "--annotations")  # fmt: skip
    return sorted((c[0] for c in by_split.values()), key=_split_rank)


def _split_rank(files: _SplitFiles) -> tuple[int, str]:
    split = split_name(re.sub(r"\d{4}$", "", files.subtype))
    return (SPLIT_ORDER.index(split) if split in SPLIT_ORDER else len(SPLIT_ORDER), files.subtype)


def _folder_candidates(files: _SplitFiles) -> tuple[str, ...]:
    name = files.image_folder
    return name, f"Images/{files.kind}/{name}", f"images/{name}", "images"


def _image_folder(data_dir: Path, options: VqaReadOptions, files: _SplitFiles) -> Path | None:
    """The folder of a split's images: its COCO folder under the data folder (or `images_dir`), or `images_dir`."""
    if options.images_dir is not None:
        root = resolve(data_dir, options.images_dir)
        if not root.is_dir():
            raise CaptuneError(f"image folder {root} (from --images-dir) does not exist or is not a folder")
        return root / files.image_folder if (root / files.image_folder).is_dir() else root
    return next((data_dir / c for c in _folder_candidates(files) if (data_dir / c).is_dir()), None)


def _entries(path: Path, key: str) -> list[object]:
    """The `key` list of an official file."""
    data = read_json(path)
    entries = data.get(key) if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise CaptuneError(f"{path}: expected an object with a {key!r} list (the official VQAv2 format)")
    return entries


def _questions(path: Path, problems: list[Problem]) -> dict[int | str, _Entry]:
    """The usable questions of a questions file by id, in file order; a problem for each other entry."""
    questions: dict[int | str, _Entry] = {}
    for index, entry in enumerate(_entries(path, "questions")):
        where = f"{path}: questions[{index}]"
        value = entry if isinstance(entry, dict) else {}
        question_id, image_id, text = value.get("question_id"), value.get("image_id"), value.get("question")
        label = str(image_id) if image_id is not None else f"{path.name}: questions[{index}]"
        if not isinstance(entry, dict):
            problems.append(Problem(label, f"{where}: not an object"))
        elif isinstance(question_id, bool) or not isinstance(question_id, int | str):
            problems.append(Problem(label, f"{where}: 'question_id' is {question_id!r}; expected an integer"))
        elif isinstance(image_id, bool) or not isinstance(image_id, int):
            problems.append(Problem(label, f"{where}: 'image_id' is {image_id!r}; expected an integer (COCO's id)"))
        elif not isinstance(text, str) or not text.strip():
            problems.append(Problem(label, f"{where}: 'question' is {text!r}; expected the question's text"))
        elif question_id in questions:
            problems.append(Problem(label, f"{where}: question_id {question_id!r} is {questions[question_id].where} "
                            "already; the question is not used"))  # fmt: skip
        else:
            questions[question_id] = _Entry(where, image_id, text.strip())
    return questions


Answers = tuple[tuple[str, ...], str | None, str | None]
"""A question's annotators' answers, answer type and question type."""


def _annotations(
    files: _SplitFiles, questions: dict[int | str, _Entry], problems: list[Problem]
) -> dict[int | str, Answers]:
    """The answers of each annotated question (none, with problems, when none is usable); a problem for each
    annotation, or answer in one, that is not used."""
    assert files.annotations is not None
    path = files.annotations
    found: dict[int | str, Answers] = {}
    for index, entry in enumerate(_entries(path, "annotations")):
        where = f"{path}: annotations[{index}]"
        value = entry if isinstance(entry, dict) else {}
        question_id = value.get("question_id")
        question = questions.get(question_id) if isinstance(question_id, int | str) else None
        label = str(question.image_id) if question is not None else f"{path.name}: annotations[{index}]"
        if question is None:
            problems.append(Problem(label, f"{where}: question_id {question_id!r} is not a usable question of "
                            f"{files.questions.name}; the annotation is not used"))  # fmt: skip
        elif question_id in found:
            problems.append(Problem(label, f"{where}: question_id {question_id!r} is annotated before; not used"))
        elif value.get("image_id") != question.image_id:
            problems.append(Problem(label, f"{where}: image_id {value.get('image_id')!r} differs from "
                            f"{question.image_id!r} of {question.where}; the question is not used"))  # fmt: skip
        else:
            assert isinstance(question_id, int | str)
            answers = _answers(where, value.get("answers"), label, problems)
            found[question_id] = (
                answers,
                text_or_none(value.get("answer_type")),
                text_or_none(value.get("question_type")),
            )
    return found


def _answers(where: str, value: object, label: str, problems: list[Problem]) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        problems.append(Problem(label, f"{where}: 'answers' is {value!r}; expected the annotators' answers"))
        return ()
    answers, wrong = answer_list(value, "answers")
    problems += [Problem(label, f"{where}: {what}; not used") for what in wrong]
    return tuple(answers)
