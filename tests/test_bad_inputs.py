"""Bad input a user can give, and non-finite training: each refused in one line that names it (issue 21)."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from captune.cli import main
from captune.config import Config, load_config
from captune.errors import CaptuneError, TrainingDiverged
from captune.model import load_model_dir, save_model_dir, save_tiny_model_dir

recipe = importlib.import_module("captune.train")


def _config(data_dir: Path, output_dir: Path, *overrides: str) -> Config:
    """A fast CPU run on the small synthetic set: 12 steps an epoch (see tests/test_train.py)."""
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
