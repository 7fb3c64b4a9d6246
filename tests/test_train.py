"""The training recipe: labels, checkpoints, resume, bad data, validation."""

from __future__ import annotations

import importlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from accelerate.utils import DistributedType
from safetensors.torch import load_file

from captune.config import Config, LoraConfig, load_config
from captune.data.synthetic import generate_synthetic
from captune.errors import CaptuneError
from captune.model import (
    QFORMER_TRAINED,
    TRAINED_FILE,
    LoadedModel,
    apply_lora,
    build_tiny,
    load_base,
    load_model_dir,
    load_saved_weights,
    save_model_dir,
)
from captune.train import IGNORE, CaptionCollator, CaptionPairs, EpochShuffle

from .conftest import SMALL_SPEC, write_image, write_truncated_jpeg

# `captune.train` the attribute is the public function; the module is reached through the import system.
recipe = importlib.import_module("captune.train")


def _config(data_dir: Path, output_dir: Path, *overrides: str) -> Config:
    """A fast CPU run on the small synthetic set: 24 images, 120 caption pairs, batch 5 (packed: one image of 5
    captions), grad_accum 2 -> 12 steps an epoch."""
    return load_config(
        None,
        [
            "data.format=synthetic",
            f"data.data_dir={data_dir}",
            f"train.output_dir={output_dir}",
            "train.batch_size=5",
            "train.grad_accum=2",
            "train.lr=1e-3",
            "train.warmup_steps=3",
            "train.validate=false",
            "lora.modules_to_save=language_projection",
            "model.dtype=fp32",
            *overrides,
        ],
    )


def _batch(tiny: LoadedModel, synthetic_dir: Path, prompt: str = "") -> tuple[dict[str, torch.Tensor], list[str]]:
    from captune.data import read

    records = read("synthetic", synthetic_dir).split("train")[:3]
    pairs = CaptionPairs(records, tiny.processor)
    items = [pairs[0], pairs[6], pairs[12]]
    return CaptionCollator.for_model(tiny.model, tiny.processor, prompt)(items), [i["caption"] for i in items]


def test_labels_mask_image_tokens_bos_and_padding_and_keep_eos(tiny: LoadedModel, synthetic_dir: Path) -> None:
    batch, captions = _batch(tiny, synthetic_dir)
    tokenizer = tiny.processor.tokenizer
    n = tiny.processor.num_query_tokens
    image_id = tiny.model.config.image_token_index
    assert batch["input_ids"].shape == batch["labels"].shape
    for row, caption in enumerate(captions):
        ids, labels = batch["input_ids"][row], batch["labels"][row]
        caption_ids = tokenizer(caption, add_special_tokens=False).input_ids
        length = n + 1 + len(caption_ids) + 1  # image tokens, BOS, caption, EOS
        assert (ids[:n] == image_id).all() and (ids == image_id).sum() == n
        assert ids[n] == tokenizer.bos_token_id
        assert (labels[: n + 1] == IGNORE).all()
        assert labels[n + 1 : length].tolist() == caption_ids + [tokenizer.eos_token_id]
        assert (labels[length:] == IGNORE).all() and (ids[length:] == tokenizer.pad_token_id).all()
        assert batch["attention_mask"][row].sum() == length


def test_prompt_tokens_are_masked(tiny: LoadedModel, synthetic_dir: Path) -> None:
    batch, captions = _batch(tiny, synthetic_dir, prompt="a picture of")
    n = tiny.processor.num_query_tokens
    prompt_len = len(tiny.processor.tokenizer("a picture of").input_ids)  # BOS + 3 words
    assert prompt_len == 4
    labels = batch["labels"][0]
    assert (labels[: n + prompt_len] == IGNORE).all()
    assert labels[n + prompt_len] != IGNORE


def test_collator_rejects_a_caption_holding_the_image_token(tiny: LoadedModel, synthetic_dir: Path) -> None:
    collate = CaptionCollator.for_model(tiny.model, tiny.processor)
    item = {"pixel_values": torch.zeros(3, 32, 32), "caption": "a red <image> circle"}
    with pytest.raises(CaptuneError, match=r"caption 'a red <image> circle' holds the image token '<image>'"):
        collate([item])
    with pytest.raises(CaptuneError, match=r"prompt 'a <image>' holds the image token"):
        CaptionCollator.for_model(tiny.model, tiny.processor, prompt="a <image>")([{**item, "caption": "a red circle"}])


def test_long_captions_are_cut_but_keep_eos(tiny: LoadedModel) -> None:
    collate = CaptionCollator.for_model(tiny.model, tiny.processor, max_caption_tokens=5)
    batch = collate([{"pixel_values": torch.zeros(3, 32, 32), "caption": "a red circle " * 10}])
    labels = batch["labels"][0]
    assert (labels != IGNORE).sum() == 6
    assert labels[-1] == tiny.processor.tokenizer.eos_token_id


