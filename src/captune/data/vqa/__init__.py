"""Visual question answering datasets: one small reader per layout, behind a name registry of their own.

Every reader turns a folder into a `VqaSet`: questions (one record each: its image, text, annotators' answers,
types where known, split) and problems (anything that could not be used, named by file and line or entry). As for
captions, nothing is dropped without a `Problem` or a note that counts it, and an image is its resolved file.

    vs = read_vqa("vqav2", "~/data/vqa")
    vs = check_vqa_images(vs)  # decode every image once; the questions of those that fail move to the problems
    print(vqa_summary(vs))

The layouts: `vqav2` (and `okvqa`, the same files), `aokvqa`, `manifest`, `hf`, `synthetic` (docs/data.md).
"""

from __future__ import annotations

import dataclasses
import importlib
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from captune.data import SPLIT_ALIASES, SPLITS, CaptionSet, Problem, ReadOptions, Record, SameFile, check_images
from captune.errors import CaptuneError

QuestionId = int | str
"""A question's id: an integer in VQAv2 and OK-VQA, a string in A-OKVQA."""


@dataclass(frozen=True)
class VqaReadOptions(ReadOptions):
    """How a VQA reader finds and splits a dataset: the caption readers' options (seed and fractions of seeded
    splits, `images_dir`, `annotations`, `image_column`, `split_column`) and the columns of questions and answers."""

    question_column: str = "question"
    """Column holding the question text (`manifest`, `hf`)."""
    answers_column: str = "answers"
    """Column holding the annotators' answers: a list (of strings, or of `{"answer": ...}` objects as VQAv2 on the
    Hugging Face hub has them), or one string of answers separated by `answer_separator`."""
    answer_column: str = "answer"
    """Column holding one answer, for data with one answer per row (rows of one question add up)."""
    answer_separator: str = "|"
    """What separates the answers in a string of the answers column; empty: the string is one answer."""
    question_id_column: str = "question_id"
    """Optional column with each question's id (default: the row's line, or `<split>/<row>` for `hf`)."""
    answer_type_column: str = "answer_type"
    """Optional column: `yes/no`, `number`, `other`, as VQAv2 types answers."""
    question_type_column: str = "question_type"
    """Optional column: the question's type (`what color is the`), for the per-type accuracy."""


@dataclass(frozen=True)
class Question:
    """One question about one image, with its annotators' answers."""

    question_id: QuestionId
    question: str
    """The question, stripped."""
    image_id: str
    """The image as the dataset names it (its file name, or its path relative to the dataset)."""
    image_path: Path
    """Absolute path of the image file."""
    answers: tuple[str, ...]
    """Each annotator's answer, stripped, in file order (ten in VQAv2, repeats included: they are the counts);
    empty in a split without answers (VQAv2's and A-OKVQA's test splits)."""
    split: str
    """`train`, `val`, `test`, or the name of another split the dataset has (`test-dev`)."""
    answer_type: str | None = None
    """`yes/no`, `number` or `other` where the dataset says."""
    question_type: str | None = None
    """The question's type where the dataset says (VQAv2: its first words, `what color is the`)."""

    def answer_counts(self) -> list[tuple[str, int]]:
        """Each distinct answer and how many annotators gave it, most given first (ties in file order)."""
        return Counter(self.answers).most_common()


@dataclass
class VqaSet:
    """What a VQA reader returns."""

    questions: list[Question]
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def split(self, name: str) -> list[Question]:
        """Questions of one split, in reader order."""
        return [q for q in self.questions if q.split == name]

    def splits(self) -> list[str]:
        """The splits that have questions: train, val, test first, then the others in reader order."""
        present = dict.fromkeys(q.split for q in self.questions)
        return [s for s in SPLITS if s in present] + [s for s in present if s not in SPLITS]


@dataclass(frozen=True)
class QuestionListing:
    """A question as a file lists it, before the checks that make it a `Question`."""

    question_id: QuestionId
    question: str
    image_id: str
    image_path: Path
    """Where the image file should be."""
    answers: tuple[str, ...]
    split: str
    where: str
    """`file:line` or `file: entry` that lists the question; starts the text of its problems."""
    answer_type: str | None = None
    question_type: str | None = None


def usable_questions(listings: Iterable[QuestionListing]) -> VqaSet:
    """The questions whose image file exists, in listing order, and a `Problem` for each other one.

    An image (its resolved file) belongs to one split: a question that puts it in another is a problem, except
    between splits without answers (VQAv2's test-dev images are test images). A question id is used once; the same
    unanswered question on the same image in two such splits (test-dev is part of test) is kept in both, with a note.
    A missing image file is one problem naming its first question and how many questions it takes with it.
    """
    resolved = SameFile()
    first_of_image: dict[Path, QuestionListing] = {}
    splits_of_image: dict[Path, set[str]] = {}
    exists: dict[Path, bool] = {}
    missing: Counter[Path] = Counter()
    first_of_id: dict[QuestionId, QuestionListing] = {}
    found = VqaSet([])
    shared = 0
    for item in listings:
        key = resolved(item.image_path)
        first = first_of_image.setdefault(key, item)
        if not exists.setdefault(key, item.image_path.is_file()):
            missing[key] += 1
            continue
        splits = splits_of_image.setdefault(key, {item.split})
        if item.split not in splits and (item.answers or first.answers):
            found.problems.append(Problem(item.image_id, f"{item.where}: {item.image_path} is the image of "
                                  f"{first.where}, which is in {first.split}; an image belongs to one split, so this "
                                  "question is not used"))  # fmt: skip
            continue
        splits.add(item.split)
        earlier = first_of_id.setdefault(item.question_id, item)
        if earlier is not item:
            if _same_unanswered(earlier, item):
                shared += 1
            else:
                found.problems.append(Problem(item.image_id, f"{item.where}: question_id {item.question_id!r} is "
                                      f"the id of {earlier.where} already; give each question its own id"))  # fmt: skip
                continue
        found.questions.append(Question(item.question_id, item.question, item.image_id, item.image_path,
                                        item.answers, item.split, item.answer_type, item.question_type))  # fmt: skip
    for key, count in missing.items():
        item = first_of_image[key]
        found.problems.append(Problem(item.image_id, f"{item.where}: image file missing: {item.image_path} "
                              f"({count} question(s) of this image not used)"))  # fmt: skip
    if shared:
        found.notes.append(f"{shared} unanswered question(s) are listed in two splits with the same image and text "
                           "(VQAv2's test-dev is part of test) and are kept in both")  # fmt: skip
    return found


