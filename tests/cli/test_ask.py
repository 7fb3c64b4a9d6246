"""`captune ask`: one image's answers printed, a file of questions answered in bulk (bad rows named by file and line,
streamed, resumable, the official results list), with the run's question template or `--template`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from captune.cli import main
from captune.config import GenerateConfig
from captune.data.images import load_rgb
from captune.generation.core import generate_captions
from captune.model_dir import load_model_dir, save_tiny_model_dir

from ..conftest import write_image
from .conftest import assert_user_error

TEMPLATE = "Question: {} Answer:"
OPTIONS = GenerateConfig(num_beams=1, min_new_tokens=1, max_new_tokens=5)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model_dir(tmp_path_factory.mktemp("run"), ["num_beams=1", "min_new_tokens=1", "max_new_tokens=5",
                                                                f"data.question_template={TEMPLATE}"])  # fmt: skip


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two images, and a questions file of three rows (relative image names) in both formats."""
    folder = tmp_path_factory.mktemp("ask")
    write_image(folder / "red.png", (200, 20, 20), fmt="PNG")
    write_image(folder / "blue.png", (30, 40, 220), fmt="PNG")
    rows = [{"image": "red.png", "question": "what colour is it?", "question_id": 7},
            {"image": "red.png", "question": "is there a circle?", "question_id": 8},
            {"image": "blue.png", "question": "what colour is it?", "question_id": 9}]  # fmt: skip
    (folder / "questions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    lines = ["image,question,question_id"] + [f"{r['image']},{r['question']},{r['question_id']}" for r in rows]
    (folder / "questions.csv").write_text("\n".join(lines) + "\n")
    return folder


def _expected(model_dir: Path, image: Path, questions: list[str], template: str = TEMPLATE) -> list[str]:
    loaded = load_model_dir(model_dir, device="cpu")
    prompts = [template.format(q) for q in questions]
    return [generate_captions(loaded.model, loaded.processor, [load_rgb(image)], OPTIONS, p)[0] for p in prompts]


def _ask(model_dir: Path, *args: str) -> int:
    return main(["ask", *args, "--model-dir", str(model_dir), "--device", "cpu", "--workers", "0"])


def test_ask_prints_the_answer_to_each_question_about_one_image(
    model_dir: Path, folder: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    image = folder / "red.png"
    with caplog.at_level("INFO", logger="captune.generation.choice"):
        assert _ask(model_dir, str(image), "--question", "what colour is it?", "--question", "which shape?") == 0
    assert capsys.readouterr().out.splitlines() == _expected(model_dir, image, ["what colour is it?", "which shape?"])
    assert [r.message for r in caplog.records if r.name == "captune.generation.choice"] == [
        "answering: transformers generate (on cpu, nothing to compile), batch 16 (CPU)"
    ]


def test_ask_takes_another_template(model_dir: Path, folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    image, template = folder / "red.png", "Question: {} Short answer:"
    assert _ask(model_dir, str(image), "--question", "what colour is it?", "--template", template) == 0
    assert capsys.readouterr().out.splitlines() == _expected(model_dir, image, ["what colour is it?"], template)
    code = _ask(model_dir, str(image), "--question", "what?", "--template", "no place")
    assert_user_error(code, capsys.readouterr().err, "data.question_template is 'no place'")


@pytest.mark.parametrize("name", ["questions.jsonl", "questions.csv"])
def test_ask_answers_a_file_of_questions_a_line_each(model_dir: Path, folder: Path, tmp_path: Path, name: str) -> None:
    output = tmp_path / "answers.jsonl"
    assert _ask(model_dir, "--questions", str(folder / name), "--output", str(output)) == 0
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert [set(r) for r in rows] == [{"question_id", "image", "question", "answer"}] * 3
    ids = [7, 8, 9] if name.endswith("jsonl") else ["7", "8", "9"]  # CSV cells are text
    assert [r["question_id"] for r in rows] == ids and [r["image"] for r in rows] == ["red.png", "red.png", "blue.png"]
    red = _expected(model_dir, folder / "red.png", ["what colour is it?", "is there a circle?"])
    assert [r["answer"] for r in rows] == red + _expected(model_dir, folder / "blue.png", ["what colour is it?"])


def test_ask_writes_the_official_results_list_for_a_json_output(model_dir: Path, folder: Path, tmp_path: Path) -> None:
    lines, official = tmp_path / "answers.jsonl", tmp_path / "results.json"
    assert _ask(model_dir, "--questions", str(folder / "questions.jsonl"), "--output", str(lines)) == 0
    assert _ask(model_dir, "--questions", str(folder / "questions.jsonl"), "--output", str(official)) == 0
    expected = [{"question_id": r["question_id"], "answer": r["answer"]} for r in map(json.loads, lines.open())]
    assert json.loads(official.read_text()) == expected
    forced = tmp_path / "results.txt"
    assert _ask(model_dir, "--questions", str(folder / "questions.jsonl"), "--output", str(forced),
                "--format", "official") == 0  # fmt: skip
    assert json.loads(forced.read_text()) == expected


def test_ask_names_each_bad_row_by_file_and_line_and_answers_the_rest(
    model_dir: Path, folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    questions = tmp_path / "questions.jsonl"
    red = str(folder / "red.png")
    questions.write_text("\n".join([
        json.dumps({"image": red, "question": "what colour is it?"}),
        "{not json",
        json.dumps({"image": red}),
        json.dumps({"image": red, "question": "again?", "question_id": 1}),
        json.dumps({"image": str(tmp_path / "missing.png"), "question": "what?"}),
        json.dumps(["a list"]),
    ]) + "\n")  # fmt: skip
    output = tmp_path / "answers.jsonl"
    assert _ask(model_dir, "--questions", str(questions), "--output", str(output)) == 1
    err = capsys.readouterr().err
    assert f"{questions}:2: not JSON" in err and f"{questions}:3: question is missing" in err
    assert f"{questions}:4: question_id 1 is also on line 1" in err and f"{questions}:6: not an object" in err
    assert "missing.png" in err
    assert "answered 1 question(s); 1 failed and 4 row(s) of" in err
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert [r["question_id"] for r in rows] == [1]  # the row's line is its id by default


def test_ask_resume_answers_only_the_questions_not_yet_answered(
    model_dir: Path, folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "answers.jsonl"
    first = {"question_id": 7, "image": "red.png", "question": "what colour is it?", "answer": "done before"}
    output.write_text(json.dumps(first) + '\n{"question_id": 8, "ima')  # killed while writing the second line
    assert _ask(model_dir, "--questions", str(folder / "questions.jsonl"), "--output", str(output), "--resume") == 0
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert [r["question_id"] for r in rows] == [7, 8, 9] and rows[0]["answer"] == "done before"
    assert "--resume: 1 question(s) already in" in capsys.readouterr().err
    output.write_text("a caption line\n")
    code = _ask(model_dir, "--questions", str(folder / "questions.jsonl"), "--output", str(output), "--resume")
    assert_user_error(code, capsys.readouterr().err, f"{output}:1: not a line of `captune ask --format jsonl`")


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--question", "what?"], "give an image and --question TEXT"),
        (["IMAGE"], "give an image and --question TEXT"),
        (["IMAGE", "--question", "what?", "--questions", "Q"], "not both"),
        (["--questions", "nowhere.jsonl"], "nowhere.jsonl: no such file"),
        (["--questions", "QUESTIONS", "--resume"], "--resume needs --output FILE and --format jsonl"),
    ],
)
def test_ask_refuses_what_it_cannot_do_with_a_message(
    model_dir: Path, folder: Path, capsys: pytest.CaptureFixture[str], args: list[str], fragment: str
) -> None:
    named = {"IMAGE": str(folder / "red.png"), "QUESTIONS": str(folder / "questions.jsonl")}
    code = _ask(model_dir, *[named.get(a, a) for a in args])
    assert_user_error(code, capsys.readouterr().err, fragment)


def test_a_csv_file_without_the_question_column_is_refused_at_its_header(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    questions = tmp_path / "q.csv"
    questions.write_text("image,text\nred.png,what?\n")
    code = _ask(model_dir, "--questions", str(questions))
    assert_user_error(code, capsys.readouterr().err, f"{questions}:1: the header lacks question")
