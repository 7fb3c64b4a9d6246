"""The `captune` command, called in-process: caption output formats and failures, evaluate, data check, errors."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from captune import metrics
from captune.cli import main
from captune.config import describe
from captune.metrics import METRIC_NAMES
from captune.model_dir import save_tiny_model_dir

from .conftest import write_image, write_truncated_jpeg


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved run directory as `captune train` writes it: tiny base in base/, default LoRA, fast greedy generation."""
    return save_tiny_model_dir(tmp_path_factory.mktemp("run"), ["num_beams=1", "min_new_tokens=1", "max_new_tokens=5"])


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Three good images, one with a comma in its name, in a folder (sorted as the folder lists them)."""
    folder = tmp_path_factory.mktemp("images")
    names, colours = ["a,red.png", "b.png", "c.png"], [(200, 20, 20), (20, 180, 40), (30, 40, 220)]
    return [write_image(folder / name, colour, fmt="PNG") for name, colour in zip(names, colours, strict=True)]


def _caption(model_dir: Path, *args: str) -> int:
    return main(["caption", *args, "--model-dir", str(model_dir)])


# --- caption ---------------------------------------------------------------------------------------------------


def test_caption_jsonl_prints_one_object_per_image(
    model_dir: Path, images: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    assert _caption(model_dir, str(images[0].parent), "--format", "jsonl") == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [set(row) for row in rows] == [{"image", "caption"}] * 3
    assert [row["image"] for row in rows] == [str(p) for p in images]
    assert all(isinstance(row["caption"], str) and row["caption"] for row in rows)


def test_caption_csv_has_a_header_and_quotes_commas(
    model_dir: Path, images: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    assert _caption(model_dir, *map(str, images), "--format", "csv") == 0
    out = capsys.readouterr().out
    rows = list(csv.reader(io.StringIO(out)))
    assert out.splitlines()[0] == "image,caption"
    assert [row[0] for row in rows[1:]] == [str(p) for p in images]
    assert {len(row) for row in rows} == {2}


def test_caption_text_prints_image_tab_caption_for_several_images(
    model_dir: Path, images: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    assert _caption(model_dir, *map(str, images[1:])) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[0] for line in lines] == [str(p) for p in images[1:]]
    assert all(len(line.split("\t")) == 2 and line.split("\t")[1] for line in lines)


def test_caption_text_prints_only_the_caption_for_one_image_file(
    model_dir: Path, images: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    assert _caption(model_dir, *map(str, images[1:])) == 0
    second = capsys.readouterr().out.splitlines()[0].split("\t")[1]
    assert _caption(model_dir, str(images[1])) == 0
    assert capsys.readouterr().out == f"{second}\n"


def test_caption_text_names_the_image_of_a_folder_even_when_it_is_the_only_one(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image = write_image(tmp_path / "only.png", fmt="PNG")
    assert _caption(model_dir, str(tmp_path)) == 0
    assert capsys.readouterr().out.startswith(f"{image}\t")


def test_caption_generation_options_override_the_saved_ones(
    model_dir: Path, images: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    # The saved config allows 1 to 5 new tokens; each word of the tiny vocabulary is one token.
    assert _caption(model_dir, *map(str, images), "--min-new-tokens", "7", "--max-new-tokens", "7") == 0
    assert [len(line.split("\t")[1].split()) for line in capsys.readouterr().out.splitlines()] == [7, 7, 7]


def test_caption_with_a_static_cache_gives_the_same_captions(
    model_dir: Path, images: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    # captune's own static-cache loop, through the adapter, with a short last batch filled up (3 images, batch 2)
    assert _caption(model_dir, *map(str, images), "--format", "jsonl", "--batch-size", "2") == 0
    plain = capsys.readouterr().out
    assert _caption(model_dir, *map(str, images), "--format", "jsonl", "--batch-size", "2", "--static-cache") == 0
    assert capsys.readouterr().out == plain


def test_caption_output_file_is_written_in_a_new_folder(model_dir: Path, images: list[Path], tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    output = tmp_path / "new" / "captions.jsonl"
    assert _caption(model_dir, str(images[0]), "--format", "jsonl", "--output", str(output)) == 0
    assert capsys.readouterr().out == ""
    assert [json.loads(line)["image"] for line in output.read_text().splitlines()] == [str(images[0])]


@pytest.fixture
def with_bad(images: list[Path], tmp_path: Path) -> tuple[list[Path], Path]:
    return images, write_truncated_jpeg(tmp_path / "broken.jpg")


def test_caption_with_a_bad_image_prints_the_good_ones_and_names_the_bad_one(
    model_dir: Path, with_bad: tuple[list[Path], Path], capsys: pytest.CaptureFixture[str]
) -> None:
    good, bad = with_bad
    code = _caption(model_dir, str(good[0]), str(bad), str(good[1]), "--format", "jsonl")
    out, err = capsys.readouterr()
    assert code == 1
    assert [json.loads(line)["image"] for line in out.splitlines()] == [str(good[0]), str(good[1])]
    assert re.search(rf"^error: {re.escape(str(bad))}: truncated or corrupt", err, re.M)
    assert "captioned 2 image(s); 1 input(s) failed" in err


def test_caption_of_a_name_that_matches_nothing_fails_and_names_it(
    model_dir: Path, images: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    absent = tmp_path / "absent" / "*.jpg"
    assert _caption(model_dir, str(absent), str(images[1])) == 1
    out, err = capsys.readouterr()
    assert out.splitlines()[0].startswith(f"{images[1]}\t")
    assert f"error: {absent}: the pattern matches no file" in err


# --- errors a user can fix: status 2, `error:` on stderr, no traceback -----------------------------------------


def _assert_user_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2
    assert err.startswith("error: "), err
    assert [fragment for fragment in fragments if fragment not in err] == []
    assert "Traceback" not in err


def test_caption_resume_appends_only_the_images_not_yet_captioned(
    model_dir: Path, images: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "captions.jsonl"
    # A first run that was killed after one caption and in the middle of writing the second line.
    output.write_text(json.dumps({"image": str(images[0]), "caption": "done before"}) + '\n{"image": "cut')
    folder = str(images[0].parent)
    assert _caption(model_dir, folder, "--format", "jsonl", "--output", str(output), "--resume", "--workers", "0") == 0
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert [r["image"] for r in rows] == [str(p) for p in images]
    assert rows[0]["caption"] == "done before" and all(r["caption"] for r in rows)
    assert "1 image(s) already in" in capsys.readouterr().err


def test_caption_resume_knows_an_image_under_another_spelling(
    model_dir: Path, images: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    output = tmp_path / "captions.jsonl"
    # The first run was given a relative path; the resumed run an absolute one of the same folder.
    monkeypatch.chdir(images[0].parent.parent)
    relative = Path(images[0].parent.name) / "." / images[0].name
    output.write_text("".join(json.dumps({"image": str(p), "caption": "done"}) + "\n" for p in (relative, images[1])))
    folder = str(images[0].parent)
    assert _caption(model_dir, folder, "--format", "jsonl", "--output", str(output), "--resume", "--workers", "0") == 0
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert [r["image"] for r in rows] == [str(relative), str(images[1]), str(images[2])]
    assert "2 image(s) already in" in capsys.readouterr().err


def test_caption_resume_needs_a_jsonl_output_file(
    model_dir: Path, images: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    assert _caption(model_dir, str(images[0]), "--resume") == 2
    assert "--resume needs --output FILE and --format jsonl" in capsys.readouterr().err


def test_caption_with_negative_workers_is_a_user_error(
    model_dir: Path, images: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    assert _caption(model_dir, str(images[0]), "--workers", "-1") == 2
    assert "--workers -1: give 0" in capsys.readouterr().err


def test_caption_with_a_missing_model_dir_is_a_user_error(
    images: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["caption", str(images[1]), "--model-dir", str(tmp_path / "no-such-run")])
    _assert_user_error(code, capsys.readouterr().err, str(tmp_path / "no-such-run"))


def test_caption_with_a_folder_as_output_is_a_user_error(
    model_dir: Path, images: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = _caption(model_dir, str(images[1]), "--output", str(tmp_path))
    _assert_user_error(code, capsys.readouterr().err, f"--output {tmp_path} is a folder")


def test_data_check_of_an_unknown_format_is_a_user_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["data", "check", "--format", "flickr30k", "--data-dir", str(tmp_path)])
    _assert_user_error(code, capsys.readouterr().err, "unknown data format 'flickr30k'", "synthetic")


def test_train_with_a_bad_override_is_a_user_error(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["train", "train.lrr=1"])
    _assert_user_error(code, capsys.readouterr().err, "unknown config key 'train.lrr'", "train.lr")


def test_train_help_config_prints_every_key(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--help-config"]) == 0
    assert capsys.readouterr().out == describe() + "\n"


# --- data check ------------------------------------------------------------------------------------------------


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


# --- evaluate (METEOR's JVM starts once for the module) --------------------------------------------------------


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
    _assert_user_error(code, capsys.readouterr().err, str(tmp_path / "preds.json"))


def test_train_refuses_bad_images_until_told_to_skip_them(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from .training.test_recipe import _kaggle_with_a_bad_image

    data = _kaggle_with_a_bad_image(tmp_path / "kaggle")
    args = ["train", "data=flickr8k-kaggle", f"data_dir={data}", f"output_dir={tmp_path / 'run'}", "max_steps=1",
            "train.validate=false", "warmup_steps=0"]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "\nerror: " in err and "3.jpg" in err and "--skip-bad-images" in err and "Traceback" not in err
    assert main([*args, "--skip-bad-images"]) == 0
    assert "done: 1 steps" in capsys.readouterr().out


def test_caption_says_which_path_it_takes_and_why(
    model_dir: Path, images: list[Path], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level("INFO", logger="captune.generation.choice"):
        assert _caption(model_dir, *map(str, images), "--format", "jsonl") == 0
    assert [r.message for r in caplog.records if r.name == "captune.generation.choice"] == [
        "captioning: transformers generate (on cpu, nothing to compile), batch 16 (CPU)"
    ]


def test_caption_keeps_a_forced_path_and_batch(
    model_dir: Path, images: list[Path], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level("INFO", logger="captune.generation.choice"):
        assert _caption(model_dir, *map(str, images), "--no-static-cache", "--batch-size", "2") == 0
    assert "captioning: transformers generate (generate.static_cache set), batch 2 (generate.batch_size set)" in [
        r.message for r in caplog.records
    ]
