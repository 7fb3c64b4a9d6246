"""`captune merge`: the merged tiny model loads without PEFT and captions exactly as base + adapter."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from transformers import Blip2ForConditionalGeneration, Blip2Processor

from captune.cli import main
from captune.config import Config, GenerateConfig
from captune.errors import CaptuneError
from captune.export import merge_model_dir, run_metrics
from captune.generation.core import generate_captions
from captune.model import LoadedModel, load_base
from captune.model_dir import META_FILE, load_model_dir

from .conftest import save_run

GREEDY = GenerateConfig(num_beams=1, min_new_tokens=1, max_new_tokens=8)


def _images() -> list[Image.Image]:
    colours = [(200, 20, 20), (20, 180, 40), (30, 40, 220), (230, 230, 30), (128, 128, 128), (10, 10, 10)]
    return [Image.new("RGB", (40, 30), colour) for colour in colours]


def _weight(model: torch.nn.Module, suffix: str) -> torch.Tensor:
    """The weight of the one module whose name ends with `suffix` (PEFT's wrapper names stripped)."""
    found = [p for n, p in model.named_parameters() if n.endswith(suffix) and "lora_" not in n]
    assert len(found) == 1, suffix
    return found[0].detach()


# --- the merged directory -------------------------------------------------------------------------------------


def test_merged_directory_loads_with_plain_transformers(run: tuple[LoadedModel, Config, Path], tmp_path: Path) -> None:
    output = merge_model_dir(run[2], tmp_path / "merged")
    model = Blip2ForConditionalGeneration.from_pretrained(output)
    processor = Blip2Processor.from_pretrained(output)
    assert not [n for n, _ in model.named_parameters() if "lora_" in n]
    assert processor.num_query_tokens == model.config.num_query_tokens
    files = {p.name for p in output.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", META_FILE, "README.md"} <= files
    assert "adapter_config.json" not in files
    assert not list(tmp_path.glob(".tmp-*"))


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["qformer_target_modules=query,value", "train.mode=lora-lm+qformer"],
        ["modules_to_save=language_projection", "target_modules=fc1"],
        ["train.mode=qformer"],
        ["train.mode=vit+qformer"],
        ["train.mode=lora-lm+qformer+vit", "vit_target_modules=qkv,projection"],
        ["modules_to_save=language_projection,language_model.lm_head"],
    ],
    ids=[
        "language_model",
        "qformer",
        "modules_to_save",
        "qformer_in_full",
        "vit_and_qformer_in_full",
        "vit_lora",
        "output_layer",
    ],  # fmt: skip
)
def test_merged_model_captions_token_for_token_as_base_plus_adapter(tmp_path: Path, overrides: list[str]) -> None:
    tuned, _, best = save_run(tmp_path / "run", overrides)
    merged = Blip2ForConditionalGeneration.from_pretrained(merge_model_dir(best, tmp_path / "merged")).eval()
    processor = Blip2Processor.from_pretrained(tmp_path / "merged")
    base = load_base("tiny")
    images = _images()
    expected = generate_captions(tuned.model, tuned.processor, images, GREEDY)
    # The adapter must matter, or equal captions would prove nothing.
    assert expected != generate_captions(base.model, base.processor, images, GREEDY)
    assert generate_captions(merged, processor, images, GREEDY) == expected


@pytest.mark.parametrize(
    ("mode", "name"),
    [
        ("lora-lm+qformer", "qformer.encoder.layer.0.attention.attention.query.weight"),
        ("lora-lm+qformer+vit", "vision_model.encoder.layers.1.self_attn.qkv.weight"),
    ],
    ids=["qformer", "vit"],
)
def test_lora_on_the_image_side_is_merged_into_its_weights(tmp_path: Path, mode: str, name: str) -> None:
    tuned, _, best = save_run(tmp_path / "run", [f"train.mode={mode}"])
    merged = Blip2ForConditionalGeneration.from_pretrained(merge_model_dir(best, tmp_path / "merged"))
    base_weight = _weight(load_base("tiny").model, name)
    expected = base_weight + tuned.model.base_model.model.get_submodule(name.removesuffix(".weight")).get_delta_weight(
        "default"
    )
    assert not torch.allclose(_weight(merged, name), base_weight)
    torch.testing.assert_close(_weight(merged, name), expected)


def test_modules_to_save_weights_survive_the_merge(tmp_path: Path) -> None:
    tuned, _, best = save_run(tmp_path / "run", ["modules_to_save=language_projection"])
    merged = Blip2ForConditionalGeneration.from_pretrained(merge_model_dir(best, tmp_path / "merged"))
    trained = _weight(tuned.model, "language_projection.modules_to_save.default.weight")
    assert not torch.equal(trained, _weight(load_base("tiny").model, "language_projection.weight"))
    assert torch.equal(_weight(merged, "language_projection.weight"), trained)


