"""VQA accuracy: equal to the official VQA evaluation (run from tests/official/) on a generated adversarial case, the
normalisation answer by answer, the leave-one-out values, and the errors for bad files."""

import contextlib
import io
import json
import random
import warnings
from pathlib import Path

import pytest

from captune.errors import CaptuneError
from captune.vqa_accuracy import AnnotatedQuestion, normalize_answer, question_accuracy, vqa_accuracy
from captune.vqa_files import evaluate_vqa_files, write_vqa_metrics
from tests.official.vqa import VQA

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)  # the official file writes regex escapes in plain strings
    from tests.official.vqa_eval import VQAEval

# Answers that normalise to the same text, and near misses, by answer type and question type.
POOLS = {
    ("yes/no", "is there a"): ["yes", "Yes", "yes.", "YES!", " yes ", "yes\n", "no", "No.", "no!", "nope", "yes, no"],
    ("number", "how many"): ["2", "two", "Two", "2.", "2.0", "3", "three", "ten", "10", "1,000", "1000", "1, 000",
                             "none", "0", "zero", "3.5", "3 .5", "one hundred", "1 - 2"],
    ("other", "what color is the"): ["red", "Red.", "red/white", "red white", "red, white", "red-white", "(red)",
                                     "the red one", "a red", "white and red", "red & white"],
    ("other", "what"): ["a dog", "the dog", "dog", "Dog.", "dogs", "hot-dog", "hot dog", "hotdog", "dont know",
                        "don't know", "cant tell", "can't tell", "its", "it's", "5 oclock", "5 o'clock", "t-shirt",
                        "t shirt", "a", "the", "an apple", "apple", "\tapple\t", "apple pie", "Im", "im",
                        "." * 40 + "x", "x" + ". " * 40, "somebody'd", "e.g. this", "u.s.a.", "mr. t"],
    ("other", "where is the"): ["on the left", "left", "Left!", "left side", "on left", "the left", "@home", "home",
                                "<home>", "[home]", "top-left", "top left", "top, left", "_top_", "`top`"],
}  # fmt: skip


def _case(seed: int = 0, count: int = 400) -> tuple[dict, dict, list[dict]]:
    """Questions file, annotation file and results of an adversarial case: every pool, answers drawn so that match
    counts from 0 to 10 occur, a question whose ten annotators agree on `yes` answered `Yes` (scored 0 officially),
    and one with one and with two matching annotators."""
    rng = random.Random(seed)
    kinds = list(POOLS)
    questions, annotations, results = [], [], []
    for index in range(count):
        answer_type, question_type = kinds[index % len(kinds)]
        pool = POOLS[(answer_type, question_type)]
        favourite = rng.choice(pool)
        answers = [favourite if rng.random() < rng.random() else rng.choice(pool) for _ in range(10)]
        prediction = rng.choice(pool + [favourite] * 3 + ["something else"])
        questions.append({"image_id": 1000 + index // 3, "question": f"{question_type} ...?", "question_id": index})
        annotations.append(_annotation(index, answers, answer_type, question_type))
        results.append({"question_id": index, "answer": prediction})
    special = [(["yes"] * 10, "Yes", "yes/no", "is there a"), (["two"] * 2 + ["3"] * 8, "2", "number", "how many"),
               (["hot dog"] + ["pizza"] * 9, "hot-dog", "other", "what")]  # fmt: skip
    for offset, (answers, prediction, answer_type, question_type) in enumerate(special):
        question_id = count + offset
        questions.append({"image_id": 9, "question": "special?", "question_id": question_id})
        annotations.append(_annotation(question_id, answers, answer_type, question_type))
        results.append({"question_id": question_id, "answer": prediction})
    rng.shuffle(results)
    header = {"info": {}, "task_type": "Open-Ended", "data_type": "mscoco", "data_subtype": "val2014", "license": {}}
    return {**header, "questions": questions}, {**header, "annotations": annotations}, results


def _annotation(question_id: int, answers: list[str], answer_type: str, question_type: str) -> dict:
    return {
        "question_id": question_id,
        "image_id": 1000 + question_id // 3,
        "question_type": question_type,
        "answer_type": answer_type,
        "multiple_choice_answer": answers[0],
        "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": k + 1} for k, a in enumerate(answers)],
    }


def _write_case(folder: Path, seed: int = 0) -> tuple[Path, Path, Path]:
    questions, annotations, results = _case(seed)
    paths = folder / "questions.json", folder / "annotations.json", folder / "results.json"
    for path, value in zip(paths, (questions, annotations, results), strict=True):
        path.write_text(json.dumps(value))
    return paths


