"""`lora.method` and the LoRA variants end to end: every PEFT method trains through the recipe, resumes bit for bit,
saves, loads, merges to the same outputs, captions, serves and goes into the model card, on the tiny model and on
the twin of blip2-opt-2.7b; the config refuses what a method cannot do, naming the key and value."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from accelerate.utils import DistributedType
from fastapi.testclient import TestClient
from PIL import Image
from safetensors.torch import load_file
from transformers import Blip2ForConditionalGeneration

from captune.cli import main
from captune.config import Config, GenerateConfig
from captune.config_loading import load_config
from captune.errors import CaptuneError
from captune.generation.core import generate_captions
from captune.model import LoadedModel, apply_train_mode, load_base
from captune.model_dir import load_model_dir, load_saved_weights
from captune.peft_methods import METHODS
from captune.serve import ServeSettings, create_app
from captune.training import recipe

VARIANTS = {
    "ia3": (["lora.method=ia3", "lora.target_modules=q_proj,v_proj,fc2"], "IA3", ("ia3_l",)),
    "loha": (["lora.method=loha"], "LOHA", ("hada_w1_a", "hada_w2_b")),
    "lokr": (["lora.method=lokr"], "LOKR", ("lokr_w1", "lokr_w2")),
    "adalora": (["lora.method=adalora"], "ADALORA", ("lora_A", "lora_E", "lora_B")),
    "dora": (["lora.use_dora=true", "lora.use_rslora=true"], "LORA", ("lora_A", "lora_magnitude_vector")),
    "pissa": (["lora.init_lora_weights=pissa"], "LORA", ("lora_A", "lora_B")),
    "olora": (["lora.init_lora_weights=olora"], "LORA", ("lora_A", "lora_B")),
}
"""Per variant: its overrides, the peft_type its saved adapter_config.json names, and parameter names it must have."""
GREEDY = GenerateConfig(num_beams=1, min_new_tokens=1, max_new_tokens=6)


def _config(data_dir: Path, output_dir: Path, *overrides: str) -> Config:
    """Four optimizer steps of batch 5 x 2 on the small synthetic set, a checkpoint every 2."""
    return load_config(None, ["data.format=synthetic", f"data.data_dir={data_dir}", f"train.output_dir={output_dir}",
                              "train.batch_size=5", "train.grad_accum=2", "train.lr=1e-3", "train.warmup_steps=1",
                              "train.validate=false", "model.dtype=fp32", "train.max_steps=4", "train.save_every=2",
                              "data.num_workers=0", *overrides])  # fmt: skip


def _logits(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def _check_method_end_to_end(data_dir: Path, tmp_path: Path, variant: str, *overrides: str) -> Path:
    """Trains, resumes, loads, merges and captions one variant; returns the run's final/ directory."""
    given, peft_type, markers = VARIANTS[variant]
    config = _config(data_dir, tmp_path / "run", *given, *overrides)
    recipe.train(config)
    final = tmp_path / "run" / "final"
    adapter = load_file(str(final / "adapter_model.safetensors"))
    # The saved adapter is the method's: PEFT's config names it, and its parameters are there and trained.
    saved = json.loads((final / "adapter_config.json").read_text())
    assert saved["peft_type"] == peft_type
    for marker in markers:
        assert any(f".{marker}" in name for name in adapter), (marker, sorted(adapter)[:4])
    halfway = load_file(str(tmp_path / "run" / "checkpoints" / "step-000002" / "adapter_model.safetensors"))
    assert any(not torch.equal(halfway[k], adapter[k]) for k in adapter)
    # Resumed from step 2: the same adapter, bit for bit.
    resume = f"train.resume_from={tmp_path / 'run' / 'checkpoints' / 'step-000002'}"
    recipe.train(_config(data_dir, tmp_path / "resumed", *given, *overrides, resume))
    again = load_file(str(tmp_path / "resumed" / "final" / "adapter_model.safetensors"))
    assert again.keys() == adapter.keys() and all(torch.equal(again[k], adapter[k]) for k in adapter)
    # Loaded from disk, it computes what the model in training computed (PiSSA/OLoRA: the converted adapter on the
    # unchanged base against the trained one on the changed base).
    loaded = load_model_dir(final, torch.float32, device="cpu")
    live = apply_train_mode(load_base(str(tmp_path / "run" / "base-model")).model, config)
    load_saved_weights(live, final)
    images = [Image.open(p) for p in sorted((data_dir / "images").glob("val-*.png"))[:3]]
    inputs = loaded.processor(images=images, text=["a picture of"] * len(images), return_tensors="pt")
    torch.testing.assert_close(_logits(loaded.model, inputs), _logits(live.eval(), inputs), rtol=1e-4, atol=1e-5)
    # `captune merge`: a plain BLIP-2 with the outputs and captions of base + adapter.
    assert main(["merge", "--model-dir", str(final), "--output", str(tmp_path / "merged")]) == 0
    merged = Blip2ForConditionalGeneration.from_pretrained(tmp_path / "merged").eval()
    assert not [n for n, _ in merged.named_parameters() if any(m in n for m in markers)]
    torch.testing.assert_close(_logits(merged, inputs), _logits(loaded.model, inputs), rtol=1e-4, atol=1e-5)
    captions = generate_captions(loaded.model, loaded.processor, images, GREEDY)
    assert generate_captions(merged, loaded.processor, images, GREEDY) == captions
    assert all(isinstance(c, str) for c in captions)
    # The model card says which method it is.
    method = config.lora.method
    card = (final / "README.md").read_text()
    assert f"| lora.method | `{method}` |" in card and METHODS[method].card in card
    return final


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_each_method_on_the_language_model_trains_resumes_loads_merges_with_cached_features(
    synthetic_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, variant: str
) -> None:
    caplog.set_level("INFO", logger="captune")
    final = _check_method_end_to_end(synthetic_dir, tmp_path, variant, "lora.modules_to_save=")
    # Only the language model adapts, so the image features are computed once (the cached fast path).
    assert "training path: cached image features" in caplog.text
    assert all(".language_model." in name for name in load_file(str(final / "adapter_model.safetensors")))
    # `captune serve` names the adapter and captions as the loaded model does.
    image = sorted((synthetic_dir / "images").glob("val-*.png"))[0]
    options = {"num_beams": 1, "min_new_tokens": 1, "max_new_tokens": 5}
    with TestClient(create_app(final, ServeSettings(device="cpu", max_wait_ms=5))) as client:
        assert client.get("/v1/model").json()["adapter"]["type"] == VARIANTS[variant][1]
        files = [("images", ("val.png", image.read_bytes(), "image/png"))]
        response = client.post("/v1/captions", files=files, data={k: str(v) for k, v in options.items()})
    assert response.status_code == 200, response.text
    loaded = load_model_dir(final, device="cpu")
    expected = generate_captions(loaded.model, loaded.processor, [Image.open(image).convert("RGB")],
                                 GenerateConfig(**options))  # fmt: skip
    assert [c["caption"] for c in response.json()["captions"]] == expected


