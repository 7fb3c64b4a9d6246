"""VQA accuracy as the official VQA evaluation computes it (GT-Vision-Lab/VQA, `vqaEval.py`), in percent, unrounded.

For each question the predicted answer is compared with the ten annotators' answers: against each set of nine
(one annotator left out in turn) it scores `min(1, matches / 3)`, and the question's accuracy is the mean of the ten.
Answers are normalised first (punctuation, number words to digits, articles dropped, contractions restored), but,
as in the official script, only for questions whose annotators did not all give the same answer: when all ten say
`yes`, the prediction `Yes` scores 0 there too. The overall number is the mean over questions, also per answer type
(`yes/no`, `number`, `other`) and per question type (`what color is the`, ...), each times 100.

Where this differs from the official script (each on purpose, none changes a number on VQAv2's files):
- Nothing is rounded. The official script rounds every number it keeps to 2 decimals (`round(x, n)`, n=2, in
  `setAccuracy` and `setEvalQA` / `setEvalQuesType` / `setEvalAnsType`); `round(overall, 2)` of ours is its
  overall (up to exact halves, where Python 2 and 3 round differently).
- Malformed files, a result for a question the annotations do not have, two results for one question and a question
  without a result are errors naming the file and entry. The official script asserts that the results cover exactly
  the annotated questions (so missing results are refused there too), and keeps the last of two results silently.
  To score a subset of questions, call `vqa_accuracy` with those questions (the official `evaluate(quesIds)`).
- The official script leaves out of each set every answer entry *equal* to the held-out one (the whole entry:
  answer, confidence, id); VQAv2's answer ids are distinct within a question, so that is one entry, and
  `captune.vqa_files.load_vqa_references` refuses a file where two entries of a question are equal.
- `\\d` matches ASCII digits only, as in the Python 2 original (Python 3's `re` would also take other scripts').

`tests/test_vqa_accuracy.py` runs the official code itself (tests/official/) on a generated adversarial case and
compares every number.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from captune.errors import CaptuneError
from captune.metric_inputs import some_ids

QuestionId = int | str
"""A question's id: an integer in VQAv2 and OK-VQA, a string in A-OKVQA."""

# The official tables, in the official order (GT-Vision-Lab/VQA, vqaEval.py).
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's", "thered": "there'd",
    "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're", "theres": "there's",
    "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're",
    "theyve": "they've", "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're", "whats": "what's",
    "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's", "whereve": "where've",
    "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've", "wholl": "who'll", "whos": "who's",
    "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've",
    "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll", "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've",
    "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}  # fmt: skip
"""Words written without their apostrophe -> with it (the official `contractions`, its oddities kept:
`somebody'd` -> `somebodyd`, and the keys with capitals, which never match a lower-cased word)."""
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}  # fmt: skip
"""Number words -> digits (the official `manualMap`; `none` is 0 there too)."""
ARTICLES = ("a", "an", "the")
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?",
               "!")  # fmt: skip
"""Marks removed or turned into a space (the official `punct`, in its order: the order of the replacements)."""
_DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)", re.ASCII)
"""The official `commaStrip`; only searched for: a text where it matches loses its punctuation without spaces."""
_PERIOD = re.compile(r"\.(?!\d)", re.ASCII)
"""The official `periodStrip`, `(?!<=\\d)(\\.)(?!\\d)`: its `(?!<=\\d)` is a look-ahead for the text `<=` and a digit,
which never matches where a period starts, so it is a period not followed by a digit."""
_PERIODS_REMOVED = 32
"""At most this many periods are removed from an answer: the official call is `periodStrip.sub("", text,
re.UNICODE)`, whose third argument is `count`, and `re.UNICODE` is 32."""


class Reference(Protocol):
    """What scoring needs of a question: its id, the annotators' answers and, where known, its types.

    `captune.data.vqa`'s records are references, and so is what `load_vqa_references` returns.
    """

    @property
    def question_id(self) -> QuestionId: ...
    @property
    def answers(self) -> tuple[str, ...]: ...
    @property
    def answer_type(self) -> str | None: ...
    @property
    def question_type(self) -> str | None: ...


@dataclass(frozen=True)
class AnnotatedQuestion:
    """A question as an official annotation file gives it."""

    question_id: QuestionId
    answers: tuple[str, ...]
    """Each annotator's answer, in file order (ten in VQAv2)."""
    answer_type: str | None
    """`yes/no`, `number` or `other` in VQAv2."""
    question_type: str | None
    """The question's first words as VQA's list of types names them (`what color is the`)."""


@dataclass(frozen=True)
class VqaAccuracy:
    """VQA accuracy in percent (0-100), unrounded."""

    overall: float
    per_answer_type: dict[str, float]
    """Answer type -> accuracy over its questions (questions without a type count in `overall` only)."""
    per_question_type: dict[str, float]
    """Question type -> accuracy over its questions."""
    per_question: dict[QuestionId, float] = field(repr=False)
    """Question id -> its accuracy (the official `evalQA`, unrounded): 0, 30, 60, 90 or 100 with ten answers."""

    def as_json(self) -> dict[str, object]:
        """The official result's shape: `{"overall": ..., "perAnswerType": {...}, "perQuestionType": {...}}`."""
        return {"overall": self.overall, "perAnswerType": self.per_answer_type,
                "perQuestionType": self.per_question_type}  # fmt: skip


def clean_answer(text: str) -> str:
    """Tabs and line breaks as spaces, the ends stripped: what the official script does to every answer first."""
    return text.replace("\n", " ").replace("\t", " ").strip()


