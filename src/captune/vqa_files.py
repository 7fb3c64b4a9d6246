"""The official VQA files: results (`[{"question_id": ..., "answer": ...}]`), annotations and questions read and
checked (every malformed entry an error naming file and entry), scored by `captune.vqa_accuracy`, and the metrics
written in the official result's shape."""

from __future__ import annotations

import json
from pathlib import Path

from captune.data import read_json
from captune.errors import CaptuneError
from captune.files import write_atomically
from captune.metric_inputs import some_ids
from captune.vqa_accuracy import AnnotatedQuestion, QuestionId, VqaAccuracy, vqa_accuracy


def results_from_list(entries: object, source: str = "results") -> dict[QuestionId, str]:
    """The answers of an official results list, `[{"question_id": ..., "answer": ...}, ...]`.

    Other keys of an entry are ignored.

    Raises:
        CaptuneError: Not a list, an entry that is not an object or lacks a key, a question id that is not an integer
            or a string, an answer that is not text, or two entries for one question (naming both).
    """
    if not isinstance(entries, list):
        raise CaptuneError(f"{source}: expected a list of {{'question_id': ..., 'answer': ...}}, found "
                           f"{_json_kind(entries)}; this is the official VQA results format")  # fmt: skip
    answers: dict[QuestionId, str] = {}
    first: dict[QuestionId, int] = {}
    for index, entry in enumerate(entries):
        where = f"{source}: [{index}]"
        question_id = _question_id(where, entry)
        answer = entry.get("answer") if isinstance(entry, dict) else None
        if not isinstance(answer, str):
            found = "missing" if isinstance(entry, dict) and "answer" not in entry else _json_kind(answer)
            raise CaptuneError(f"{where}: 'answer' is {found}; every entry needs the answer as text")
        if question_id in answers:
            raise CaptuneError(
                f"{where}: question_id {question_id!r} is answered at [{first[question_id]}] already; write one "
                "answer per question (the official script keeps the last silently)"
            )
        answers[question_id], first[question_id] = answer, index
    return answers


def references_from_annotations(data: object, source: str = "annotations") -> list[AnnotatedQuestion]:
    """The questions of an official annotation file's content, `{"annotations": [...]}`, in file order.

    Each annotation needs `question_id`, `answers` (a non-empty list of `{"answer": ...}`), `answer_type` and
    `question_type`, as the official script does.

    Raises:
        CaptuneError: Another shape, an annotation that lacks one of those, a question id twice, or two answer
            entries of a question that are equal (the official script would leave both out of each other's sets).
    """
    annotations = data.get("annotations") if isinstance(data, dict) else None
    if not isinstance(annotations, list):
        found = _json_kind(data) if not isinstance(data, dict) else "an object without 'annotations'" if \
            "annotations" not in data else f"'annotations' as {_json_kind(annotations)}"  # fmt: skip
        raise CaptuneError(f"{source}: expected an official VQA annotation file, an object with an 'annotations' "
                           f"list; found {found}")  # fmt: skip
    questions: list[AnnotatedQuestion] = []
    first: dict[QuestionId, int] = {}
    for index, entry in enumerate(annotations):
        where = f"{source}: annotations[{index}]"
        question = _annotated_question(where, entry)
        if question.question_id in first:
            raise CaptuneError(f"{where}: question_id {question.question_id!r} is annotated at "
                               f"annotations[{first[question.question_id]}] already; annotate it once")  # fmt: skip
        first[question.question_id] = index
        questions.append(question)
    return questions


def _annotated_question(where: str, entry: object) -> AnnotatedQuestion:
    question_id = _question_id(where, entry)
    assert isinstance(entry, dict)  # _question_id refuses anything else
    answers = entry.get("answers")
    if not isinstance(answers, list) or not answers:
        found = "missing" if "answers" not in entry else _json_kind(answers) if answers != [] else "an empty list"
        raise CaptuneError(f"{where}: 'answers' is {found}; expected the annotators' answers, "
                           "[{'answer': ..., 'answer_id': ...}, ...]")  # fmt: skip
    seen: dict[str, int] = {}
    for k, answer in enumerate(answers):
        if not isinstance(answer, dict) or not isinstance(answer.get("answer"), str):
            raise CaptuneError(f"{where}: answers[{k}] is {_shown(answer)}; expected {{'answer': text, ...}}")
        exact = json.dumps(answer, sort_keys=True)
        if exact in seen:
            raise CaptuneError(f"{where}: answers[{k}] equals answers[{seen[exact]}] in every field; give each "
                               "annotator's answer its own answer_id (the official script would leave both out "
                               "together)")  # fmt: skip
        seen[exact] = k
    types = []
    for key in ("answer_type", "question_type"):
        if not isinstance(entry.get(key), str):
            found = "missing" if key not in entry else _json_kind(entry[key])
            raise CaptuneError(f"{where}: {key!r} is {found}; the official evaluation needs it as text")
        types.append(entry[key])
    return AnnotatedQuestion(question_id, tuple(answer["answer"] for answer in answers), types[0], types[1])


