"""The training recipe end to end on the tiny model: bad data, validation and best/, saved model directories, training
modes, FSDP refusals and the attention kernels it runs under."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from accelerate.utils import DistributedType
from PIL import Image
from safetensors.torch import load_file
from transformers import Blip2ForConditionalGeneration

from captune.cli import main
from captune.config import Config, GenerateConfig
from captune.config_loading import load_config
from captune.data import read
from captune.errors import CaptuneError
from captune.generation.core import generate_captions
from captune.model import LoadedModel, blip_of, build_tiny, load_base
from captune.model_dir import load_model_dir, load_saved_weights, save_model_dir
from captune.training import recipe
from captune.training_modes import TRAINED_FILE, TRAINING_MODES

from ..conftest import write_image, write_truncated_jpeg

QFORMER_TRAINED = TRAINING_MODES["qformer"].in_full


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


def _adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "adapter_model.safetensors"))


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
    from captune.model_dir import load_model_dir

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


def _logits(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize("name", ["tiny", "twin-blip2-opt-2.7b"])
def test_vit_lora_mode_trains_lora_on_the_vit_attention_resumes_exactly_and_merges(
    synthetic_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, name: str
) -> None:
    # LoRA on the language model, the Q-Former and the ViT's qkv: the ViT's own weights stay as they were, its LoRA
    # trains, so the image side runs every step (no cached features).
    caplog.set_level("INFO", logger="captune")
    overrides = (f"model.name={name}", "train.mode=lora-lm+qformer+vit", "lora.modules_to_save=", "train.max_steps=4",
                 "train.save_every=2", "data.num_workers=0")  # fmt: skip
    recipe.train(_config(synthetic_dir, tmp_path / "run", *overrides))
    assert "training path: full" in caplog.text and "(base_model.model.vision_model.encoder" in caplog.text
    final = tmp_path / "run" / "final"
    adapter = _adapter(final)
    base = load_base(str(tmp_path / "run" / "base-model"))
    layers = base.model.config.vision_config.num_hidden_layers
    vit = {k: v for k, v in adapter.items() if ".vision_model." in k}
    assert sorted(vit) == sorted(f"base_model.model.vision_model.encoder.layers.{i}.self_attn.qkv.lora_{ab}.weight"
                                 for i in range(layers) for ab in "AB")  # fmt: skip
    assert all(v.abs().sum() > 0 for k, v in vit.items() if ".lora_B." in k)  # B starts at zero: it trained
    loaded = load_model_dir(final, torch.float32, device="cpu")
    base_weights = dict(base.model.named_parameters())
    for param_name, param in loaded.model.named_parameters():  # every base weight of the ViT as it was
        if ".vision_model." in param_name and "lora_" not in param_name:
            blip_name = param_name.removeprefix("base_model.model.").replace(".base_layer.", ".")
            assert torch.equal(param, base_weights[blip_name]), param_name
    images = [Image.open(p) for p in sorted((synthetic_dir / "images").glob("val-*.png"))[:3]]
    inputs = loaded.processor(images=images, text=["a picture of"] * len(images), return_tensors="pt")
    # The adapted attention computes something else than the base's (the twin's ViT weights are initialised at std
    # 1e-10, Blip2VisionConfig's initializer_range, so the change is seen at the layer, not at the ViT's output).
    qkv = "vision_model.encoder.layers.0.self_attn.qkv"
    x = torch.randn(2, 5, base.model.config.vision_config.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert not torch.allclose(blip_of(loaded.model).get_submodule(qkv)(x), base.model.get_submodule(qkv)(x))
    # Resumed from step 2: the same adapter bit for bit.
    resumed = _config(synthetic_dir, tmp_path / "resumed", *overrides,
                      f"train.resume_from={tmp_path / 'run' / 'checkpoints' / 'step-000002'}")  # fmt: skip
    recipe.train(resumed)
    again = _adapter(tmp_path / "resumed" / "final")
    assert again.keys() == adapter.keys() and all(torch.equal(again[k], adapter[k]) for k in adapter)
    # `captune merge`: a plain BLIP-2 with the same outputs and captions as base + adapter.
    assert main(["merge", "--model-dir", str(final), "--output", str(tmp_path / "merged")]) == 0
    merged = Blip2ForConditionalGeneration.from_pretrained(tmp_path / "merged").eval()
    assert not [n for n, _ in merged.named_parameters() if "lora_" in n]
    torch.testing.assert_close(_logits(merged, inputs), _logits(loaded.model, inputs), rtol=1e-4, atol=1e-4)
    greedy = GenerateConfig(num_beams=1, min_new_tokens=1, max_new_tokens=6)
    assert generate_captions(merged, loaded.processor, images, greedy) == generate_captions(
        loaded.model, loaded.processor, images, greedy
    )


@pytest.mark.parametrize(
    ("key", "targets", "mode", "refusing", "default"),
    [
        ("qformer_target_modules", ["query"], "lora-lm+qformer", ["lora-lm"], ["query", "value"]),
        ("vit_target_modules", ["qkv", "projection"], "lora-lm+qformer+vit", ["lora-lm", "lora-lm+qformer"], ["qkv"]),
    ],
)
def test_lora_targets_without_the_mode_that_uses_them_are_an_error(
    key: str, targets: list[str], mode: str, refusing: list[str], default: list[str]
) -> None:
    given = f"lora.{key}={','.join(targets)}"
    for other in refusing:
        refusal = rf"lora.{key} is set but train.mode is {re.escape(other)} .* set train.mode={re.escape(mode)}, or "
        with pytest.raises(CaptuneError, match=rf"{refusal}lora.{key}= \(empty\)"):
            load_config(None, [given, f"train.mode={other}"])
    assert getattr(load_config(None, [f"train.mode={mode}"]).lora, key) == default  # the mode's default targets
    assert getattr(load_config(None, [f"train.mode={mode}", given]).lora, key) == targets


def test_retrieval_refuses_every_lora_mode() -> None:
    lora_modes = [name for name, mode in TRAINING_MODES.items() if mode.lora]
    assert "lora-lm+qformer+vit" in lora_modes
    for mode in lora_modes:
        with pytest.raises(CaptuneError, match=rf"train.mode={re.escape(mode)} with task retrieval: .* no language "
                                               "model for LoRA; use train.mode=qformer or vit\\+qformer"):  # fmt: skip
            load_config(None, ["data.task=retrieval", f"train.mode={mode}"])


def test_validation_under_fsdp_is_refused_with_what_to_do(
    synthetic_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # FSDP needs GPUs; accelerate's answer is what the recipe reads, so it is stood in for here.
    monkeypatch.setattr(recipe.Accelerator, "distributed_type", property(lambda self: DistributedType.FSDP))
    config = _config(synthetic_dir, tmp_path / "run", "train.validate=true")
    with pytest.raises(CaptuneError, match=r"train.validate=true under FSDP.*train.validate=false.*captune eval"):
        recipe.train(config)


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
    records = read("synthetic", synthetic_dir).split("val")
    again = recipe.predict_records(loaded.model, loaded.processor, records, config.generate)
    assert again == final["predictions"]
    greedy = json.loads((tmp_path / "run" / "val" / f"step-{state.best_step:06d}.json").read_text())["predictions"]
    assert greedy.keys() == again.keys()


def test_saved_weights_go_back_into_a_model_of_the_same_kind(tmp_path: Path) -> None:
    for overrides in ([f"train.mode={mode}"] for mode in TRAINING_MODES):
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


def test_lr_scales_give_parts_of_the_model_their_own_rate_on_the_same_schedule_and_resume_exactly(
    synthetic_dir: Path, tmp_path: Path
) -> None:
    scaled = ("lora.modules_to_save=language_projection,qformer,language_model.lm_head",
              "train.lr_scales={qformer: 0.1, language_model.lm_head: 2}", "train.max_steps=6", "train.log_every=1",
              "train.save_every=3")  # fmt: skip
    run = recipe.setup(_config(synthetic_dir, tmp_path / "setup", *scaled))
    by_name = {recipe.model_path(n): p for n, p in run.loaded.model.named_parameters() if p.requires_grad}
    groups = {g["name"]: (g["initial_lr"], {id(p) for p in g["params"]}) for g in run.optimizer.param_groups}
    assert {name: lr for name, (lr, _) in groups.items()} == {
        "the rest": 1e-3, "qformer": pytest.approx(1e-4), "language_model.lm_head": 2e-3}  # fmt: skip
    for path, param in by_name.items():  # the longest path covering a parameter decides its group
        group = (
            "qformer" if path.startswith("qformer.") else "language_model.lm_head" if "lm_head" in path else "the rest"
        )
        assert id(param) in groups[group][1], path
    assert any(p.startswith("language_projection.") for p in by_name) and any("lora_A" in p for p in by_name)

    recipe.train(_config(synthetic_dir, tmp_path / "run", *scaled))
    logged = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    plain = tmp_path / "plain"
    recipe.train(_config(synthetic_dir, plain, *scaled[:1], *scaled[2:]))
    plain_logged = [json.loads(line) for line in (plain / "train_log.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in logged] == pytest.approx([r["lr"] for r in plain_logged])  # train.lr's schedule
    trained, unscaled = _adapter(tmp_path / "run" / "final"), _adapter(plain / "final")
    assert trained.keys() == unscaled.keys() and any(not torch.equal(trained[k], unscaled[k]) for k in trained)
    checkpoint = tmp_path / "run" / "checkpoints" / "step-000003"
    recipe.train(_config(synthetic_dir, tmp_path / "resumed", *scaled, f"train.resume_from={checkpoint}"))
    again = _adapter(tmp_path / "resumed" / "final")
    assert again.keys() == trained.keys() and all(torch.equal(again[k], trained[k]) for k in trained)


def test_lr_scales_that_cover_nothing_trained_or_are_not_positive_numbers_are_refused(
    synthetic_dir: Path, tmp_path: Path
) -> None:
    with pytest.raises(CaptuneError, match=r"train.lr_scales: nothing trains under vision_model; the trained "
                                           r"parameters are under language_model, language_projection"):  # fmt: skip
        recipe.setup(_config(synthetic_dir, tmp_path / "run", "train.lr_scales={vision_model: 0.1}"))
    for bad in ("{qformer: -1}", "{qformer: 0}", "{qformer: fast}", "{qformer: .nan}", "[0.1]"):
        with pytest.raises(CaptuneError, match=r"train.lr_scales"):
            load_config(None, [f"train.lr_scales={bad}"])
