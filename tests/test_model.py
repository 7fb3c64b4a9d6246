"""The tiny BLIP-2, LoRA placement and loading a base model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from captune.config import LoraConfig
from captune.errors import CaptuneError
from captune.model import LoadedModel, apply_lora, load_base


def _images() -> list[Image.Image]:
    return [Image.new("RGB", (40, 30), colour) for colour in [(200, 20, 20), (20, 180, 40), (30, 40, 220)]]


def _lora_layers(model: torch.nn.Module) -> list[str]:
    """Names of the layers that hold a LoRA adapter, relative to the BLIP-2 model (`language_model....q_proj`)."""
    return [name.removeprefix("base_model.model.").removesuffix(".lora_A") for name, _ in model.named_modules()
            if name.endswith(".lora_A")]  # fmt: skip


# --- the tiny model --------------------------------------------------------------------------------------------


def test_processor_adds_one_image_token_per_query_token(tiny: LoadedModel) -> None:
    config = tiny.model.config
    ids = tiny.processor(images=_images()[:1], text=["a red circle"], return_tensors="pt")["input_ids"][0]
    image_id = tiny.processor.tokenizer.convert_tokens_to_ids(tiny.processor.image_token.content)
    assert image_id == config.image_token_index
    assert int((ids == config.image_token_index).sum()) == config.num_query_tokens == 8


def test_tiny_model_is_deterministic_for_a_seed() -> None:
    first, second = load_base("tiny", seed=3), load_base("tiny", seed=3)
    assert all(torch.equal(a, b) for a, b in zip(first.model.parameters(), second.model.parameters(), strict=True))


def test_tiny_vqa_knows_every_word_of_the_synthetic_questions_and_their_answers_and_tiny_is_unchanged() -> None:
    from captune.data.synthetic import ATTRIBUTES, QUESTIONS, SHAPES
    from captune.tiny import TINY_WORDS

    vqa, tiny = load_base("tiny-vqa").processor.tokenizer, load_base("tiny").processor.tokenizer
    texts = [f"Question: {q.format(shape=shape)} Answer:" for q, _, _ in QUESTIONS for shape in SHAPES]
    texts += [f"Question: is there a {shape}? Answer: yes no" for shape in SHAPES]
    texts += [" ".join(words) for words in ATTRIBUTES.values()]
    for text in texts:
        assert vqa.unk_token_id not in vqa(text).input_ids, text
    assert tiny.unk_token_id in tiny("Question: which shape is it? Answer: yes").input_ids
    assert len(tiny) == len(TINY_WORDS) + 4  # <pad>, <unk>, </s>, <image>: the captioning demo's model as it was
    words = {word: i for word, i in tiny.get_vocab().items() if word != "<image>"}  # (added last, after the words)
    assert words.items() <= vqa.get_vocab().items()  # the same ids for the caption words


def test_load_base_casts_the_tiny_model_to_the_dtype() -> None:
    assert {p.dtype for p in load_base("tiny", torch.bfloat16).model.parameters()} == {torch.bfloat16}


# --- LoRA placement --------------------------------------------------------------------------------------------


def test_default_lora_targets_only_the_language_models_q_and_v_projections(tiny: LoadedModel) -> None:
    layers = _lora_layers(apply_lora(tiny.model, LoraConfig()))
    assert sorted(name.rsplit(".", 1)[-1] for name in layers) == ["q_proj", "q_proj", "v_proj", "v_proj"]
    assert all(name.startswith("language_model.") for name in layers)


def test_a_name_shared_with_the_vision_encoder_gets_lora_in_the_language_model_only(tiny: LoadedModel) -> None:
    # fc1 is both an OPT layer and a layer of the vision encoder's MLP.
    assert any(name.startswith("vision_model.") and name.endswith(".fc1") for name, _ in tiny.model.named_modules())
    layers = _lora_layers(apply_lora(tiny.model, LoraConfig(target_modules=["fc1"])))
    assert len(layers) == 2
    assert all(name.startswith("language_model.") for name in layers)


def test_qformer_target_modules_put_lora_into_the_qformer(tiny: LoadedModel) -> None:
    layers = _lora_layers(apply_lora(tiny.model, LoraConfig(qformer_target_modules=["query", "value"])))
    qformer = [name for name in layers if name.startswith("qformer.")]
    # (query, value) x (self-attention in 2 layers + cross-attention in layer 0: cross_attention_frequency is 2)
    assert len(qformer) == 6
    assert {name.rsplit(".", 1)[-1] for name in qformer} == {"query", "value"}
    assert not [name for name in layers if name.startswith("vision_model.")]


@pytest.mark.parametrize("targets", [["qkv"], ["qkv", "projection"]])
def test_vit_target_modules_put_lora_into_the_vision_encoders_attention_only(
    tiny: LoadedModel, targets: list[str]
) -> None:
    model = apply_lora(tiny.model, LoraConfig(vit_target_modules=targets))
    vit = [name for name in _lora_layers(model) if name.startswith("vision_model.")]
    layers = tiny.model.config.vision_config.num_hidden_layers
    assert sorted(vit) == sorted(
        f"vision_model.encoder.layers.{i}.self_attn.{t}" for i in range(layers) for t in targets
    )
    # The ViT's own weights stay frozen; only its LoRA trains.
    vision = {name: p.requires_grad for name, p in model.named_parameters() if ".vision_model." in name}
    assert {name for name, grad in vision.items() if grad} == {name for name in vision if "lora_" in name}


def test_only_lora_weights_are_trainable_by_default(tiny: LoadedModel) -> None:
    model = apply_lora(tiny.model, LoraConfig())
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 8
    assert all(".lora_A." in name or ".lora_B." in name for name in trainable)


def test_modules_to_save_trains_the_language_projection_in_full(tiny: LoadedModel) -> None:
    model = apply_lora(tiny.model, LoraConfig(modules_to_save=["language_projection"]))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad and "lora_" not in name}
    assert trainable == {
        "base_model.model.language_projection.modules_to_save.default.weight",
        "base_model.model.language_projection.modules_to_save.default.bias",
    }


def test_vision_encoder_stays_frozen_with_every_option_but_vit_targets(tiny: LoadedModel) -> None:
    lora = LoraConfig(qformer_target_modules=["query", "value"], modules_to_save=["language_projection"])
    model = apply_lora(tiny.model, lora)
    vision = [(name, p.requires_grad) for name, p in model.named_parameters() if ".vision_model." in name]
    assert vision
    assert not [name for name, grad in vision if grad]


@pytest.mark.parametrize(
    "lora",
    [
        LoraConfig(target_modules=["q_proj", "k_porj"]),
        LoraConfig(qformer_target_modules=["k_porj"]),
        LoraConfig(vit_target_modules=["k_porj"]),
    ],
    ids=["language_model", "qformer", "vit"],
)
def test_unknown_target_module_is_named(tiny: LoadedModel, lora: LoraConfig) -> None:
    with pytest.raises(CaptuneError, match="'k_porj' matches no linear layer"):
        apply_lora(tiny.model, lora)


def test_unknown_module_to_save_is_named(tiny: LoadedModel) -> None:
    with pytest.raises(CaptuneError, match="modules_to_save: 'projection' is not a module"):
        apply_lora(tiny.model, LoraConfig(modules_to_save=["projection"]))


def test_a_qformer_layer_name_in_target_modules_is_refused(tiny: LoadedModel) -> None:
    # `query` exists only in the Q-Former; in target_modules (the language model's list) it matches nothing.
    with pytest.raises(CaptuneError, match="'query'"):
        apply_lora(tiny.model, LoraConfig(target_modules=["q_proj", "query"]))


def test_load_base_of_a_model_not_in_the_cache_says_what_to_do() -> None:
    with pytest.raises(CaptuneError, match=r"could not load BLIP-2 model") as caught:
        load_base("absent-model")
    message = str(caught.value)
    assert "'absent-model'" in message
    assert "local directory with config.json" in message


def test_load_base_of_a_missing_directory_says_so(tmp_path: Path) -> None:
    missing = tmp_path / "absent" / "model"
    with pytest.raises(CaptuneError, match=rf"{missing}.*no such directory"):
        load_base(str(missing))


@pytest.mark.parametrize("quantization", ["4bit", "8bit"])
def test_quantisation_where_it_cannot_run_says_why(quantization: str, tmp_path: Path) -> None:
    with pytest.raises(CaptuneError, match=rf"quantization={quantization}: the built-in tiny model is built in code"):
        load_base("tiny", quantization=quantization)
    if not torch.cuda.is_available():
        with pytest.raises(CaptuneError, match=rf"quantization={quantization} needs a CUDA GPU"):
            load_base(str(tmp_path), quantization=quantization)
