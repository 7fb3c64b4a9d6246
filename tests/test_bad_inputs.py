"""Bad input a user can give, and non-finite training: each refused in one line that names it (issue 21)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from captune.cli import main
from captune.config import Config
from captune.config_loading import load_config
from captune.errors import CaptuneError, TrainingDiverged
from captune.model_dir import load_model_dir, save_model_dir, save_tiny_model_dir
from captune.training import batches, recipe


def _config(data_dir: Path, output_dir: Path, *overrides: str) -> Config:
    """A fast CPU run on the small synthetic set: 12 steps an epoch (see tests/training/test_recipe.py)."""
    return load_config(None, [
        "data.format=synthetic", f"data.data_dir={data_dir}", f"train.output_dir={output_dir}",
        "train.batch_size=5", "train.grad_accum=2", "train.lr=1e-3", "train.warmup_steps=3",
        "train.validate=false", "model.dtype=fp32", *overrides,
    ])  # fmt: skip


# --- non-finite training (item 4) ------------------------------------------------------------------------------


class _InfGradient(torch.autograd.Function):
    """The identity forward; an infinite gradient backward (the loss stays finite)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad * float("inf")


def _diverging_from(monkeypatch: pytest.MonkeyPatch, micro_batch: int, how: str) -> None:
    """From the `micro_batch`-th forward on, the loss is NaN (`loss`) or its gradient is infinite (`gradient`)."""
    calls = {"n": 0}

    class Diverging(recipe.CaptionLoss):
        def forward(self, **batch: Any) -> torch.Tensor:
            loss = super().forward(**batch)
            calls["n"] += 1
            if calls["n"] < micro_batch:
                return loss
            return loss * float("nan") if how == "loss" else _InfGradient.apply(loss)

    monkeypatch.setattr(recipe, "CaptionLoss", Diverging)


@pytest.mark.parametrize(("how", "clipping"), [("loss", "1.0"), ("gradient", "1.0"), ("gradient", "0")])
def test_training_stops_at_the_first_non_finite_step_and_keeps_the_last_good_checkpoint(
    synthetic_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str, clipping: str
) -> None:
    _diverging_from(monkeypatch, 11, how)  # micro-batches 11-12 are step 6 (grad_accum 2)
    config = _config(synthetic_dir, tmp_path / "run", "train.max_steps=12", "train.save_every=4",
                     f"train.max_grad_norm={clipping}")  # fmt: skip
    with pytest.raises(TrainingDiverged, match=r"step 6\b.*step-000004.*bf16.*train\.lr") as caught:
        recipe.train(config)
    assert "\n" not in str(caught.value)
    checkpoints = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert checkpoints == ["step-000004"]  # step 8 was never saved
    assert not (tmp_path / "run" / "final").exists()
    weights = load_file(str(tmp_path / "run" / "checkpoints" / "step-000004" / "trainable.safetensors"))
    assert all(torch.isfinite(v).all() for v in weights.values())


def test_a_diverged_run_exits_3_with_one_line(
    synthetic_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _diverging_from(monkeypatch, 1, "loss")
    args = ["train", "data.format=synthetic", f"data.data_dir={synthetic_dir}", f"output_dir={tmp_path / 'run'}",
            "max_steps=2", "train.batch_size=5", "validate=false", "model.dtype=fp32"]  # fmt: skip
    assert main(args) == 3
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]  # among progress bars
    assert len(errors) == 1 and errors[0].startswith("error: training stopped") and "at step 1 " in errors[0]


