"""The cached image side: when it applies and why, the feature pass and its workers, and the features kept in
`train.feature_cache_dir` between runs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from captune.config import LoraConfig
from captune.config_loading import load_config
from captune.data import read
from captune.data.synthetic import generate_synthetic
from captune.errors import CaptuneError
from captune.model import LoadedModel, apply_lora, blip_of
from captune.training import features, recipe
from captune.training.features import image_features, use_feature_cache
from captune.training.loss import upstream_of_language_model_trains

from ..conftest import SMALL_SPEC, write_image
from .test_recipe import _adapter, _config


def test_features_are_cached_only_when_nothing_upstream_trains(tiny: LoadedModel) -> None:
    config = load_config(None, [])
    assert upstream_of_language_model_trains(apply_lora(tiny.model, config.lora)) == []
    assert use_feature_cache(config, tiny.model)
    assert not use_feature_cache(load_config(None, ["cache_image_features=off"]), tiny.model)


def test_the_run_log_says_which_path_and_why(tiny: LoadedModel, caplog: pytest.LogCaptureFixture) -> None:
    config = load_config(None, ["qformer_target_modules=query,value", "train.mode=lora-lm+qformer"])
    model = apply_lora(tiny.model, config.lora)
    with caplog.at_level("INFO", logger="captune.training.features"):
        assert not use_feature_cache(config, model)
    assert "training path: full (image features recomputed every step): parameters outside the language model" in (
        caplog.text
    )


@pytest.mark.parametrize(
    ("key", "targets", "part"),
    [("qformer_target_modules", ["query", "value"], ".qformer."), ("vit_target_modules", ["qkv"], ".vision_model.")],
    ids=["qformer", "vit"],
)
def test_cache_on_with_lora_on_the_image_side_is_an_error(
    tiny: LoadedModel, key: str, targets: list[str], part: str
) -> None:
    # LoRA on that part alone (the language model's too): its trainable weights are all that rules the cache out.
    model = apply_lora(tiny.model, LoraConfig(**{key: targets}))
    upstream = upstream_of_language_model_trains(model)
    assert upstream and all(part in name for name in upstream)
    assert not use_feature_cache(load_config(None, []), model)  # auto: the full path
    with pytest.raises(CaptuneError, match=r"cache_image_features=on, but parameters outside the language model "
                                           rf"train \(base_model\.model{re.escape(part)}"):  # fmt: skip
        use_feature_cache(load_config(None, ["cache_image_features=on"]), model)


def test_rebatched_gives_a_tensors_rows_in_order_in_batches_of_one_size() -> None:
    from captune.data.images import rebatched

    chunks = [torch.arange(0, 3), torch.arange(3, 5), torch.arange(5, 11), torch.arange(11, 12)]
    batches = list(rebatched(iter(chunks), 4, torch.cat))
    assert [b.tolist() for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    assert [b.tolist() for b in rebatched(iter([torch.arange(5)]), 2, torch.cat)] == [[0, 1], [2, 3], [4]]


def test_the_feature_pass_workers_make_shares_and_the_model_gets_whole_batches(
    lora: LoadedModel, synthetic_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With workers, each makes a share of a batch (the first batch is ready sooner); the model still sees batches of
    batch_size images in order, so the features are those of the pass without workers."""
    records = read("synthetic", synthetic_dir).split("train")[:7]
    paths = [r.image_path for r in records]
    cpu = torch.device("cpu")
    serial = image_features(lora.model, lora.processor, paths, batch_size=3, num_workers=0, device=cpu, keep_on=cpu,
                            progress=False)  # fmt: skip
    shares: list[int] = []
    seen: list[int] = []
    real_loader = features.DataLoader
    monkeypatch.setattr(features, "DataLoader", lambda *a, **k: shares.append(k["batch_size"]) or real_loader(*a, **k))
    blip = blip_of(lora.model)
    real = blip.get_image_features
    monkeypatch.setattr(blip, "get_image_features", lambda **k: seen.append(len(k["pixel_values"])) or real(**k))
    workers = image_features(lora.model, lora.processor, paths, batch_size=3, num_workers=2, device=cpu, keep_on=cpu,
                             progress=False)  # fmt: skip
    assert shares == [2] and seen == [3, 3, 1]
    torch.testing.assert_close(workers, serial, rtol=0, atol=0)


def test_the_feature_pass_uses_the_cores_unless_told(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(features.os, "cpu_count", lambda: 16)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert features.feature_workers(load_config(None, ["data.num_workers=4"])) == 16
    assert features.feature_workers(load_config(None, [])) == 0  # num_workers 0: decode in the training process
    assert features.feature_workers(load_config(None, ["data.num_workers=4", "data.feature_workers=2"])) == 2
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # 4 processes on this machine share its cores
    assert features.feature_workers(load_config(None, ["data.num_workers=2"])) == 4
    with pytest.raises(CaptuneError, match="data.feature_workers must be >= 0"):
        load_config(None, ["data.feature_workers=-1"])


def test_feature_cache_dir_keeps_features_between_runs_and_notices_a_changed_image(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="captune")
    generate_synthetic(tmp_path / "data", SMALL_SPEC)  # its own copy: an image is rewritten below
    cache = tmp_path / "features"

    def run(name: str) -> dict[str, torch.Tensor]:
        caplog.clear()
        overrides = ["train.max_steps=3", f"train.feature_cache_dir={cache}", "lora.modules_to_save="]
        recipe.train(_config(tmp_path / "data", tmp_path / name, *overrides))
        return _adapter(tmp_path / name / "final")

    first = run("first")
    assert "kept in" in caplog.text and len(list(cache.glob("*.pt"))) == 1
    second = run("second")
    assert "image features read from" in caplog.text and "kept in" not in caplog.text
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    image = sorted((tmp_path / "data").rglob("train-*.png"))[0]
    write_image(image, colour=(1, 2, 3), fmt="PNG")
    run("changed")
    assert "kept in" in caplog.text and len(list(cache.glob("*.pt"))) == 2  # computed again, a file of its own
    for damaged in cache.glob("*.pt"):
        damaged.write_bytes(b"not a tensor file")
    run("damaged")  # a damaged file costs a feature pass, not the run
    assert "cannot be read" in caplog.text and "kept in" in caplog.text