def test_epoch_order_depends_only_on_seed_and_epoch() -> None:
    sampler = EpochShuffle(50, seed=3)
    first = list(sampler)
    torch.manual_seed(123)  # the global RNG must not matter
    assert list(sampler) == first
    sampler.set_epoch(1)
    assert list(sampler) != first and sorted(sampler) == list(range(50))


def _adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "adapter_model.safetensors"))


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
    real_save = recipe.save_model_dir
    calls = {"n": 0}

    def dies_on_second_checkpoint(path: Path, *args: object, **kwargs: object) -> None:
        calls["n"] += 1
        real_save(path, *args, **kwargs)  # type: ignore[arg-type]
        if calls["n"] == 2:
            raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(recipe, "save_model_dir", dies_on_second_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        recipe.train(config)
    folder = tmp_path / "run" / "checkpoints"
    assert (folder / "step-000002" / "trainer_state.json").is_file()
    assert not (folder / "step-000004").exists()
    monkeypatch.setattr(recipe, "save_model_dir", real_save)
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


def _kaggle_with_a_bad_image(root: Path) -> Path:
    lines = ["image,caption"]
    for i in range(8):
        write_image(root / "Images" / f"{i}.jpg", colour=(30 * i, 100, 100))
        lines += [f"{i}.jpg,a red circle on the left", f'{i}.jpg,"a circle, red, on the left"']
    write_truncated_jpeg(root / "Images" / "3.jpg")
    (root / "captions.txt").write_text("\n".join(lines) + "\n")
    return root


def test_training_refuses_to_start_on_bad_images(tmp_path: Path) -> None:
    data = _kaggle_with_a_bad_image(tmp_path / "kaggle")
    config = _config(data, tmp_path / "run", "data.format=flickr8k-kaggle", "train.max_steps=1")
    with pytest.raises(CaptuneError, match=r"3\.jpg.*\n.*--skip-bad-images"):
        recipe.train(config)
    assert not (tmp_path / "run" / "final").exists()


def test_skip_bad_images_trains_on_the_rest_and_says_how_many(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    data = _kaggle_with_a_bad_image(tmp_path / "kaggle")
    config = _config(data, tmp_path / "run", "data.format=flickr8k-kaggle", "train.max_steps=1",
                     "data.skip_bad_images=true")  # fmt: skip
    with caplog.at_level("WARNING"):
        recipe.train(config)
    assert "skipping 1 unusable image(s)" in caplog.text and "3.jpg" in caplog.text
    assert (tmp_path / "run" / "final" / "adapter_model.safetensors").is_file()


def test_validation_scores_each_epoch_and_keeps_best(synthetic_dir: Path, tmp_path: Path) -> None:
    config = _config(synthetic_dir, tmp_path / "run", "train.epochs=1", "train.validate=true",
                     "generate.num_beams=1", "generate.min_new_tokens=1", "generate.max_new_tokens=6")  # fmt: skip
    state = recipe.train(config)
    assert state.global_step == 12 and len(state.history) == 1
    metrics = state.history[0]["metrics"]
    assert set(metrics) == {"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr"}
    assert state.best_cider == pytest.approx(metrics["CIDEr"])
    best = tmp_path / "run" / "best"
    assert json.loads((best / "metrics.json").read_text()) == metrics
    card = (best / "README.md").read_text()  # the model card carries every metric of the best step, METEOR too
    assert f"{metrics['METEOR']:.4f}" in card and f"{metrics['CIDEr']:.4f}" in card
    val = json.loads((tmp_path / "run" / "val" / "step-000012.json").read_text())
    assert len(val["predictions"]) == 6  # every val image exactly once
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["best_cider"] == pytest.approx(metrics["CIDEr"])


def test_saved_model_directory_stands_alone(synthetic_dir: Path, tmp_path: Path) -> None:
    from captune.model import load_model_dir

    recipe.train(_config(synthetic_dir, tmp_path / "run", "train.max_steps=2"))
    moved = tmp_path / "elsewhere" / "model"
    shutil.copytree(tmp_path / "run" / "final", moved)
    shutil.rmtree(tmp_path / "run")
    loaded = load_model_dir(moved)
    assert "language_projection" in json.loads((moved / "adapter_config.json").read_text())["modules_to_save"]
    assert loaded.processor.num_query_tokens == 8


def test_gradient_checkpointing_trains_the_same_steps(synthetic_dir: Path, tmp_path: Path) -> None:
    """The same 2 steps with and without recomputed activations end in the same adapter (dropout masks replay)."""
    plain = _config(synthetic_dir, tmp_path / "plain", "train.max_steps=2")
    checkpointed = _config(synthetic_dir, tmp_path / "ckpt", "train.max_steps=2",
                           "train.gradient_checkpointing=true")  # fmt: skip
    recipe.train(plain)
    recipe.train(checkpointed)
    a = load_file(str(tmp_path / "plain" / "final" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "ckpt" / "final" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)


def test_qformer_mode_trains_the_qformer_in_full_and_resumes_exactly(
    synthetic_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The LAVIS caption fine-tune: Q-Former, query tokens and projection train in full; LM and ViT stay as they were.
    caplog.set_level("INFO", logger="captune")
    overrides = ("train.mode=qformer", "lora.modules_to_save=", "train.max_steps=6", "train.save_every=3")
    recipe.train(_config(synthetic_dir, tmp_path / "run", *overrides))
    assert "training path: full" in caplog.text and "parameters outside the language model train" in caplog.text
    final = tmp_path / "run" / "final"
    assert (final / TRAINED_FILE).is_file() and not (final / "adapter_model.safetensors").exists()
    trained = load_file(str(final / TRAINED_FILE))
    assert {"query_tokens", "language_projection.weight"} <= trained.keys()
    assert all(name.startswith(QFORMER_TRAINED) for name in trained)
    base = dict(load_base(str(tmp_path / "run" / "base-model")).model.named_parameters())  # the run's random base
    assert not torch.equal(trained["query_tokens"], base["query_tokens"])
    assert any(not torch.equal(v, base[k]) for k, v in trained.items() if k.startswith("qformer."))
    loaded = load_model_dir(final, torch.float32, device="cpu")
    for name, param in loaded.model.named_parameters():  # the trained weights in place, the rest the base's
        torch.testing.assert_close(param, trained.get(name, base[name]), rtol=0, atol=0, msg=name)
    resumed = _config(synthetic_dir, tmp_path / "resumed", *overrides,
                      f"train.resume_from={tmp_path / 'run' / 'checkpoints' / 'step-000003'}")  # fmt: skip
    recipe.train(resumed)
    again = load_file(str(tmp_path / "resumed" / "final" / TRAINED_FILE))
    assert again.keys() == trained.keys() and all(torch.equal(again[k], trained[k]) for k in trained)


def test_qformer_targets_without_the_mode_that_uses_them_is_an_error() -> None:
    with pytest.raises(CaptuneError, match=r"train.mode is lora-lm .* set train.mode=lora-lm\+qformer"):
        load_config(None, ["lora.qformer_target_modules=query"])
    assert load_config(None, ["train.mode=lora-lm+qformer"]).lora.qformer_target_modules == ["query", "value"]


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

    plain = recipe._trainable_weights(run(DistributedType.NO))
    gathered = recipe._trainable_weights(run(DistributedType.FSDP))
    assert plain.keys() == gathered.keys() and any("modules_to_save" in k for k in plain)
    assert all(torch.equal(plain[k], gathered[k]) for k in plain)


def test_validation_under_fsdp_is_refused_with_what_to_do(
    synthetic_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # FSDP needs GPUs; accelerate's answer is what the recipe reads, so it is stood in for here.
    monkeypatch.setattr(recipe.Accelerator, "distributed_type", property(lambda self: DistributedType.FSDP))
    config = _config(synthetic_dir, tmp_path / "run", "train.validate=true")
    with pytest.raises(CaptuneError, match=r"train.validate=true under FSDP.*train.validate=false.*captune eval"):
        recipe.train(config)


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


def test_greedy_validation_picks_best_and_best_is_scored_with_the_generate_settings(
    synthetic_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The first validation is made the best, so the end has to put best/'s weights back into the model.
    ciders = iter([1.0, 0.5])
    monkeypatch.setattr(recipe, "_broadcast_float", lambda accelerator, value: next(ciders))
    loads: list[Path] = []  # the tiny model may caption alike with either weights: see that they are swapped
    real_load = recipe.load_saved_weights
    monkeypatch.setattr(recipe, "load_saved_weights", lambda model, path: (loads.append(path), real_load(model, path)))
    config = _config(synthetic_dir, tmp_path / "run", "train.epochs=2", "train.validate=true", "train.val_num_beams=1",
                     "generate.num_beams=3", "generate.min_new_tokens=1", "generate.max_new_tokens=6")  # fmt: skip
    state = recipe.train(config)
    assert len(state.history) == 2 and state.best_step == 12 and state.global_step == 24
    assert loads == [tmp_path / "run" / "best"]
    best = tmp_path / "run" / "best"
    final = json.loads((tmp_path / "run" / "val" / "best-final.json").read_text())
    assert final["step"] == state.best_step and final["generate"]["num_beams"] == 3
    assert json.loads((best / "metrics.json").read_text()) == final["metrics"]
    # The numbers are best/'s own with beam 3: caption the val images again from the saved directory.
    loaded = load_model_dir(best, torch.float32, device="cpu")
    records = recipe.datasets.read("synthetic", synthetic_dir).split("val")
    again = recipe.predict_records(loaded.model, loaded.processor, records, config.generate)
    assert again == final["predictions"]
    greedy = json.loads((tmp_path / "run" / "val" / f"step-{state.best_step:06d}.json").read_text())["predictions"]
    assert greedy.keys() == again.keys()


def test_saved_weights_go_back_into_a_model_of_the_same_kind(tmp_path: Path) -> None:
    for overrides in ([], ["train.mode=qformer"]):
        config = load_config(None, overrides)
        saved, other = (recipe.apply_train_mode(build_tiny(seed).model, config) for seed in (0, 1))
        weights = {n: p for n, p in saved.named_parameters() if p.requires_grad}
        with torch.no_grad():
            for param in weights.values():
                param.normal_()
        folder = tmp_path / config.train.mode
        save_model_dir(folder, LoadedModel(saved, build_tiny(0).processor, "tiny"), config)
        load_saved_weights(other, folder)
        mine = dict(other.named_parameters())
        assert weights and all(torch.equal(mine[n], p) for n, p in weights.items()), config.train.mode


def test_the_training_log_counts_cuda_allocations_on_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    assert recipe.allocator_counters() == {} or torch.cuda.is_available()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "memory_stats", lambda: {"num_device_alloc": 12, "num_alloc_retries": 0})
    assert recipe.allocator_counters() == {"cuda_mallocs": 12, "cuda_alloc_retries": 0}


def test_the_feature_pass_uses_the_cores_unless_told(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(recipe.os, "cpu_count", lambda: 16)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert recipe.feature_workers(load_config(None, ["data.num_workers=4"])) == 16
    assert recipe.feature_workers(load_config(None, [])) == 0  # num_workers 0: decode in the training process
    assert recipe.feature_workers(load_config(None, ["data.num_workers=4", "data.feature_workers=2"])) == 2
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # 4 processes on this machine share its cores
    assert recipe.feature_workers(load_config(None, ["data.num_workers=2"])) == 4
    with pytest.raises(CaptuneError, match="data.feature_workers must be >= 0"):
        load_config(None, ["data.feature_workers=-1"])


def test_the_training_log_says_how_long_the_loop_waited_for_the_loader(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = iter([3.0, 4.0, 4.5, 5.0, 100.0, 101.0])
    monkeypatch.setattr(recipe.time, "perf_counter", lambda: next(clock))
    speed = recipe.Throughput(since=0.0)
    speed.fetched()  # the first batch came at 3 s: 3 s waiting
    speed.add(8)  # queued at 4 s
    speed.fetched()  # the next came at once (4.5)
    speed.add(8)  # 5 s
    assert speed.window_rate() == 16 / 5 and speed.window_wait_fraction() == (3 + 0.5) / 5
    speed.new_window()
    speed.skip()  # a checkpoint: 100 s
    speed.fetched()  # 101 s
    assert speed.window_wait_fraction() == 1.0  # (nothing added yet: capped at 1)


@pytest.mark.parametrize("cudnn", [False, True])
def test_training_and_its_validation_choose_attention_kernels_as_configured(
    synthetic_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cudnn: bool
) -> None:
    """cuDNN attention plans every new shape (slow first steps on a GPU): training leaves it out unless asked, in the
    feature pass, the steps and validation's generation, and gives the process its setting back afterwards."""
    seen: set[bool] = set()
    attention = torch.nn.functional.scaled_dot_product_attention

    def recording(*args: Any, **kwargs: Any) -> torch.Tensor:
        seen.add(torch.backends.cuda.cudnn_sdp_enabled())
        assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.mem_efficient_sdp_enabled()
        return attention(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording)
    before = torch.backends.cuda.cudnn_sdp_enabled()
    config = _config(synthetic_dir, tmp_path / "run", "train.max_steps=2", "train.validate=true",
                     f"model.cudnn_attention={cudnn}", f"generate.cudnn_attention={cudnn}",
                     "generate.num_beams=1", "generate.min_new_tokens=2", "generate.max_new_tokens=4")  # fmt: skip
    recipe.train(config)
    assert seen == {cudnn}
    assert torch.backends.cuda.cudnn_sdp_enabled() == before
