"""Questions from table rows (a manifest's lines, a Hugging Face dataset's rows): the cells parsed, the rows of one
question joined, the split given or seeded, and a problem for every row or cell that is not used."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from captune.data import SPLITS, Problem, seeded_split
from captune.data.vqa import QuestionId, QuestionListing, VqaReadOptions, VqaSet, split_name, usable_questions


@dataclass(frozen=True)
class Row:
    """One row, its cells as read (None where the column is absent or empty)."""

    where: str
    """`file:line` or `<dataset>: <split> row <n>`; starts the text of the row's problems."""
    image_id: str
    """The image as the row names it; for a seeded split, its name relative to the dataset."""
    image_path: Path | None
    """The image file (resolved: one file under several spellings is one image), or None when the row has none."""
    image_error: str | None
    """Why the row has no image, when it has none."""
    default_id: QuestionId
    """The question's id when the row gives none: its line, or `<split>/<row>`."""
    question: object
    answers: object
    answer: object
    split: object
    question_id: object = None
    answer_type: object = None
    question_type: object = None


def row_of_cells(
    where: str,
    image: tuple[Path | None, str, str | None],
    default_id: QuestionId,
    cells: Mapping[str, object],
    split: object,
    options: VqaReadOptions,
) -> Row:
    """A `Row` from its image (file or None, id, why there is none) and its cells by column (absent: None)."""
    path, image_id, error = image
    return Row(where, image_id, path, error, default_id, cells.get(options.question_column),
               cells.get(options.answers_column), cells.get(options.answer_column), split,
               cells.get(options.question_id_column), cells.get(options.answer_type_column),
               cells.get(options.question_type_column))  # fmt: skip


@dataclass
class _Question:
    """The rows of one question, joined."""

    row: Row
    """The first of them."""
    question_id: QuestionId
    question: str
    split: str | None
    answers: list[str] = field(default_factory=list)