def test_pissa_is_saved_as_a_plain_lora_of_twice_the_rank_for_the_unchanged_base(
    synthetic_dir: Path, tmp_path: Path
) -> None:
    recipe.train(_config(synthetic_dir, tmp_path / "run", "lora.init_lora_weights=pissa", "lora.r=4",
                         "lora.modules_to_save=language_projection", "train.save_every=0"))  # fmt: skip
    final = tmp_path / "run" / "final"
    saved = json.loads((final / "adapter_config.json").read_text())
    assert (saved["r"], saved["lora_alpha"], saved["init_lora_weights"]) == (8, 64, True)
    adapter = load_file(str(final / "adapter_model.safetensors"))
    a = next(v for k, v in adapter.items() if k.endswith("q_proj.lora_A.weight"))
    assert a.shape[0] == 8
    # The projection trained in full is kept beside the converted matrices.
    assert any("language_projection" in k for k in adapter)


def test_adalora_prunes_ranks_over_the_run_and_keeps_its_allocator_in_checkpoints(
    synthetic_dir: Path, tmp_path: Path
) -> None:
    recipe.train(_config(synthetic_dir, tmp_path / "run", "lora.method=adalora", "lora.r=2"))
    adapter = load_file(str(tmp_path / "run" / "final" / "adapter_model.safetensors"))
    saved = json.loads((tmp_path / "run" / "final" / "adapter_config.json").read_text())
    assert (saved["init_r"], saved["target_r"], saved["total_step"]) == (3, 2, 4)
    # update_and_allocate ran: of the 3 initial ranks per layer, the least important were masked to zero towards
    # the average budget of 2 (in the weights as trained) and cut out of the saved adapter (its rank_pattern).
    singular = [v for k, v in adapter.items() if ".lora_E" in k]
    assert len(singular) == 4 and sum(len(v) for v in singular) == 2 * 4 and saved["rank_pattern"]
    trained = load_file(str(tmp_path / "run" / "final" / "trainable.safetensors"))
    masked = [v for k, v in trained.items() if ".lora_E" in k]
    assert [len(v) for v in masked] == [3] * 4 and sum(int((v == 0).sum()) for v in masked) == 4
    state = torch.load(tmp_path / "run" / "checkpoints" / "step-000002" / "optimizer.pt", weights_only=False)
    assert state["adalora"]["exp_avg_ipt"]