def _nan_weights(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    first = sorted(weights)[0]
    return {**weights, first: torch.full_like(weights[first], float("nan"))}


def test_saving_non_finite_weights_is_refused(tmp_path: Path) -> None:
    from captune.model import apply_lora, build_tiny, trainable_weights

    loaded = build_tiny(0)
    config = load_config(None, [])
    loaded.model = apply_lora(loaded.model, config.lora)
    with pytest.raises(CaptuneError, match=r"non-finite.*lora"):
        save_model_dir(tmp_path / "out", loaded, config, trainable=_nan_weights(trainable_weights(loaded.model)))
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()


def test_loading_a_non_finite_adapter_is_refused(tmp_path: Path) -> None:
    model_dir = save_tiny_model_dir(tmp_path)
    adapter = model_dir / "adapter_model.safetensors"
    save_file(_nan_weights(load_file(str(adapter))), str(adapter))
    with pytest.raises(CaptuneError, match=rf"{adapter}.*non-finite"):
        load_model_dir(model_dir, device="cpu")


# --- one line, not a traceback (item 3) ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tiny run directory (fast greedy generation); tests that damage it copy it first."""
    return save_tiny_model_dir(tmp_path_factory.mktemp("run"), ["num_beams=1", "min_new_tokens=1", "max_new_tokens=3"])


def _copy(model_dir: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(model_dir, tmp_path / "copy"))


def _cut(file: Path) -> None:
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize(
    ("damage", "named"),
    [
        (lambda d: (d / "captune.json").write_text('{"base_model": "base", '), r"captune\.json:1: not valid JSON"),
        (lambda d: (d / "captune.json").write_text("[1, 2]"), r"captune\.json: not a captune\.json"),
        (lambda d: _cut(d / "adapter_model.safetensors"), r"adapter_model\.safetensors cannot be read"),
        (lambda d: (d / "adapter_model.safetensors").unlink(), r"no adapter_model\.safetensors"),
        (lambda d: _cut(d / "base" / "model.safetensors"), r"base.*model\.safetensors"),
        (
            lambda d: (d / "adapter_config.json").write_text(
                (d / "adapter_config.json").read_text().replace('"r": 8', '"r": 4')
            ),
            r"adapter_model\.safetensors does not fit its base model.*rank",
        ),
    ],
    ids=[
        "captune.json not JSON",
        "captune.json not an object",
        "adapter cut short",
        "adapter missing",
        "base cut short",
        "adapter rank differs",
    ],  # fmt: skip
)
def test_a_damaged_model_dir_is_one_line_naming_the_file(
    model_dir: Path, tmp_path: Path, damage: Any, named: str, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = _copy(model_dir, tmp_path)
    damage(broken)
    image = tmp_path / "a.png"
    from .conftest import write_image

    write_image(image, fmt="PNG")
    assert main(["caption", str(image), "--model-dir", str(broken), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert re.search(named, err) and "Traceback" not in err and err.count("\n") == 1, err


def test_caption_with_repetition_penalty_zero_is_refused_before_loading(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["caption", str(tmp_path), "--model-dir", str(model_dir), "--repetition-penalty", "0"]) == 2
    assert "generate.repetition_penalty=0.0 (--repetition-penalty)" in capsys.readouterr().err


def test_a_config_that_is_not_text_names_its_line(tmp_path: Path) -> None:
    path = tmp_path / "photo.jpg"
    path.write_bytes(b"model: tiny\n\xff\xd8\xff\xe0 JFIF")
    with pytest.raises(CaptuneError, match=rf"{path}: not UTF-8 text \(invalid start byte at line 2, column 1\)"):
        load_config(path)


def _unwritable(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every folder refuses new files, as a read-only one does (the tests run as root, who may write anywhere)."""
    import tempfile

    def refused(*args: Any, **kwargs: Any) -> Any:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "TemporaryFile", refused)


def test_unwritable_output_folders_are_refused_before_any_work(
    synthetic_dir: Path, model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    _unwritable(monkeypatch)
    out = tmp_path / "ro"
    commands = {
        "train.output_dir": ["train", f"data_dir={synthetic_dir}", f"output_dir={out}", "max_steps=1"],
        "--output": ["caption", str(tmp_path), "--model-dir", str(model_dir), "--output", str(out / "c.jsonl")],
        "--output ": [
            "data",
            "convert",
            "--format",
            "synthetic",
            "--data-dir",
            str(synthetic_dir),
            "--output",
            str(out / "m.jsonl"),
        ],  # fmt: skip
    }
    for what, argv in commands.items():
        assert main(argv) == 2, what
        err = capsys.readouterr().err
        assert f"error: {what.strip()} {out}: cannot write there (Permission denied)" in err, err


def test_an_output_folder_under_a_file_is_refused(synthetic_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    config = _config(synthetic_dir, tmp_path / "file" / "run", "train.max_steps=1")
    with pytest.raises(CaptuneError, match=r"train\.output_dir .*file/run: cannot write there"):
        recipe.train(config)


def test_a_write_that_fails_mid_run_is_one_line_naming_the_file(
    synthetic_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    tmp = tmp_path / "run" / "checkpoints" / ".tmp-step-000001"

    def read_only(*args: Any, **kwargs: Any) -> Any:
        raise PermissionError(13, "Permission denied", str(tmp))

    monkeypatch.setattr(recipe, "save_checkpoint", read_only)
    argv = ["train", f"data_dir={synthetic_dir}", f"output_dir={tmp_path / 'run'}", "max_steps=1", "validate=false",
            "model.dtype=fp32"]  # fmt: skip
    assert main(argv) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {tmp}: Permission denied; check its folder's permissions and free space, then run again"]


def test_a_damaged_optimizer_state_on_resume_is_named(synthetic_dir: Path, tmp_path: Path) -> None:
    recipe.train(_config(synthetic_dir, tmp_path / "run", "train.max_steps=2", "train.save_every=2"))
    checkpoint = tmp_path / "run" / "checkpoints" / "step-000002"
    _cut(checkpoint / "optimizer.pt")
    config = _config(synthetic_dir, tmp_path / "run", "train.max_steps=4", "train.resume_from=latest")
    with pytest.raises(CaptuneError, match=r"optimizer\.pt cannot be read .*resume from another"):
        recipe.train(config)


@pytest.mark.parametrize("split", [["train"], {"name": "train"}])
def test_a_karpathy_split_that_is_not_a_string_is_a_problem_naming_the_entry(tmp_path: Path, split: object) -> None:
    import json

    from captune.data import read

    from .conftest import write_image

    write_image(tmp_path / "Images" / "a.jpg")
    write_image(tmp_path / "Images" / "b.jpg")
    entries = [{"filename": "a.jpg", "split": split, "sentences": [{"raw": "a cat"}]},
               {"filename": "b.jpg", "split": "train", "sentences": [{"raw": "a dog"}]}]  # fmt: skip
    (tmp_path / "dataset_flickr8k.json").write_text(json.dumps({"images": entries}))
    captions = read("karpathy", tmp_path)
    assert [r.image_id for r in captions.records] == ["b.jpg"]
    assert len(captions.problems) == 1 and "images[0]: split" in captions.problems[0].problem


def test_a_karpathy_file_without_images_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "Images").mkdir()
    (tmp_path / "dataset_flickr8k.json").write_text('{"images": []}')
    assert main(["data", "check", "--format", "karpathy", "--data-dir", str(tmp_path)]) == 2
    assert "dataset_flickr8k.json: the 'images' list is empty" in capsys.readouterr().err


def test_a_config_folder_is_named_as_a_folder(tmp_path: Path) -> None:
    with pytest.raises(CaptuneError, match=rf"--config {tmp_path} is a folder; give a YAML file"):
        load_config(tmp_path)


def test_a_section_that_is_not_a_mapping_says_so(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("train: 5\n")
    with pytest.raises(CaptuneError, match=r"section 'train' is 5; it must hold keys"):
        load_config(path)


# --- smaller ones (item 6) -------------------------------------------------------------------------------------


def test_an_annotation_file_that_is_not_utf8_names_the_line(tmp_path: Path) -> None:
    from captune.data import read

    (tmp_path / "Images").mkdir()
    (tmp_path / "dataset_flickr8k.json").write_bytes(b'{"images":\n  [{"filename": "caf\xe9.jpg"}]}')
    with pytest.raises(CaptuneError, match=r"dataset_flickr8k\.json: not UTF-8 text \(.* at line 2, column 21\)"):
        read("karpathy", tmp_path)


def test_atomically_written_files_get_the_mode_of_their_siblings(tmp_path: Path) -> None:
    import os

    from captune.files import write_atomically

    (tmp_path / "plain.json").write_text("{}")
    write_atomically(tmp_path / "atomic.json", "{}")
    mode = os.stat(tmp_path / "plain.json").st_mode & 0o777
    assert os.stat(tmp_path / "atomic.json").st_mode & 0o777 == mode and mode & 0o044  # group and others read


def test_results_count_the_samples_of_every_segment_after_a_resume(synthetic_dir: Path, tmp_path: Path) -> None:
    import json

    recipe.train(_config(synthetic_dir, tmp_path / "full", "train.max_steps=4"))
    recipe.train(_config(synthetic_dir, tmp_path / "half", "train.max_steps=2", "train.save_every=2"))
    checkpoint = tmp_path / "half" / "checkpoints" / "step-000002"
    recipe.train(_config(synthetic_dir, tmp_path / "half", "train.max_steps=4", f"train.resume_from={checkpoint}"))
    full = json.loads((tmp_path / "full" / "results.json").read_text())
    resumed = json.loads((tmp_path / "half" / "results.json").read_text())
    assert resumed["train_samples"] == full["train_samples"] == 4 * 2 * 5  # steps x grad_accum x captions a batch


def _karpathy_with_problems(root: Path) -> Path:
    """Three test images: a.jpg with one caption unreadable (a problem, the image kept), b.jpg missing, c.jpg whole:
    2 problems, 1 image left out."""
    import json

    from .conftest import write_image

    write_image(root / "Images" / "a.jpg")
    write_image(root / "Images" / "c.jpg", colour=(20, 20, 200))
    entries = [{"filename": name, "split": split, "sentences": sentences} for name, split, sentences in [
        ("a.jpg", "test", [{"raw": "a red square"}, {"raw": ""}]),
        ("b.jpg", "test", [{"raw": "a blue circle"}]),
        ("c.jpg", "test", [{"raw": "a blue square"}]),
        ("t.jpg", "train", [{"raw": "a blue square"}]),
    ]]  # fmt: skip
    write_image(root / "Images" / "t.jpg")
    (root / "dataset_flickr8k.json").write_text(json.dumps({"images": entries}))
    return root


def test_eval_counts_the_images_left_out_apart_from_the_problems(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _karpathy_with_problems(tmp_path / "data")
    argv = ["eval", "--model-dir", str(model_dir), "--data", "karpathy", "--data-dir", str(data), "--output-dir",
            str(tmp_path / "eval"), "--device", "cpu", "--workers", "0"]  # fmt: skip
    assert main(argv) == 0
    assert "warning: 2 problem(s) in the data; 1 image(s) left out" in capsys.readouterr().err


def test_skip_bad_images_counts_the_images_left_out_apart_from_the_problems(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = _karpathy_with_problems(tmp_path / "data")
    config = _config(data, tmp_path / "run", "data.format=karpathy", "data.skip_bad_images=true")
    with caplog.at_level("WARNING"):
        batches.load_training_data(config, main=True)
    assert "skipping 1 unusable image(s) (2 problem(s) in the data)" in caplog.text