def test_a_trained_output_layer_is_saved_untied_from_the_input_embeddings(tmp_path: Path) -> None:
    # The tiny OPT ties its output layer to its input embeddings; the demo trains the output layer alone.
    tuned, _, best = save_run(tmp_path / "run", ["modules_to_save=language_projection,language_model.lm_head"])
    merged = Blip2ForConditionalGeneration.from_pretrained(merge_model_dir(best, tmp_path / "merged"))
    base = load_base("tiny").model
    assert not merged.config.text_config.tie_word_embeddings
    trained = _weight(tuned.model, "lm_head.modules_to_save.default.weight")
    assert not torch.equal(trained, base.language_model.get_output_embeddings().weight)
    assert torch.equal(merged.language_model.get_output_embeddings().weight, trained)
    assert torch.equal(
        merged.language_model.get_input_embeddings().weight, base.language_model.get_input_embeddings().weight
    )
    plain = Blip2ForConditionalGeneration.from_pretrained(merge_model_dir(save_run(tmp_path / "plain", [])[2],
                                                                          tmp_path / "merged-plain"))  # fmt: skip
    assert plain.config.text_config.tie_word_embeddings  # an untrained output layer stays tied


def test_captune_loads_the_merged_directory(run: tuple[LoadedModel, Config, Path], tmp_path: Path) -> None:
    tuned, _, best = run
    reloaded = load_model_dir(merge_model_dir(best, tmp_path / "merged"), device="cpu")
    assert isinstance(reloaded.model, Blip2ForConditionalGeneration)
    images = _images()
    expected = generate_captions(tuned.model, tuned.processor, images, GREEDY)
    assert generate_captions(reloaded.model, reloaded.processor, images, GREEDY) == expected


def test_merge_at_load_captions_as_base_plus_adapter(run: tuple[LoadedModel, Config, Path], tmp_path: Path) -> None:
    tuned, _, best = run
    merged = load_model_dir(best, device="cpu", merge=True)  # float32 on the CPU: exactly equal
    assert isinstance(merged.model, Blip2ForConditionalGeneration)
    assert not [n for n, _ in merged.model.named_parameters() if "lora_" in n]
    images = _images()
    assert generate_captions(merged.model, merged.processor, images, GREEDY) == generate_captions(
        tuned.model, tuned.processor, images, GREEDY
    )
    paths = []
    for i, image in enumerate(images):
        image.save(tmp_path / f"{i}.png")
        paths.append(str(tmp_path / f"{i}.png"))
    outputs = {}
    for flag in ([], ["--merge-adapter"]):
        out = tmp_path / f"captions{len(flag)}.jsonl"
        assert main(["caption", *paths, "--model-dir", str(best), "--device", "cpu", "--format", "jsonl",
                     "--output", str(out), "--workers", "0", *flag]) == 0  # fmt: skip
        outputs[len(flag)] = out.read_text()
    assert outputs[0] == outputs[1] and outputs[0].count("\n") == len(images)


def test_plain_generate_with_the_saved_generation_config_uses_the_runs_settings(tmp_path: Path) -> None:
    # Beam search and a minimum length: captions that greedy defaults would not produce.
    tuned, config, best = save_run(tmp_path / "run", ["num_beams=3", "min_new_tokens=4", "max_new_tokens=6"])
    output = merge_model_dir(best, tmp_path / "merged")
    model = Blip2ForConditionalGeneration.from_pretrained(output).eval()
    processor = Blip2Processor.from_pretrained(output)
    saved = model.generation_config
    assert (saved.num_beams, saved.min_new_tokens, saved.max_new_tokens, saved.do_sample) == (3, 4, 6, False)
    images = _images()
    inputs = processor(images=images, text=[""] * len(images), return_tensors="pt")
    out = model.generate(**inputs, generation_config=model.generation_config)
    captions = processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    expected = generate_captions(tuned.model, tuned.processor, images, config.generate)
    assert expected != generate_captions(tuned.model, tuned.processor, images, GREEDY)  # the settings matter
    assert [" ".join(c.split()) for c in captions] == expected


def test_a_static_cache_run_writes_it_into_the_generation_config(tmp_path: Path) -> None:
    _, _, best = save_run(tmp_path / "run", ["static_cache=true"])
    model = Blip2ForConditionalGeneration.from_pretrained(merge_model_dir(best, tmp_path / "merged"))
    assert model.generation_config.cache_implementation == "static"