def _official(questions: Path, annotations: Path, results: Path, digits: int) -> VQAEval:
    """The official evaluation of the files, its prints swallowed."""
    with contextlib.redirect_stdout(io.StringIO()):
        vqa = VQA(str(annotations), str(questions))
        evaluation = VQAEval(vqa, vqa.loadRes(str(results), str(questions)), n=digits)
        evaluation.evaluate()
    return evaluation


@pytest.mark.parametrize("seed", [0, 1])
def test_equals_the_official_evaluation_on_an_adversarial_case(tmp_path: Path, seed: int) -> None:
    questions, annotations, results = _write_case(tmp_path, seed)
    ours = evaluate_vqa_files(results, annotations, questions)
    # 15 decimals: the official numbers before its rounding, to well under 1e-9.
    official = _official(questions, annotations, results, digits=15).accuracy
    assert set(ours.per_answer_type) == set(official["perAnswerType"]) == {"yes/no", "number", "other"}
    assert set(ours.per_question_type) == set(official["perQuestionType"])
    pairs = [(ours.overall, official["overall"])]
    pairs += [(ours.per_answer_type[k], v) for k, v in official["perAnswerType"].items()]
    pairs += [(ours.per_question_type[k], v) for k, v in official["perQuestionType"].items()]
    assert max(abs(a - b) for a, b in pairs) <= 1e-9
    # The case is adversarial: not all right, not all wrong, the quirk of unanimous answers included.
    assert 20 < ours.overall < 80
    assert {0.0, 30.0, 60.0, 100.0} <= {round(v, 9) for v in ours.per_question.values()}


def test_each_question_and_the_rounded_numbers_equal_the_official(tmp_path: Path) -> None:
    questions, annotations, results = _write_case(tmp_path)
    ours = evaluate_vqa_files(results, annotations, questions)
    unrounded = _official(questions, annotations, results, digits=15)
    assert unrounded.evalQA.keys() == ours.per_question.keys()
    assert max(abs(ours.per_question[q] - v) for q, v in unrounded.evalQA.items()) <= 1e-9
    rounded = _official(questions, annotations, results, digits=2).accuracy  # the official default, n=2
    assert round(ours.overall, 2) == rounded["overall"]
    assert {k: round(v, 2) for k, v in ours.per_answer_type.items()} == rounded["perAnswerType"]
    assert ours.per_question[400] == 0.0  # ten times "yes", answered "Yes": not normalised, as officially
    assert ours.per_question[401] == pytest.approx(60.0)  # two matching annotators of ten
    assert ours.per_question[402] == pytest.approx(30.0)  # one, and only after normalising "hot-dog"


def test_normalisation_equals_the_official_answer_by_answer(tmp_path: Path) -> None:
    questions, annotations, results = _write_case(tmp_path)
    with contextlib.redirect_stdout(io.StringIO()):
        official = VQAEval(VQA(str(annotations), str(questions)), None, n=2)
    rng = random.Random(0)
    alphabet = "ab 1,2.3-/!?'\"()[]@_`;:=+<>\\{}&"
    texts = [answer for pool in POOLS.values() for answer in pool]
    texts += ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 12))) for _ in range(3000)]
    for text in texts:
        text = text.strip()
        assert normalize_answer(text) == official.processDigitArticle(official.processPunctuation(text)), text


@pytest.mark.parametrize(
    ("text", "normalised"),
    [("Two dogs.", "2 dogs"), ("hot-dog", "hot dog"), ("1,000", "1000"), ("3.5", "3.5"), ("dont", "don't"),
     ("the cat", "cat"), ("none", "0"), ("red, white", "red white"), ("yes!", "yes"), ("." * 40, "." * 8)],
)  # fmt: skip
def test_normalize_answer(text: str, normalised: str) -> None:
    assert normalize_answer(text) == normalised


def test_digits_are_ascii_digits_as_in_the_python_2_original() -> None:
    # Arabic-Indic 1,2: no digit-comma-digit for Python 2's `re`, so the comma becomes a space.
    assert normalize_answer("\u0661,\u0662") == "\u0661 \u0662"


