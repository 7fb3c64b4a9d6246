"""Checkpoints: what one holds, a resume that gives the uninterrupted run bit for bit, a kill while saving, and the
settings a resume must keep."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from accelerate.utils import DistributedType

from captune.config import LoraConfig
from captune.errors import CaptuneError
from captune.model import LoadedModel, apply_lora
from captune.training import checkpoint, recipe

from .test_recipe import _adapter, _config


def test_resume_mid_epoch_gives_the_same_adapter_bit_for_bit(synthetic_dir: Path, tmp_path: Path) -> None:
    # 20 steps cross the epoch end at step 12; LoRA dropout makes the RNG state matter.
    full = _config(synthetic_dir, tmp_path / "full", "train.max_steps=20", "train.save_every=7", "lora.dropout=0.1",
                   "train.keep_checkpoints=10")  # fmt: skip
    recipe.train(full)
    saved = sorted(p.name for p in (tmp_path / "full" / "checkpoints").iterdir())
    assert saved == ["step-000007", "step-000012", "step-000014", "step-000020"]  # every 7 steps and at epoch end
    checkpoint = tmp_path / "full" / "checkpoints" / "step-000007"
    resumed = _config(synthetic_dir, tmp_path / "resumed", "train.max_steps=20", "train.save_every=7",
                      "lora.dropout=0.1", f"train.resume_from={checkpoint}")  # fmt: skip
    state = recipe.train(resumed)
    assert state.global_step == 20
    expected, actual = _adapter(tmp_path / "full" / "final"), _adapter(tmp_path / "resumed" / "final")
    assert expected.keys() == actual.keys() and len(expected) > 0
    for name in expected:
        assert torch.equal(expected[name], actual[name]), name
    # ...and training moved the weights at all (LoRA B starts at zero).
    assert any(v.abs().sum() > 0 for k, v in actual.items() if "lora_B" in k)


def test_each_epoch_has_its_own_order_also_after_a_resume(
    synthetic_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # accelerate's loader sets its sampler's epoch to its own pass count at every pass; the loop must set that count,
    # or every epoch (and every resume) replays epoch 0's order.
    seen: list[tuple[int, list[int]]] = []
    for sampler in (recipe.EpochShuffle, recipe.LengthGroupedShuffle):
        real = sampler.__iter__

        def recording(self: recipe.EpochShuffle, real: Any = real) -> Iterator[int]:
            order = list(real(self))
            seen.append((self.epoch, order))
            return iter(order)

        monkeypatch.setattr(sampler, "__iter__", recording)
    recipe.train(
        _config(
            synthetic_dir, tmp_path / "full", "train.max_steps=36", "train.save_every=20", "train.keep_checkpoints=10"
        )
    )
    assert [epoch for epoch, _ in seen] == [0, 1, 2]  # 12 steps an epoch
    orders = [order for _, order in seen]
    assert orders[0] != orders[1] != orders[2] and sorted(orders[0]) == sorted(orders[1])
    seen.clear()
    checkpoint = tmp_path / "full" / "checkpoints" / "step-000020"  # 8 steps into epoch 1
    recipe.train(_config(synthetic_dir, tmp_path / "resumed", "train.max_steps=36", f"train.resume_from={checkpoint}"))
    assert [epoch for epoch, _ in seen] == [1, 2] and [order for _, order in seen] == orders[1:]


def test_checkpoint_holds_everything_needed_to_resume(synthetic_dir: Path, tmp_path: Path) -> None:
    recipe.train(_config(synthetic_dir, tmp_path / "run", "train.max_steps=4", "train.save_every=2"))
    names = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert names == ["step-000002", "step-000004"]  # no temporary directories left behind
    files = {p.name for p in (tmp_path / "run" / "checkpoints" / "step-000004").iterdir()}
    expected = {"adapter_model.safetensors", "adapter_config.json", "captune.json", "config.yaml", "optimizer.pt",
                "trainable.safetensors", "trainer_state.json", "rng-0.pt", "processor_config.json", "base"}  # fmt: skip
    assert expected <= files
    assert (tmp_path / "run" / "config.yaml").read_text().startswith("# captune train --config")
    assert any((tmp_path / "run").rglob("events.out.tfevents.*"))


def test_a_kill_while_saving_leaves_the_previous_checkpoint_whole(
    synthetic_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = _config(synthetic_dir, tmp_path / "run", "train.max_steps=4", "train.save_every=2")
    real_save = checkpoint.save_model_dir
    calls = {"n": 0}

    def dies_on_second_checkpoint(path: Path, *args: object, **kwargs: object) -> None:
        calls["n"] += 1
        real_save(path, *args, **kwargs)  # type: ignore[arg-type]
        if calls["n"] == 2:
            raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(checkpoint, "save_model_dir", dies_on_second_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        recipe.train(config)
    folder = tmp_path / "run" / "checkpoints"
    assert (folder / "step-000002" / "trainer_state.json").is_file()
    assert not (folder / "step-000004").exists()
    monkeypatch.setattr(checkpoint, "save_model_dir", real_save)
    # The half-written directory is ignored and replaced; the run continues from the last whole checkpoint.
    state = recipe.train(_config(synthetic_dir, tmp_path / "run", "train.max_steps=4", "train.save_every=2",
                                 "train.resume_from=latest"))  # fmt: skip
    assert state.global_step == 4
    assert not any(p.name.startswith(".tmp") for p in folder.iterdir())


@pytest.mark.parametrize("change", ["train.batch_size=2", "train.pack_captions=false"])
def test_resume_refuses_a_different_batching(synthetic_dir: Path, tmp_path: Path, change: str) -> None:
    recipe.train(_config(synthetic_dir, tmp_path / "run", "train.max_steps=2", "train.save_every=2"))
    checkpoint = tmp_path / "run" / "checkpoints" / "step-000002"
    config = _config(synthetic_dir, tmp_path / "run2", "train.max_steps=4", change, f"train.resume_from={checkpoint}")
    with pytest.raises(CaptuneError, match=change.split("=")[0]):
        recipe.train(config)


def test_the_fsdp_gathering_of_trainable_weights_gives_what_the_plain_path_gives(tiny: LoadedModel) -> None:
    # FSDP needs GPUs; torch's state-dict API that gathers its shards also runs on a plain model, so the FSDP branch
    # (its key filter: no frozen weight, not even OPT's tied lm_head) is checked here against the plain one.
    model = apply_lora(tiny.model, LoraConfig(modules_to_save=["language_projection"]))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_()

    def run(kind: DistributedType) -> Any:
        accelerator = SimpleNamespace(distributed_type=kind, unwrap_model=lambda m: m)
        return SimpleNamespace(accelerator=accelerator, loaded=SimpleNamespace(model=model))

    plain = checkpoint._trainable_weights(run(DistributedType.NO))
    gathered = checkpoint._trainable_weights(run(DistributedType.FSDP))
    assert plain.keys() == gathered.keys() and any("modules_to_save" in k for k in plain)
    assert all(torch.equal(plain[k], gathered[k]) for k in plain)