def test_merged_directory_records_its_provenance(run: tuple[LoadedModel, Config, Path], tmp_path: Path) -> None:
    meta = json.loads((merge_model_dir(run[2], tmp_path / "merged") / META_FILE).read_text())
    assert meta["merged_from"] == str(run[2].resolve())
    assert meta["base_model"] == "tiny"
    assert meta["dtype"] == "float32"
    assert meta["config"]["generate"]["max_new_tokens"] == 8
    assert {"captune", "transformers", "peft", "torch"} <= set(meta["versions"])


def test_bf16_output_is_written_and_loaded_in_bf16(run: tuple[LoadedModel, Config, Path], tmp_path: Path) -> None:
    output = merge_model_dir(run[2], tmp_path / "merged", dtype="bf16")
    with safe_open(str(output / "model.safetensors"), "pt") as weights:
        assert {weights.get_slice(name).get_dtype() for name in weights.keys()} == {"BF16"}  # noqa: SIM118 (not a dict)
    model = Blip2ForConditionalGeneration.from_pretrained(output, dtype="auto")
    assert model.language_model.dtype == torch.bfloat16


# --- refusals ---------------------------------------------------------------------------------------------------


def test_a_non_empty_output_is_not_overwritten(run: tuple[LoadedModel, Config, Path], tmp_path: Path) -> None:
    output = tmp_path / "merged"
    output.mkdir()
    (output / "keep.txt").write_text("mine")
    with pytest.raises(CaptuneError, match=rf"--output {output} exists and is not empty.*--overwrite"):
        merge_model_dir(run[2], output)
    assert (output / "keep.txt").read_text() == "mine"


def test_overwrite_replaces_the_output(run: tuple[LoadedModel, Config, Path], tmp_path: Path) -> None:
    output = tmp_path / "merged"
    output.mkdir()
    (output / "stale.txt").write_text("old")
    merge_model_dir(run[2], output, overwrite=True)
    assert not (output / "stale.txt").exists()
    assert (output / "model.safetensors").is_file()


def test_a_failed_merge_leaves_the_previous_output_whole(
    run: tuple[LoadedModel, Config, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    output = tmp_path / "merged"
    output.mkdir()
    (output / "keep.txt").write_text("previous")

    def fail(*args: object, **kwargs: object) -> str:
        raise OSError("disk full")

    monkeypatch.setattr("captune.export.model_card", fail)
    with pytest.raises(OSError, match="disk full"):
        merge_model_dir(run[2], output, overwrite=True)
    assert [p.name for p in output.iterdir()] == ["keep.txt"]


def test_the_model_directory_itself_is_refused_as_output(run: tuple[LoadedModel, Config, Path]) -> None:
    with pytest.raises(CaptuneError, match="is the model directory itself"):
        merge_model_dir(run[2], run[2], overwrite=True)


def test_a_directory_without_an_adapter_is_refused(run: tuple[LoadedModel, Config, Path], tmp_path: Path) -> None:
    merged = merge_model_dir(run[2], tmp_path / "merged")
    with pytest.raises(CaptuneError, match=rf"{merged}: nothing to merge"):
        merge_model_dir(merged, tmp_path / "again")


# --- the card's metrics -----------------------------------------------------------------------------------------------


def test_run_metrics_fall_back_to_the_best_step_in_results_json(tmp_path: Path) -> None:
    best = tmp_path / "best"
    best.mkdir()
    history = [{"epoch": 1, "step": 4, "metrics": {"CIDEr": 0.2}}, {"epoch": 2, "step": 8, "metrics": {"CIDEr": 0.1}}]
    (tmp_path / "results.json").write_text(json.dumps({"best_step": 4, "history": history}))
    assert run_metrics(best) == ({"CIDEr": 0.2}, "results.json, val split at step 4")


# --- the command ------------------------------------------------------------------------------------------------


def test_merge_command_writes_a_model_that_captune_captions_with(
    run: tuple[LoadedModel, Config, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "merged"
    assert main(["merge", "--model-dir", str(run[2]), "--output", str(output), "--dtype", "fp32"]) == 0
    assert f"merged model in {output}" in capsys.readouterr().out
    image = tmp_path / "red.png"
    _images()[0].save(image)
    assert main(["caption", str(image), "--model-dir", str(output), "--device", "cpu"]) == 0
    tuned = run[0]
    assert capsys.readouterr().out.strip() == generate_captions(tuned.model, tuned.processor, _images()[:1], GREEDY)[0]


def test_merge_command_names_a_missing_model_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "runs" / "best"
    assert main(["merge", "--model-dir", str(missing), "--output", str(tmp_path / "out")]) == 2
    assert f"error: --model-dir {missing}: no such directory" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