def _same_unanswered(a: QuestionListing, b: QuestionListing) -> bool:
    return not a.answers and not b.answers and (a.image_path, a.question) == (b.image_path, b.question)


def split_name(name: str) -> str:
    """The split a dataset's split name stands for: `validation`/`dev` are `val`, `restval` joins `train` (as for
    captions); any other name is kept, stripped and in lower case (`test-dev`)."""
    spelled = name.strip().lower()
    return SPLIT_ALIASES.get(spelled, spelled)


VQA_FORMATS: dict[str, tuple[str, str]] = {
    "vqav2": ("captune.data.vqa.vqav2", "read_vqav2"),
    "okvqa": ("captune.data.vqa.vqav2", "read_vqav2"),
    "aokvqa": ("captune.data.vqa.aokvqa", "read_aokvqa"),
    "manifest": ("captune.data.vqa.manifest", "read_vqa_manifest"),
    "hf": ("captune.data.vqa.hf", "read_vqa_hf"),
    "synthetic": ("captune.data.synthetic", "read_synthetic_vqa"),
}
"""Module and function of each VQA `--format` name, imported on first use. `okvqa` reads OK-VQA's files, which
have VQAv2's names and fields."""

VqaReader = Callable[[Path, VqaReadOptions], VqaSet]


def read_vqa(format: str, data_dir: Path | str, options: VqaReadOptions | None = None) -> VqaSet:
    """Read a VQA dataset with the reader registered for `format`.

    Args:
        format: A key of `VQA_FORMATS`.
        data_dir: The dataset folder (`~` is expanded); `hf` also takes a dataset name, `manifest` the manifest file.
        options: Columns, split and location options; defaults to `VqaReadOptions()`.

    Returns:
        Usable questions in a deterministic order, and a `Problem` for everything that could not be used.

    Raises:
        CaptuneError: Unknown format, missing data folder, or missing or unreadable annotation files.
    """
    if format not in VQA_FORMATS:
        raise CaptuneError(f"unknown VQA data format {format!r}; choose one of: {', '.join(VQA_FORMATS)}")
    module, function = VQA_FORMATS[format]
    reader: VqaReader = getattr(importlib.import_module(module), function)
    folder = Path(data_dir).expanduser()
    options = options or VqaReadOptions()
    if format == "hf" and not folder.exists():
        return reader(Path(data_dir), options)  # a dataset name on the Hugging Face hub or in its cache
    if format == "manifest" and folder.is_file():
        folder, options = folder.parent, dataclasses.replace(options, annotations=str(folder.resolve()))
    if format == "synthetic":
        folder.mkdir(parents=True, exist_ok=True)
    if not folder.is_dir():
        raise CaptuneError(f"data folder {folder} does not exist or is not a folder; give the folder of the dataset")
    return reader(folder.resolve(), options)


def check_vqa_images(
    vs: VqaSet, *, workers: int | None = None, sample: int | None = None, progress: bool = True
) -> VqaSet:
    """Decode each image once (as `captune.data.check_images` does); the questions of an image that fails move to
    the problems, one problem an image. `vs` is not changed."""
    first: dict[Path, Question] = {}
    for q in vs.questions:
        first.setdefault(q.image_path, q)
    # Records named by their path, so that each failure is found again by its file.
    records = [Record(str(path), path, (), q.split) for path, q in first.items()]
    checked = check_images(CaptionSet(records), workers=workers, sample=sample, progress=progress)
    failed = {Path(p.image): p.problem for p in checked.problems}
    counts = Counter(q.image_path for q in vs.questions if q.image_path in failed)
    problems = [Problem(first[path].image_id, f"{failed[path]} ({count} question(s) of this image not used)")
                for path, count in counts.items()]  # fmt: skip
    kept = [q for q in vs.questions if q.image_path not in failed]
    return VqaSet(kept, vs.problems + problems, vs.notes + checked.notes)


def vqa_summary(vs: VqaSet) -> dict[str, object]:
    """Counts for `captune data check`: questions, images and answers, questions and images per split, how many
    questions have how many answers, answer types, and every problem and note (JSON-ready)."""
    per_answers = Counter(len(q.answers) for q in vs.questions)
    return {
        "questions": len(vs.questions),
        "images": len({q.image_path for q in vs.questions}),
        "answers": sum(len(q.answers) for q in vs.questions),
        "splits": {split: len(vs.split(split)) for split in vs.splits()},
        "images_per_split": {split: len({q.image_path for q in vs.split(split)}) for split in vs.splits()},
        "answers_per_question": {str(n): per_answers[n] for n in sorted(per_answers)},
        "answer_types": dict(Counter(q.answer_type for q in vs.questions if q.answer_type is not None)),
        "problems": [{"image": p.image, "problem": p.problem} for p in vs.problems],
        "notes": list(vs.notes),
    }