@pytest.mark.parametrize("variant", ["ia3", "loha", "lokr", "adalora", "dora", "pissa"])
def test_each_method_on_the_twin_with_image_side_targets(synthetic_dir: Path, tmp_path: Path, variant: str) -> None:
    # The twin of blip2-opt-2.7b (its tokenizer, ids and config): the method on the language model, the Q-Former's
    # query/value and the ViT's qkv, the projection trained in full.
    twin = ("model.name=twin-blip2-opt-2.7b", "train.mode=lora-lm+qformer+vit")
    twin += ("lora.modules_to_save=language_projection",)
    final = _check_method_end_to_end(synthetic_dir, tmp_path, variant, *twin)
    names = load_file(str(final / "adapter_model.safetensors"))
    assert any(".qformer." in n for n in names) and any(".vision_model." in n and ".qkv." in n for n in names)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["lora.method=prefix"], r"lora.method='prefix': use one of lora, adalora, ia3, loha, lokr"),
        (["lora.method=ia3", "lora.r=16"], r"lora.r=16 means nothing with lora.method=ia3 .*; remove it"),
        (["lora.method=loha", "lora.dropout=0.05"], r"lora.dropout=0.05 .* set rank_dropout or module_dropout"),
        (["lora.method=lokr", "lora.use_dora=true"], r"lora.use_dora=True means nothing with lora.method=lokr"),
        (["lora.init_lora_weights=eva"], r"lora.init_lora_weights='eva': use one of true, false, gaussian"),
        (["lora.method=adalora", "lora.init_lora_weights=olora"], r"AdaLoRA takes true or false only"),
        (["lora.use_dora=true", "lora.init_lora_weights=pissa"], r"use_dora=true with lora.init_lora_weights=pissa"),
        (["lora.options={r: 4}"], r"lora.options.r=4: set by lora.r, not lora.options; remove it"),
        (["lora.options={total_step: 9}", "lora.method=adalora"], r"total_step=9: set by nothing: captune sets it"),
        (["lora.options={init_r: 12, tinit_: 5}", "lora.method=adalora"], r"tinit_=5: AdaLoraConfig .* has no such"),
        (["lora.options={loftq_config: {}}"], r"loftq_config=\{\}: not supported \(LoftQ"),
        (["lora.options={decompose_factor: 4}"], r"decompose_factor=4: LoraConfig \(lora.method=lora\) has no such"),
        (["lora.method=loha", "model.quantization=4bit"], r"lora.method=loha with model.quantization=4bit: PEFT has"),
        (["lora.options=[1, 2]"], r"lora.options: \[1, 2\] is not a valid dict"),
    ],
)
def test_what_a_method_cannot_do_is_refused_naming_key_and_value(overrides: list[str], message: str) -> None:
    with pytest.raises(CaptuneError, match=message):
        load_config(None, overrides)


def test_peft_refusals_name_the_method_and_adalora_needs_room_for_its_budget(
    synthetic_dir: Path, tmp_path: Path
) -> None:
    with pytest.raises(
        CaptuneError,
        match=r"lora.method=loha and lora.options \{'layers_pattern': 'layers'\}: PEFT "
        r"refuses them \(.*layers_to_transform.*\); change the option it names",
    ):
        load_config(None, ["lora.method=loha", "lora.options={layers_pattern: layers}"])
    short = _config(synthetic_dir, tmp_path / "run", "lora.method=adalora", "lora.options={tinit: 3, tfinal: 2}")
    with pytest.raises(CaptuneError, match=r"adalora over 4 optimizer steps: .* lower tinit/tfinal in lora.options"):
        recipe.setup(short)


def test_the_default_method_is_plain_lora_as_before(tiny: LoadedModel) -> None:
    config = load_config(None, [])
    assert (config.lora.method, config.lora.use_dora, config.lora.init_lora_weights) == ("lora", False, "true")
    peft_config = apply_train_mode(tiny.model, config).peft_config["default"]
    assert (type(peft_config).__name__, peft_config.r, peft_config.lora_alpha, peft_config.lora_dropout) == (
        "LoraConfig", 8, 32, 0.1)  # fmt: skip
    assert (peft_config.use_dora, peft_config.use_rslora, peft_config.init_lora_weights) == (False, False, True)


@pytest.mark.parametrize("given", ["lora.method=adalora", "lora.init_lora_weights=olora"])
def test_methods_that_read_whole_weights_are_refused_under_fsdp(
    synthetic_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, given: str
) -> None:
    # FSDP needs GPUs; accelerate's answer is what the recipe reads, so it is stood in for here.
    monkeypatch.setattr(recipe.Accelerator, "distributed_type", property(lambda self: DistributedType.FSDP))
    with pytest.raises(CaptuneError, match=r"under FSDP: AdaLoRA's rank allocator and the PiSSA/OLoRA conversion"):
        recipe.setup(_config(synthetic_dir, tmp_path / "run", given))