@pytest.mark.parametrize(("matches", "accuracy"), [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_leave_one_out_accuracy_by_matching_annotators(matches: int, accuracy: float) -> None:
    answers = ["cat"] * matches + ["dog", "bird"] * 5
    assert question_accuracy("cat", answers[:10]) == pytest.approx(accuracy)


def test_unanimous_answers_are_compared_as_given() -> None:
    assert question_accuracy("yes", ["yes"] * 10) == 1.0
    assert question_accuracy("Yes", ["yes"] * 10) == 0.0
    assert question_accuracy("Yes", ["yes"] * 9 + ["yes."]) == 1.0  # answers differ: both sides normalised


def test_in_memory_scores_a_subset_by_answer_and_question_type() -> None:
    references = [AnnotatedQuestion(1, ("yes",) * 10, "yes/no", "is the"), AnnotatedQuestion(2, ("2",) * 10, "number",
                  None), AnnotatedQuestion("q3", ("red",) * 10, None, None)]  # fmt: skip
    scores = vqa_accuracy({1: "yes", 2: "3", "q3": "red"}, references)
    assert scores.overall == pytest.approx(200 / 3)
    assert scores.per_answer_type == {"yes/no": 100.0, "number": 0.0}
    assert scores.per_question_type == {"is the": 100.0}
    assert vqa_accuracy({1: "no"}, references[:1]).overall == 0.0


def test_metrics_file_has_the_official_shape(tmp_path: Path) -> None:
    scores = vqa_accuracy({1: "yes"}, [AnnotatedQuestion(1, ("yes",) * 10, "yes/no", "is the")])
    write_vqa_metrics(tmp_path / "metrics.json", scores)
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written == {"overall": 100.0, "perAnswerType": {"yes/no": 100.0}, "perQuestionType": {"is the": 100.0}}


def _files(tmp_path: Path, results: object, annotations: object | None = None) -> tuple[Path, Path]:
    questions, default_annotations, _ = _case(count=3)
    (tmp_path / "r.json").write_text(json.dumps(results))
    (tmp_path / "a.json").write_text(json.dumps(default_annotations if annotations is None else annotations))
    (tmp_path / "q.json").write_text(json.dumps(questions))
    return tmp_path / "r.json", tmp_path / "a.json"


def _answered(*ids: object) -> list[dict]:
    return [{"question_id": question_id, "answer": "yes"} for question_id in ids]


@pytest.mark.parametrize(
    ("results", "message"),
    [
        ({"question_id": 1}, r"r.json: expected a list .* found an object"),
        ([*_answered(0, 1, 2, 3, 4), 7], r"r.json: \[5\]: is a number; expected an object"),
        ([*_answered(0, 1, 2, 3, 4), {"question_id": 5}], r"r.json: \[5\]: 'answer' is missing"),
        ([*_answered(0, 1, 2, 3, 4, 5), {"question_id": 2, "answer": "no"}], r"\[6\]: question_id 2 is answered at "
                                                                             r"\[2\] already"),
        (_answered(0, 1, 2, 3, 4, 5, 99), r"1 answer\(s\) for questions the annotations do not have: 99"),
        (_answered(0, 1, 2, 3, 4, "5"), r"'5' is written as str; the annotations have 5"),
        (_answered(0, 2, 3, 4), r"2 of 6 annotated questions have no answer: 1, 5; the official evaluation requires"),
    ],
)  # fmt: skip
def test_bad_results_are_named_by_file_and_entry(tmp_path: Path, results: object, message: str) -> None:
    results_file, annotations_file = _files(tmp_path, results)
    with pytest.raises(CaptuneError, match=message):
        evaluate_vqa_files(results_file, annotations_file, tmp_path / "q.json")


def test_bad_annotations_are_named_by_file_and_entry(tmp_path: Path) -> None:
    _, annotations, _ = _case(count=3)
    annotations["annotations"][1]["answers"][4] = dict(annotations["annotations"][1]["answers"][3])
    results_file, annotations_file = _files(tmp_path, _answered(*range(6)), annotations)
    with pytest.raises(CaptuneError, match=r"a.json: annotations\[1\]: answers\[4\] equals answers\[3\] in every"):
        evaluate_vqa_files(results_file, annotations_file)
    del annotations["annotations"][2]["answer_type"]
    results_file, annotations_file = _files(tmp_path, _answered(*range(6)), {"annotations": annotations["annotations"]
                                            [2:]})  # fmt: skip
    with pytest.raises(CaptuneError, match=r"a.json: annotations\[0\]: 'answer_type' is missing"):
        evaluate_vqa_files(results_file, annotations_file)


def test_annotations_of_another_split_than_the_questions_are_refused(tmp_path: Path) -> None:
    _, annotations, _ = _case(count=3)
    annotations["annotations"].pop(0)
    results_file, annotations_file = _files(tmp_path, _answered(*range(1, 6)), annotations)
    with pytest.raises(CaptuneError, match=r"q.json: questions\[0\]: question_id 0 has no annotation in .*a.json"):
        evaluate_vqa_files(results_file, annotations_file, tmp_path / "q.json")
