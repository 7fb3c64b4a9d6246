"""`captune evaluate`, called in-process (METEOR's JVM starts once for the module): the metrics written and
printed, and a missing file; `--task vqa` on official files the tests write, against `vqa_accuracy` itself, its bad
files, and the flags of the other task."""

from __future__ import annotations

import contextlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from captune import metrics
from captune.cli import main
from captune.metrics import METRIC_NAMES
from captune.vqa_accuracy import AnnotatedQuestion, VqaAccuracy, vqa_accuracy

from .conftest import assert_user_error


@dataclass
class Evaluated:
    code: int
    out: str
    metrics_file: Path


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory: pytest.TempPathFactory) -> Evaluated:
    folder = tmp_path_factory.mktemp("evaluate")
    references = {
        "images": [{"id": "1.jpg"}, {"id": "2.jpg"}],
        "annotations": [
            {"image_id": "1.jpg", "caption": "a red circle on the left"},
            {"image_id": "1.jpg", "caption": "a small red circle at the left"},
            {"image_id": "2.jpg", "caption": "a blue square at the top"},
            {"image_id": "2.jpg", "caption": "there is a large blue square on the top"},
        ],
    }
    predictions = [{"image_id": "1.jpg", "caption": "a red circle on the left"},
                   {"image_id": "2.jpg", "caption": "a green triangle, bottom"}]  # fmt: skip
    (folder / "refs.json").write_text(json.dumps(references))
    (folder / "preds.json").write_text(json.dumps(predictions))
    output = folder / "out" / "metrics.json"
    stdout = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(stdout):
        # SPICE would run for minutes where its CoreNLP jars exist; an empty lib folder skips it on every machine.
        patch.setattr(metrics, "_SPICE_LIB", folder / "no-spice")
        code = main(["evaluate", "--predictions", str(folder / "preds.json"), "--references",
                     str(folder / "refs.json"), "--output", str(output)])  # fmt: skip
    return Evaluated(code, stdout.getvalue(), output)


def test_evaluate_succeeds(evaluated: Evaluated) -> None:
    assert evaluated.code == 0


def test_evaluate_writes_flat_metrics_with_exactly_the_coco_keys(evaluated: Evaluated) -> None:
    scores = json.loads(evaluated.metrics_file.read_text())
    assert list(scores) == ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr"]
    assert all(isinstance(v, float) and v > 0 for v in scores.values())


def test_evaluate_prints_each_metric_and_why_spice_was_skipped(evaluated: Evaluated) -> None:
    lines = evaluated.out.splitlines()
    assert [line.split()[0] for line in lines] == [*METRIC_NAMES, "SPICE"]
    assert lines[-1].startswith("SPICE    skipped: Stanford CoreNLP jars not found")


def test_evaluate_with_a_missing_predictions_file_is_a_user_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    references = tmp_path / "refs.json"
    references.write_text(json.dumps({"annotations": [{"image_id": 1, "caption": "a red circle"}]}))
    code = main(["evaluate", "--predictions", str(tmp_path / "preds.json"), "--references", str(references)])
    assert_user_error(code, capsys.readouterr().err, str(tmp_path / "preds.json"))


# --- --task vqa ----------------------------------------------------------------------------------------------------

# (question id, image id, answer type, question type, the ten annotators' answers, the prediction): an exact match,
# a match after the official normalisation, two of three annotators, no match, a number word.
VQA_CASES = [
    (1, 10, "yes/no", "is the", ["yes"] * 10, "yes"),
    (2, 10, "other", "what color is the", ["red"] * 7 + ["dark red"] * 3, "Red."),
    (3, 11, "other", "what is the", ["a cup"] * 2 + ["mug"] * 8, "cup"),
    (4, 11, "number", "how many", ["2"] * 6 + ["3"] * 4, "4"),
    (5, 12, "number", "how many", ["two"] * 5 + ["2"] * 5, "two"),
]


@dataclass
class VqaFiles:
    results: Path
    annotations: Path
    questions: Path


@pytest.fixture
def vqa_files(tmp_path: Path) -> VqaFiles:
    """Official VQAv2 results, annotation and questions files of `VQA_CASES`."""
    annotations = [{"question_id": qid, "image_id": image, "answer_type": answer_type, "question_type": question_type,
                    "multiple_choice_answer": answers[0],
                    "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": k + 1}
                                for k, a in enumerate(answers)]}
                   for qid, image, answer_type, question_type, answers, _ in VQA_CASES]  # fmt: skip
    questions = [{"question_id": qid, "image_id": image, "question": "?"} for qid, image, *_ in VQA_CASES]
    results = [{"question_id": qid, "answer": predicted} for qid, *_, predicted in VQA_CASES]
    files = VqaFiles(tmp_path / "results.json", tmp_path / "annotations.json", tmp_path / "questions.json")
    files.annotations.write_text(json.dumps({"info": {}, "data_subtype": "val2014", "annotations": annotations}))
    files.questions.write_text(json.dumps({"info": {}, "data_subtype": "val2014", "questions": questions}))
    files.results.write_text(json.dumps(results))
    return files