def _question_id(where: str, entry: object) -> QuestionId:
    """The `question_id` of an entry that must be an object."""
    if not isinstance(entry, dict):
        raise CaptuneError(f"{where}: is {_json_kind(entry)}; expected an object with a 'question_id'")
    value = entry.get("question_id")
    if isinstance(value, bool) or not isinstance(value, int | str):
        found = "missing" if "question_id" not in entry else _shown(value)
        raise CaptuneError(f"{where}: 'question_id' is {found}; expected an integer (VQAv2) or a string")
    return value


def _json_kind(value: object) -> str:
    """What a parsed JSON value is, for a message."""
    kinds: dict[type, str] = {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
                              int: "a number", float: "a number", type(None): "null"}  # fmt: skip
    return kinds.get(type(value), type(value).__name__)


def _shown(value: object) -> str:
    """A JSON value as a file shows it, cut to a readable length."""
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 60 else f"{text[:57]}..."


def _load(path: Path) -> object:
    if not path.is_file():
        raise CaptuneError(f"{path}: no such file; check the path")
    return read_json(path)


def load_vqa_results(path: Path | str) -> dict[QuestionId, str]:
    """The answers of an official results file (see `results_from_list`)."""
    return results_from_list(_load(Path(path)), str(path))


def load_vqa_references(annotations: Path | str, questions: Path | str | None = None) -> list[AnnotatedQuestion]:
    """The annotated questions of an official annotation file, checked against its questions file when given.

    Args:
        annotations: `v2_mscoco_<split>_annotations.json` (or OK-VQA's `mscoco_<split>_annotations.json`).
        questions: The split's `..._questions.json`: every annotated question must be in it and every question
            annotated, with the same image (which catches the files of two splits given together).

    Raises:
        CaptuneError: A missing or malformed file (see `references_from_annotations`), or files that disagree.
    """
    references = references_from_annotations(_load(Path(annotations)), str(annotations))
    if questions is not None:
        _check_questions_file(Path(questions), Path(annotations), references)
    return references


def _check_questions_file(path: Path, annotations: Path, references: list[AnnotatedQuestion]) -> None:
    data = _load(path)
    entries = data.get("questions") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise CaptuneError(f"{path}: expected an official VQA questions file, an object with a 'questions' list")
    listed = {_question_id(f"{path}: questions[{index}]", entry): index for index, entry in enumerate(entries)}
    annotated = {reference.question_id for reference in references}
    unlisted = [question_id for question_id in annotated if question_id not in listed]
    unannotated = [question_id for question_id in listed if question_id not in annotated]
    if unannotated:
        raise CaptuneError(
            f"{path}: questions[{listed[unannotated[0]]}]: question_id {unannotated[0]!r} has no annotation in "
            f"{annotations} ({len(unannotated)} such question(s)); {_SAME_SPLIT}"
        )
    if unlisted:
        raise CaptuneError(f"{annotations}: {len(unlisted)} annotated question(s) are not in {path}: "
                           f"{some_ids(unlisted)}; {_SAME_SPLIT}")  # fmt: skip


_SAME_SPLIT = ("give the annotation and questions files of one split (a test split has no public annotations: score it "
               "on the evaluation server)")  # fmt: skip


def evaluate_vqa_files(
    results: Path | str, annotations: Path | str, questions: Path | str | None = None
) -> VqaAccuracy:
    """Score an official VQA results file against the split's annotation (and questions) file.

    Args:
        results: `[{"question_id": ..., "answer": ...}, ...]`, one answer for every annotated question.
        annotations: The split's official annotation file.
        questions: The split's official questions file, checked against the annotations; optional.

    Returns:
        The accuracies in percent, unrounded.

    Raises:
        CaptuneError: A file is missing or malformed, or the results do not answer exactly the annotated questions.
    """
    return vqa_accuracy(load_vqa_results(results), load_vqa_references(annotations, questions), source=str(results))


def write_vqa_metrics(path: Path, accuracy: VqaAccuracy) -> None:
    """Write `accuracy.as_json()` (indent 2) to `path`, atomically."""
    write_atomically(path, json.dumps(accuracy.as_json(), indent=2) + "\n")
