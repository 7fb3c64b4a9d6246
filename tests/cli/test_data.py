"""`captune data check`, called in-process: the summary printed or written, and an unknown format."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from captune.cli import main

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