class RowQuestions:
    """Rows collected into questions, in one pass: rows that give the same `question_id`, or (without one) the same
    image and question text, are one question and add their answers (one row per annotator is fine)."""

    def __init__(self, name: str, options: VqaReadOptions) -> None:
        self.name, self.options = name, options
        self.problems: list[Problem] = []
        self.questions: dict[tuple[object, ...], _Question] = {}
        self.joined = 0
        self.first_split: str | None = None
        """`where` of the first row that gives a split."""

    def _problem(self, row: Row, what: str) -> None:
        self.problems.append(Problem(row.image_id or row.where, f"{row.where}: {what}"))

    def add(self, row: Row) -> None:
        """Add one row to its question, or a problem for the row (and one for each unusable answer in it)."""
        if row.image_path is None:
            self._problem(row, row.image_error or "no image")
            return
        question = row.question.strip() if isinstance(row.question, str) else ""
        if not question:
            self._problem(row, f"no question in {self.options.question_column!r}: {_shown(row.question)}")
            return
        split = self._split(row)
        question_id = self._question_id(row)
        if split == "" or question_id is None:
            return
        answers = self._answers(row)
        key: tuple[object, ...] = ("id", question_id) if row.question_id is not None else (row.image_path, question)
        earlier = self.questions.get(key)
        if earlier is None:
            self.questions[key] = _Question(row, question_id, question, split, answers)
        elif earlier.split != split:
            self._problem(row, f"split {split!r} differs from {earlier.split!r} of the same question at "
                          f"{earlier.row.where}; a question belongs to one split, so this row is not used")  # fmt: skip
        else:
            earlier.answers += answers
            self.joined += 1

    def _split(self, row: Row) -> str | None:
        """The split the row gives, None if it gives none, or "" (with a problem) when it is not a split name."""
        if row.split is None or (isinstance(row.split, str) and not row.split.strip()):
            return None
        if not isinstance(row.split, str):
            self._problem(row, f"split is {_shown(row.split)}, not a split name")
            return ""
        self.first_split = self.first_split or row.where
        return split_name(row.split)

    def _question_id(self, row: Row) -> QuestionId | None:
        value = row.question_id
        if value is None:
            return row.default_id
        if isinstance(value, bool) or not isinstance(value, int | str) or value == "":
            self._problem(row, f"{self.options.question_id_column!r} is {_shown(value)}; give an integer or a text")
            return None
        return value

    def _answers(self, row: Row) -> list[str]:
        """The row's answers: a list or a separated string in the answers column, or one answer in the answer
        column; a problem for each item that is not a non-empty text."""
        options = self.options
        if row.answers is not None and row.answer is not None:
            self._problem(row, f"gives both {options.answers_column!r} and {options.answer_column!r}; give one; "
                          f"{options.answer_column!r} is not used")  # fmt: skip
        column, value = (options.answers_column, row.answers) if row.answers is not None else \
            (options.answer_column, row.answer)  # fmt: skip
        if isinstance(value, str):
            separated = column == options.answers_column and options.answer_separator
            items: list[object] = list(value.split(options.answer_separator)) if separated else [value]
        elif isinstance(value, list) and column == options.answers_column:
            items = value
        else:
            if value is not None:
                self._problem(row, f"{column!r} is {_shown(value)}, not a text or a list of texts")
            return []
        answers, wrong = answer_list(items, column)
        for what in wrong:
            self._problem(row, what)
        return answers

    def vqa_set(self) -> VqaSet:
        """The collected questions as a `VqaSet`: the seeded split when no row gives one, a problem for each row
        without a split when some give one, for each question without answers in a split where others have them;
        a split in which no question has an answer is kept without answers, with a note."""
        notes: list[str] = []
        if self.first_split is None:
            notes.append(self._seed_splits())
        answered = {q.split for q in self.questions.values() if q.answers}
        listings = []
        for q in self.questions.values():
            if q.split is None:
                self._problem(q.row, f"no split, though {self.first_split} gives one; give every row a split, or "
                              "none to split by the seed")  # fmt: skip
            elif not q.answers and q.split in answered:
                self._problem(q.row, f"no answer in {self.options.answers_column!r} or "
                              f"{self.options.answer_column!r}")  # fmt: skip
            else:
                assert q.row.image_path is not None  # rows without an image are not collected
                listings.append(QuestionListing(q.question_id, q.question, q.row.image_id, q.row.image_path,
                                                tuple(q.answers), q.split, q.row.where, text_or_none(q.row.answer_type),
                                                text_or_none(q.row.question_type)))  # fmt: skip
        unanswered = sorted({q.split for q in self.questions.values() if q.split is not None} - answered)
        if unanswered:
            notes.append(f"{self.name}: no question of split(s) {', '.join(unanswered)} has an answer: they are "
                         "read as splits without answers (as a test split)")  # fmt: skip
        if self.joined:
            notes.append(f"{self.name}: {self.joined} row(s) add answers to the question of an earlier row (the same "
                         "question_id, or the same image and question)")  # fmt: skip
        found = usable_questions(listings)
        return VqaSet(found.questions, self.problems + found.problems, notes + found.notes)

    def _seed_splits(self) -> str:
        """Give every question the seeded split of its image; the note that says so."""
        names = {q.row.image_id for q in self.questions.values()}
        split_of = seeded_split(sorted(names), self.options)
        for q in self.questions.values():
            q.split = split_of[q.row.image_id]
        counts = "/".join(str(list(split_of.values()).count(split)) for split in SPLITS)
        return (f"{self.name} gives no {self.options.split_column!r}: split its {len(names)} images with seed "
                f"{self.options.seed} into train/val/test {counts}")  # fmt: skip


def answer_list(items: Sequence[object], column: str) -> tuple[list[str], list[str]]:
    """The answers among `items` (texts, or `{"answer": text}` objects as VQAv2 has them), stripped, and what is
    wrong with each item that is not a non-empty answer (`answers[2] is 7, not an answer`)."""
    answers, wrong = [], []
    for index, item in enumerate(items):
        answer = item.get("answer") if isinstance(item, dict) else item
        if isinstance(answer, str) and answer.strip():
            answers.append(answer.strip())
        else:
            wrong.append(f"{column}[{index}] is {_shown(item)}, not an answer")
    return answers, wrong


def text_or_none(value: object) -> str | None:
    """A type cell as text, or None when it is not a non-empty text."""
    return value.strip() if isinstance(value, str) and value.strip() else None


def _shown(value: object) -> str:
    """A cell as JSON shows it, cut to a readable length."""
    text = json.dumps(value, ensure_ascii=False, default=repr)
    return text if len(text) <= 60 else f"{text[:57]}..."
