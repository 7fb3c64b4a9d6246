"""`captune caption`, called in-process: output formats, files and folders, bad images, --resume, the generation
flags, which path captioning takes, and the errors a user can fix."""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path

import pytest

from captune.cli import main
from captune.model_dir import save_tiny_model_dir

from ..conftest import write_image, write_truncated_jpeg
from .conftest import assert_user_error


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
    assert_user_error(code, capsys.readouterr().err, str(tmp_path / "no-such-run"))


def test_caption_with_a_folder_as_output_is_a_user_error(
    model_dir: Path, images: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = _caption(model_dir, str(images[1]), "--output", str(tmp_path))
    assert_user_error(code, capsys.readouterr().err, f"--output {tmp_path} is a folder")


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


@pytest.fixture(scope="module")
def vqa_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from captune.data.synthetic import generate_synthetic

    from ..conftest import SMALL_SPEC

    folder = tmp_path_factory.mktemp("vqa")
    generate_synthetic(folder, SMALL_SPEC)
    return folder


def test_eval_task_vqa_answers_the_splits_questions_and_writes_the_official_files(
    model_dir: Path, vqa_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from captune.data.vqa import read_vqa
    from captune.vqa_accuracy import vqa_accuracy

    output = tmp_path / "eval"
    assert main(["eval", "--task", "vqa", "--model-dir", str(model_dir), "--data", "synthetic", "--data-dir",
                 str(vqa_dir), "--output-dir", str(output), "--device", "cpu", "--workers", "0"]) == 0  # fmt: skip
    questions = read_vqa("synthetic", vqa_dir).split("test")
    results = json.loads((output / "results.json").read_text())
    assert [r["question_id"] for r in results] == [q.question_id for q in questions]
    metrics = json.loads((output / "metrics.json").read_text())
    assert set(metrics) == {"overall", "perAnswerType", "perQuestionType"}
    answers = {r["question_id"]: r["answer"] for r in results}
    assert metrics == vqa_accuracy(answers, questions).as_json()
    rows = [json.loads(line) for line in (output / "per_question.jsonl").read_text().splitlines()]
    assert sorted(r["question_id"] for r in rows) == sorted(q.question_id for q in questions)
    out = capsys.readouterr().out
    assert f"overall  {metrics['overall']:.4f}  ({len(questions)} questions)" in out
    assert all(f"{kind:8s} {value:.4f}" in out for kind, value in metrics["perAnswerType"].items())


def test_eval_task_vqa_with_a_caption_data_format_is_a_user_error(
    model_dir: Path, vqa_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["eval", "--task", "vqa", "--model-dir", str(model_dir), "--data", "flickr8k", "--data-dir",
                 str(vqa_dir), "--device", "cpu"])  # fmt: skip
    assert_user_error(code, capsys.readouterr().err, "--data flickr8k: not a VQA data format", "synthetic")
