"""`captune data check`, called in-process: the summary printed or written, and an unknown format; VQA datasets
(a VQAv2 folder, a manifest with its own columns and bad rows), the VQA flags with the wrong task, and `data
convert` of a VQA layout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from captune.cli import main

from ..conftest import write_image, write_truncated_jpeg
from ..test_data_vqa import _annotation, _question, _vqav2_split
from .conftest import assert_user_error


def test_data_check_of_an_unknown_format_is_a_user_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["data", "check", "--format", "flickr30k", "--data-dir", str(tmp_path)])
    assert_user_error(code, capsys.readouterr().err, "unknown data format 'flickr30k'", "synthetic")


def test_data_check_writes_the_summary(synthetic_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    output = tmp_path / "summary.json"
    args = ["data", "check", "--format", "synthetic", "--data-dir", str(synthetic_dir), "--output", str(output)]
    assert main([*args, "--workers", "1"]) == 0
    assert json.loads(output.read_text()) == {
        "images": 36,
        "captions": 180,
        "splits": {"train": 24, "val": 6, "test": 6},
        "problems": [],
        "unassigned": 0,
        "notes": [],
    }
    assert capsys.readouterr().out == f"36 usable images, 0 problem(s); summary in {output}\n"


def test_data_check_without_output_prints_the_summary(synthetic_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "check", "--format", "synthetic", "--data-dir", str(synthetic_dir), "--sample", "3"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["images"] == 36
    assert summary["notes"] == ["image check: decoded a random sample of 3 of 36 images (seed 0); the other 33 were "
                                "not checked"]  # fmt: skip


# --- VQA -----------------------------------------------------------------------------------------------------------


def test_data_check_reads_a_vqav2_folder_as_vqa_without_task(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _vqav2_split(tmp_path, "train2014", [_question(1, 10), _question(2, 10, "Is it red?"), _question(3, 11)],
                 [_annotation(1, 10), _annotation(2, 10, ["yes"] * 10), _annotation(3, 11, ["2"] * 3)])  # fmt: skip
    _vqav2_split(tmp_path, "val2014", [_question(7, 20)], [_annotation(7, 20)])
    output = tmp_path / "summary.json"
    assert main(["data", "check", "--format", "vqav2", "--data-dir", str(tmp_path), "--output", str(output)]) == 0
    summary = json.loads(output.read_text())
    assert summary["splits"] == {"train": 3, "val": 1} and summary["images_per_split"] == {"train": 2, "val": 1}
    assert summary["answers_per_question"] == {"3": 1, "10": 3} and summary["answer_types"] == {"number": 4}
    assert summary["problems"] == []
    assert capsys.readouterr().out == f"4 usable questions on 3 images, 0 problem(s); summary in {output}\n"


def test_data_check_of_a_vqa_manifest_names_its_columns_and_bad_rows(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in ("a.jpg", "b.jpg"):
        write_image(tmp_path / "images" / name)
    write_truncated_jpeg(tmp_path / "images" / "broken.jpg")
    rows = ["file,text,said,part", "images/a.jpg,What is it?,cup;mug,train", "images/a.jpg,,cup,train",
            "images/b.jpg,How many?,2;2;two,val", "images/gone.jpg,Where?,left,train",
            "images/broken.jpg,Which?,this,train", "images/broken.jpg,Why?,that,train"]  # fmt: skip
    (tmp_path / "qa.csv").write_text("\n".join(rows) + "\n")
    args = ["data", "check", "--task", "vqa", "--format", "manifest", "--data-dir", str(tmp_path / "qa.csv"),
            "--image-column", "file", "--split-column", "part", "--question-column", "text", "--answers-column",
            "said", "--answer-separator", ";", "--workers", "1"]  # fmt: skip
    assert main(args) == 1  # problems found
    summary = json.loads(capsys.readouterr().out)
    assert (summary["questions"], summary["images"], summary["answers"]) == (2, 2, 5)
    assert summary["splits"] == {"train": 1, "val": 1} and summary["answers_per_question"] == {"2": 1, "3": 1}
    manifest = tmp_path / "qa.csv"
    problems = [problem["problem"] for problem in summary["problems"]]
    assert [problem.split(": ")[0] for problem in problems[:2]] == [f"{manifest}:3", f"{manifest}:5"]
    assert "no question in 'text'" in problems[0] and "image file missing" in problems[1]
    assert len(problems) == 3 and "(2 question(s) of this image not used)" in problems[2]


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--format", "manifest", "--question-column", "text"], "--question-column is a flag of VQA datasets; add "
         "--task vqa"),
        (["--format", "vqav2", "--task", "caption"], "--format vqav2 is a VQA layout; check it with --task vqa"),
        (["--format", "flickr8k", "--task", "vqa"], "unknown VQA data format 'flickr8k'; choose one of: vqav2"),
    ],
)  # fmt: skip
def test_data_check_vqa_flags_with_the_wrong_task_or_format_are_user_errors(
    tmp_path: Path, args: list[str], named: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert_user_error(main(["data", "check", "--data-dir", str(tmp_path), *args]), capsys.readouterr().err, named)


def test_data_convert_of_a_vqa_layout_is_a_user_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["data", "convert", "--format", "aokvqa", "--data-dir", str(tmp_path), "--output",
                 str(tmp_path / "m.jsonl")])  # fmt: skip
    assert_user_error(code, capsys.readouterr().err, "--format aokvqa is a VQA layout; data convert writes caption "
                      "manifests only")  # fmt: skip
    assert not (tmp_path / "m.jsonl").exists()