def _vqa_args(files: VqaFiles, *more: str) -> list[str]:
    return ["evaluate", "--task", "vqa", "--predictions", str(files.results), "--annotations", str(files.annotations),
            *more]  # fmt: skip


def _expected_accuracy() -> VqaAccuracy:
    references = [AnnotatedQuestion(qid, tuple(answers), answer_type, question_type)
                  for qid, _, answer_type, question_type, answers, _ in VQA_CASES]  # fmt: skip
    return vqa_accuracy({qid: predicted for qid, *_, predicted in VQA_CASES}, references)


def test_evaluate_vqa_writes_the_official_shape_equal_to_vqa_accuracy(
    vqa_files: VqaFiles, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "out" / "metrics.json"
    code = main(_vqa_args(vqa_files, "--questions", str(vqa_files.questions), "--output", str(output)))
    assert code == 0, capsys.readouterr().err
    written = json.loads(output.read_text())
    expected = _expected_accuracy()
    assert written == expected.as_json()  # unrounded: the floats as they were computed
    assert list(written) == ["overall", "perAnswerType", "perQuestionType"]
    # By hand: 100, 100 (normalised), 60 (two of ten annotators after "a" goes), 0, 100 ("two" is "2").
    assert written["overall"] == pytest.approx(72.0, abs=1e-9)
    assert written["perAnswerType"] == pytest.approx({"yes/no": 100.0, "other": 80.0, "number": 50.0}, abs=1e-9)
    assert written["perQuestionType"] == pytest.approx({"is the": 100.0, "what color is the": 100.0,
                                                        "what is the": 60.0, "how many": 50.0}, abs=1e-9)  # fmt: skip


def test_evaluate_vqa_prints_overall_and_each_answer_type(
    vqa_files: VqaFiles, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(_vqa_args(vqa_files)) == 0
    expected = _expected_accuracy()
    assert capsys.readouterr().out.splitlines() == [
        f"overall  {expected.overall:.2f}",
        "yes/no   100.00",
        f"other    {expected.per_answer_type['other']:.2f}",
        f"number   {expected.per_answer_type['number']:.2f}",
    ]


@pytest.mark.parametrize(
    ("spoil", "named"),
    [
        ("results-missing", "results.json: no such file"),
        ("results-not-json", "results.json:1:3: not valid JSON"),
        ("results-unanswered", "results.json: 1 of 5 annotated questions have no answer: 5"),
        ("results-not-text", "results.json: [0]: 'answer' is a number"),
        ("annotations-shape", "annotations.json: expected an official VQA annotation file"),
        ("questions-other-split", "questions.json: questions[5]: question_id 99 has no annotation"),
    ],
)
def test_evaluate_vqa_with_a_bad_file_is_a_user_error_naming_it(
    vqa_files: VqaFiles, spoil: str, named: str, capsys: pytest.CaptureFixture[str]
) -> None:
    results = json.loads(vqa_files.results.read_text())
    if spoil == "results-missing":
        vqa_files.results.unlink()
    elif spoil == "results-not-json":
        vqa_files.results.write_text("[{oops")
    elif spoil == "results-unanswered":
        vqa_files.results.write_text(json.dumps(results[:-1]))
    elif spoil == "results-not-text":
        vqa_files.results.write_text(json.dumps([{"question_id": 1, "answer": 1}, *results[1:]]))
    elif spoil == "annotations-shape":
        vqa_files.annotations.write_text(json.dumps([{"question_id": 1}]))
    else:
        questions = json.loads(vqa_files.questions.read_text())
        questions["questions"].append({"question_id": 99, "image_id": 13, "question": "?"})
        vqa_files.questions.write_text(json.dumps(questions))
    code = main(_vqa_args(vqa_files, "--questions", str(vqa_files.questions)))
    assert_user_error(code, capsys.readouterr().err, named)


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--task", "vqa", "--predictions", "r.json"], "--task vqa needs --annotations FILE"),
        (["--task", "vqa", "--predictions", "r.json", "--annotations", "a.json", "--references", "c.json"],
         "--references is a flag of --task caption, not of --task vqa; --task vqa takes --annotations"),
        (["--task", "vqa", "--predictions", "r.json", "--annotations", "a.json", "--allow-missing"],
         "--allow-missing is a flag of --task caption"),
        (["--predictions", "p.json", "--references", "c.json", "--questions", "q.json"],
         "--questions is a flag of --task vqa, not of --task caption; --task caption (the default) takes --references"),
        (["--predictions", "p.json"], "--task caption needs --references FILE"),
    ],
)  # fmt: skip
def test_evaluate_flags_of_the_other_task_or_a_missing_file_flag_are_user_errors(
    args: list[str], named: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert_user_error(main(["evaluate", *args]), capsys.readouterr().err, named)
