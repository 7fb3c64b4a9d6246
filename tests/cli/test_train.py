"""`captune train`, called in-process: a bad override, --help-config, bad images until --skip-bad-images."""

from __future__ import annotations

from pathlib import Path

import pytest

from captune.cli import main
from captune.config import describe

from .conftest import assert_user_error


def test_train_with_a_bad_override_is_a_user_error(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["train", "train.lrr=1"])
    assert_user_error(code, capsys.readouterr().err, "unknown config key 'train.lrr'", "train.lr")


def test_train_help_config_prints_every_key(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--help-config"]) == 0
    assert capsys.readouterr().out == describe() + "\n"


def test_train_refuses_bad_images_until_told_to_skip_them(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from ..training.test_recipe import _kaggle_with_a_bad_image

    data = _kaggle_with_a_bad_image(tmp_path / "kaggle")
    args = ["train", "data=flickr8k-kaggle", f"data_dir={data}", f"output_dir={tmp_path / 'run'}", "max_steps=1",
            "train.validate=false", "warmup_steps=0"]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "\nerror: " in err and "3.jpg" in err and "--skip-bad-images" in err and "Traceback" not in err
    assert main([*args, "--skip-bad-images"]) == 0
    assert "done: 1 steps" in capsys.readouterr().out