@functools.cache
def normalize_answer(text: str) -> str:
    """An answer as the official script compares it: its `processPunctuation`, then its `processDigitArticle`.

    Punctuation marks are removed when the answer has one with a space beside it or a digit-comma-digit (`1,000`),
    else each becomes a space (`hot-dog` -> `hot dog`); periods go unless a digit follows (`3.5` stays). Then it is
    lower-cased and split into words; number words become digits, articles go, and contractions get their
    apostrophe (`dont` -> `don't`). Expects a `clean_answer`ed text.
    """
    joined = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for mark in PUNCTUATION:
        # Each mark is looked for in the text as given, not as replaced so far, as in the official loop.
        out = out.replace(mark, "" if joined or f"{mark} " in text or f" {mark}" in text else " ")
    out = _PERIOD.sub("", out, count=_PERIODS_REMOVED)
    words = [NUMBER_WORDS.get(word, word) for word in out.lower().split()]
    return " ".join(CONTRACTIONS.get(word, word) for word in words if word not in ARTICLES)


def question_accuracy(answer: str, answers: Sequence[str]) -> float:
    """One question's accuracy, 0 to 1: `min(1, matches / 3)` over each leave-one-out set of `answers`, averaged.

    Args:
        answer: The predicted answer.
        answers: The annotators' answers (at least one).

    Raises:
        CaptuneError: `answers` is empty.
    """
    if not answers:
        raise CaptuneError("a question has no annotator answers; VQA accuracy needs at least one")
    given = clean_answer(answer)
    truths = [clean_answer(a) for a in answers]
    if len(set(truths)) > 1:  # the official script normalises nothing when all annotators agree
        given = normalize_answer(given)
        truths = [normalize_answer(a) for a in truths]
    matches = truths.count(given)
    # Leaving out an annotator who gave the predicted answer leaves one match fewer.
    return sum([min(1, (matches - (truth == given)) / 3) for truth in truths]) / len(truths)


def vqa_accuracy(
    predictions: Mapping[QuestionId, str], references: Sequence[Reference], *, source: str = "predictions"
) -> VqaAccuracy:
    """Score predicted answers, one per reference question, as the official VQA evaluation does.

    Args:
        predictions: Question id -> the predicted answer.
        references: The questions to score, in the order the means add them (the official: the annotation file's).
        source: Where the predictions came from (a file name), for error messages.

    Returns:
        The accuracies in percent, unrounded.

    Raises:
        CaptuneError: No references, a question id twice among them, a question without answers, a prediction for
            a question not among them, or a question without a prediction.
    """
    if not references:
        raise CaptuneError("no questions to score; give the annotated questions the predictions answer")
    known: dict[QuestionId, Reference] = {}
    for reference in references:
        if reference.question_id in known:
            raise CaptuneError(f"question_id {reference.question_id!r} is among the questions twice; list it once")
        known[reference.question_id] = reference
    _check_coverage(predictions, known, source)
    per_question = {q.question_id: question_accuracy(predictions[q.question_id], q.answers) for q in references}
    by_answer_type: dict[str, list[float]] = {}
    by_question_type: dict[str, list[float]] = {}
    for q in references:
        if q.answer_type is not None:
            by_answer_type.setdefault(q.answer_type, []).append(per_question[q.question_id])
        if q.question_type is not None:
            by_question_type.setdefault(q.question_type, []).append(per_question[q.question_id])
    return VqaAccuracy(
        overall=_percent(list(per_question.values())),
        per_answer_type={kind: _percent(values) for kind, values in by_answer_type.items()},
        per_question_type={kind: _percent(values) for kind, values in by_question_type.items()},
        per_question={question_id: 100 * value for question_id, value in per_question.items()},
    )


def _percent(values: list[float]) -> float:
    """`100 * sum / count`, in that order, as the official `setAccuracy` computes it (before its rounding)."""
    return 100 * float(sum(values)) / len(values)


def _check_coverage(predictions: Mapping[QuestionId, str], known: Mapping[QuestionId, Reference], source: str) -> None:
    """Refuse predictions for unknown questions, questions without a prediction, and answers that are not text."""
    unknown = [question_id for question_id in predictions if question_id not in known]
    if unknown:
        hint = _id_type_hint(unknown[0], known)
        raise CaptuneError(f"{source}: {len(unknown)} answer(s) for questions the annotations do not have: "
                           f"{some_ids(unknown)}{hint}; check that the results and the annotations are of the same "
                           "split")  # fmt: skip
    missing = [question_id for question_id in known if question_id not in predictions]
    if missing:
        raise CaptuneError(f"{source}: {len(missing)} of {len(known)} annotated questions have no answer: "
                           f"{some_ids(missing)}; the official evaluation requires an answer to every question, as "
                           "here (a score over fewer is not comparable): answer them all, or score the answered "
                           "questions alone in Python with vqa_accuracy(predictions, those questions)")  # fmt: skip
    for question_id, answer in predictions.items():
        if not isinstance(answer, str):
            raise CaptuneError(f"{source}: the answer to question_id {question_id!r} is {answer!r}; write text")


def _id_type_hint(question_id: QuestionId, known: Mapping[QuestionId, Reference]) -> str:
    """A hint when an unknown id is a known one written as another type (`"1"` for `1`)."""
    spelled = {str(key): key for key in known}
    match = spelled.get(str(question_id))
    if match is None:
        return ""
    return f" ({question_id!r} is written as {type(question_id).__name__}; the annotations have {match!r})"
