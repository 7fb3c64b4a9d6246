"""Every path on twins of the real checkpoints (their tokenizers, processors, ids and configs; tiny hidden sizes,
random weights): the ids as the hub has them, what captune reads of them, training captions that end where
generation stops, and zero-shot captions as the transformers documentation's example gives them."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from tokenizers import AddedToken
from transformers import Blip2ForConditionalGeneration, Blip2Processor

from captune.cli import main
from captune.config import GenerateConfig
from captune.config_loading import load_config
from captune.data import read
from captune.data.images import load_rgb
from captune.data.synthetic import generate_synthetic
from captune.errors import CaptuneError
from captune.generation.core import generate_captions
from captune.generation.files import caption_paths
from captune.generation.inputs import text_inputs
from captune.model import LoadedModel, caption_end_id, check_image_tokens, load_base, stop_token_ids
from captune.model_dir import END_KEY, META_FILE, load_model_dir
from captune.training.batches import CaptionCollator, PackedCaptionCollator
from captune.training.recipe import setup, train, trained_model_dir
from captune.twins import CHECKPOINTS, TWINS, learning_overrides, write_checkpoint

from .conftest import SMALL_SPEC

OPT, T5, OLD = "twin-blip2-opt-2.7b", "twin-blip2-flan-t5-xl", "twin-blip2-opt-2.7b-coco"
OPT_END = 50118  # "\n": blip2-opt's generation config EOS; the tokenizer's EOS `</s>` is 2


@pytest.fixture(scope="module", params=sorted(TWINS))
def twin(request: pytest.FixtureRequest) -> LoadedModel:
    return load_base(request.param)


@pytest.fixture(scope="module")
def opt() -> LoadedModel:
    return load_base(OPT)


@pytest.fixture(scope="module")
def t5() -> LoadedModel:
    return load_base(T5)


def _image(seed: int = 0) -> Image.Image:
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (40, 56, 3), generator=generator, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


# --- the twins keep the checkpoints' ids -----------------------------------------------------------------------


def test_a_twin_has_the_recorded_tokenizer_ids_and_sizes(twin: LoadedModel) -> None:
    tokenizer, config = twin.processor.tokenizer, twin.model.config
    opt = config.text_config.model_type == "opt"
    old = CHECKPOINTS[TWINS[twin.base_name]].old_style
    assert len(tokenizer) == (50266 if opt else 32101)
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == ((2, 2, 1) if opt else
                                                                                       (None, 1, 0))  # fmt: skip
    assert tokenizer.unk_token_id == 2  # OPT: UNK = BOS = EOS
    assert config.image_token_index == tokenizer.convert_tokens_to_ids("<image>") == (50265 if opt else 32100)
    assert config.num_query_tokens == twin.processor.num_query_tokens == 32
    # more embedding rows than tokens: 50,304 (50,272 in old snapshots: OPT's default) and 32,128
    assert config.text_config.vocab_size == ((50272 if old else 50304) if opt else 32128)
    assert stop_token_ids(twin.model) == [OPT_END if opt else 1]
    assert sum(p.numel() for p in twin.model.parameters()) < 4_000_000


def test_training_captions_end_where_generation_stops(twin: LoadedModel) -> None:
    opt = twin.model.config.text_config.model_type == "opt"
    assert caption_end_id(twin.model, twin.processor.tokenizer) == (OPT_END if opt else 1)


def test_the_processor_puts_32_image_tokens_before_bos_at_the_checkpoints_image_size(twin: LoadedModel) -> None:
    # Old snapshots have no num_query_tokens in their processor files: captune takes the model's.
    inputs = twin.processor(images=[_image()], text=["a photo of"], return_tensors="pt")
    ids = inputs["input_ids"][0].tolist()
    image_id = twin.model.config.image_token_index
    assert ids[:32] == [image_id] * 32 and image_id not in ids[32:]
    assert ids[32:] == twin.processor.tokenizer("a photo of").input_ids  # OPT: BOS (2) first; T5: none
    size = 364 if twin.base_name == OLD else 224
    assert inputs["pixel_values"].shape == (1, 3, size, size)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_weight_loads_in_the_asked_dtype_despite_the_float16_text_config(dtype: torch.dtype) -> None:
    # blip2-opt-2.7b's config says float32 at the top and float16 inside text_config.
    assert {p.dtype for p in load_base(OPT, dtype).model.parameters()} == {dtype}


def test_a_tokenizer_without_its_own_image_token_is_refused(tmp_path: Path) -> None:
    # OPT's UNK is its EOS: an image token read as UNK would put the end token into every image position.
    folder = write_checkpoint(TWINS[OPT], tmp_path / "opt")
    processor = Blip2Processor.from_pretrained(folder)
    processor.image_token = AddedToken("<img>", special=True)
    model = Blip2ForConditionalGeneration.from_pretrained(folder)
    with pytest.raises(CaptuneError, match=r"no <img> token of its own \(id 2; unknown 2"):
        check_image_tokens(processor, model.config, str(folder))


def test_flan_t5s_gated_feed_forward_takes_the_fc1_target(t5: LoadedModel) -> None:
    from captune.config import LoraConfig
    from captune.model import apply_lora

    model = apply_lora(load_base(T5).model, LoraConfig(target_modules=["fc1"]))
    layers = {name.rsplit(".", 2)[-2] for name, _ in model.named_modules() if name.endswith(".lora_A")}
    assert layers == {"wi_0", "wi_1"}


# --- the collators end captions with the end token -------------------------------------------------------------


def _items(captions: list[str]) -> list[dict]:
    return [{"pixel_values": torch.zeros(3, 224, 224), "caption": c} for c in captions]


@pytest.mark.parametrize("prompt", ["", "a photo of"])
def test_opt_training_rows_are_the_generation_prompt_then_caption_then_newline(opt: LoadedModel, prompt: str) -> None:
    tokenizer = opt.processor.tokenizer
    collate = CaptionCollator.for_model(opt.model, opt.processor, prompt)
    batch = collate(_items(["a red square", "a  small\nblue circle "]))
    prefix = text_inputs(opt.model, opt.processor, 1, prompt)["input_ids"][0].tolist()  # what generation feeds
    for row, text in enumerate(["a red square", "a small blue circle"]):
        ids = [i for i in batch["input_ids"][row].tolist()]
        labels = [i for i in batch["labels"][row].tolist() if i != -100]
        # BPE: the caption joins the prompt as tokenizing the whole text would (a leading space after a prompt)
        whole = tokenizer((prompt + " " + text).strip()).input_ids
        assert ids[: len(prefix)] == prefix and ids[32 : len(prefix) + len(labels) - 1] == whole
        assert labels == whole[len(prefix) - 32 :] + [OPT_END]
        assert OPT_END not in labels[:-1]  # the caption's own newline became a space


def test_t5_labels_are_the_caption_then_eos(t5: LoadedModel) -> None:
    tokenizer = t5.processor.tokenizer
    batch = CaptionCollator.for_model(t5.model, t5.processor, "a photo of")(_items(["a red square"]))
    assert (
        batch["input_ids"][0].tolist() == text_inputs(t5.model, t5.processor, 1, "a photo of")["input_ids"][0].tolist()
    )
    assert [i for i in batch["labels"][0].tolist() if i != -100] == tokenizer("a red square").input_ids  # ends in 1


def test_packed_rows_end_every_caption_with_the_end_token(opt: LoadedModel) -> None:
    items = [{"pixel_values": torch.zeros(3, 224, 224), "captions": ["a red square", "a blue circle on the left"]}]
    batch = PackedCaptionCollator.for_model(opt.model, opt.processor)(items)
    labels = batch["labels"].tolist()
    assert labels.count(OPT_END) == 2 and labels[-1] == OPT_END and 2 not in labels


def test_a_caption_holding_the_end_token_is_refused(t5: LoadedModel) -> None:
    collate = CaptionCollator.for_model(t5.model, t5.processor)
    with pytest.raises(CaptuneError, match=r"caption 'a red </s> square' holds the end token '</s>' \(id 1\)"):
        collate(_items(["a red </s> square"]))


def test_generation_that_stops_nowhere_refuses_to_train_and_names_both_ids(opt: LoadedModel) -> None:
    config = opt.model.language_model.generation_config
    saved = config.eos_token_id
    try:
        config.eos_token_id = None
        with pytest.raises(CaptuneError, match=r"generation stops at no token .* ends a text with 2"):
            caption_end_id(opt.model, opt.processor.tokenizer)
        config.eos_token_id = 50290  # an embedding row beyond the tokenizer's 50,266 tokens: no text ends there
        with pytest.raises(CaptuneError, match=r"generation stops at \[50290\] .* ends a text with 2"):
            caption_end_id(opt.model, opt.processor.tokenizer)
    finally:
        config.eos_token_id = saved


def _labels_end_each_caption(batch: dict, end: int) -> None:
    """Each caption of a collated batch (packed or not, OPT or T5) ends with `end`, and nothing else is `end`."""
    labels = batch["labels"]
    captions = int(batch.get("samples", len(labels)))
    assert int((labels == end).sum()) == captions
    rows = labels[None] if labels.dim() == 1 else labels
    for row in rows:
        assert row[row != -100][-1] == end


@pytest.mark.parametrize(
    ("name", "overrides"),
    [
        (OPT, []),  # packed, cached features
        (OPT, ["train.pack_captions=false"]),
        (OPT, ["train.mode=qformer"]),  # pixels every step
        (OPT, ["train.mode=qformer", "train.pack_captions=false"]),
        (T5, []),
        (T5, ["train.pack_captions=false", "train.mode=qformer"]),
        (OLD, []),
    ],
)
def test_the_recipes_batches_end_every_caption_where_generation_stops(
    name: str, overrides: list[str], synthetic_dir: Path, tmp_path: Path
) -> None:
    config = load_config(None, [f"model.name={name}", "data.format=synthetic", f"data.data_dir={synthetic_dir}",
                                f"train.output_dir={tmp_path}", "train.batch_size=5", "train.validate=false",
                                "model.dtype=fp32", "data.num_workers=0", *overrides])  # fmt: skip
    run = setup(config)
    end = stop_token_ids(run.loaded.model)[0]
    assert end == (1 if name == T5 else OPT_END)
    assert (run.features is not None) == ("train.mode=qformer" not in overrides)
    for _, batch in zip(range(2), run.loader, strict=False):
        _labels_end_each_caption(batch, end)


# --- fine-tuned twins: every captioning path stops where training ended the captions --------------------------

GREEDY = GenerateConfig(num_beams=1, min_new_tokens=1, max_new_tokens=20, batch_size=6)


@dataclass
class Tuned:
    run_dir: Path
    model_dir: Path
    loaded: LoadedModel
    paths: list[Path]
    data_dir: Path


def _tune(name: str, root: Path) -> Tuned:
    data_dir = root / "data"
    generate_synthetic(data_dir, SMALL_SPEC)
    run_dir = root / "run"
    config = load_config(None, [f"model.name={name}", "data.format=synthetic", f"data.data_dir={data_dir}",
                                f"train.output_dir={run_dir}", "model.dtype=fp32", "data.num_workers=0",
                                "train.val_metrics=fast", "generate.num_beams=1", "generate.min_new_tokens=1",
                                "generate.max_new_tokens=20", *learning_overrides(name)])  # fmt: skip
    train(config)
    model_dir = trained_model_dir(run_dir)
    paths = [r.image_path for r in read("synthetic", data_dir).split("test")]
    return Tuned(run_dir, model_dir, load_model_dir(model_dir, device="cpu"), paths, data_dir)


@pytest.fixture(scope="module")
def tuned_opt(tmp_path_factory: pytest.TempPathFactory) -> Tuned:
    return _tune(OPT, tmp_path_factory.mktemp("opt"))


@pytest.fixture(scope="module")
def tuned_t5(tmp_path_factory: pytest.TempPathFactory) -> Tuned:
    return _tune(T5, tmp_path_factory.mktemp("t5"))


def _stopped_captions(tuned: Tuned, options: GenerateConfig = GREEDY) -> list[str]:
    """Plain `generate`'s captions of the test images, after checking that every one stopped at the end token (the
    first end token of each row is followed only by padding), before max_new_tokens."""
    model, processor = tuned.loaded.model, tuned.loaded.processor
    end = caption_end_id(model, processor.tokenizer)
    assert json.loads((tuned.model_dir / META_FILE).read_text())[END_KEY] == end
    images = [load_rgb(p) for p in tuned.paths]
    inputs = text_inputs(model, processor, len(images), "")
    pixels = processor.image_processor(images, return_tensors="pt")["pixel_values"]
    out = model.generate(**inputs, pixel_values=pixels, num_beams=options.num_beams, do_sample=False,
                         max_new_tokens=options.max_new_tokens, min_new_tokens=options.min_new_tokens)  # fmt: skip
    new = out if model.config.text_config.is_encoder_decoder else out[:, inputs["input_ids"].shape[1] :]
    for row in new.tolist():
        assert end in row, f"a caption ran to max_new_tokens without the end token {end}: {row}"
    return [" ".join(t.split()) for t in processor.batch_decode(new, skip_special_tokens=True)]


def _every_path_stops(tuned: Tuned, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model, processor = tuned.loaded.model, tuned.loaded.processor
    expected = _stopped_captions(tuned)
    assert all(expected)
    # captune's plain path, its static-cache path (its own greedy loop for OPT), and beam search both ways
    assert generate_captions(model, processor, [load_rgb(p) for p in tuned.paths], GREEDY) == expected
    static = GenerateConfig(**{**vars(GREEDY), "static_cache": True})
    assert [r.caption for r in caption_paths(model, processor, tuned.paths, static)] == expected
    beam = GenerateConfig(**{**vars(GREEDY), "num_beams": 3})
    beams = _stopped_captions(tuned, beam)
    assert [r.caption for r in caption_paths(model, processor, tuned.paths, beam)] == beams
    beam_static = GenerateConfig(**{**vars(beam), "static_cache": True})
    assert [r.caption for r in caption_paths(model, processor, tuned.paths, beam_static)] == beams
    # the CLI: caption and eval (the run's generation settings), and the validation captions of training
    assert main(["caption", *map(str, tuned.paths), "--model-dir", str(tuned.model_dir), "--format", "jsonl",
                 "--device", "cpu"]) == 0  # fmt: skip
    assert [json.loads(line)["caption"] for line in capsys.readouterr().out.splitlines()] == expected
    output = tmp_path / "eval"
    assert main(["eval", "--model-dir", str(tuned.model_dir), "--data", "synthetic", "--data-dir", str(tuned.data_dir),
                 "--output-dir", str(output), "--device", "cpu"]) == 0  # fmt: skip
    predictions = {p["image_id"]: p["caption"] for p in json.loads((output / "predictions.json").read_text())}
    assert list(predictions.values()) == expected
    # the merged model, through plain transformers and its generation_config.json
    merged = tmp_path / "merged"
    assert main(["merge", "--model-dir", str(tuned.model_dir), "--output", str(merged)]) == 0
    end = caption_end_id(model, processor.tokenizer)
    assert json.loads((merged / "generation_config.json").read_text())["eos_token_id"] == end
    plain = Blip2ForConditionalGeneration.from_pretrained(merged).eval()
    merged_processor = Blip2Processor.from_pretrained(merged)
    inputs = merged_processor(images=[load_rgb(p) for p in tuned.paths], text=[""] * len(tuned.paths),
                              return_tensors="pt")  # fmt: skip
    out = plain.generate(**inputs, generation_config=plain.generation_config)
    new = out if plain.config.text_config.is_encoder_decoder else out[:, inputs["input_ids"].shape[1] :]
    assert all(end in row for row in new.tolist())
    texts = [" ".join(t.split()) for t in merged_processor.batch_decode(new, skip_special_tokens=True)]
    assert texts == expected


def test_a_fine_tuned_opt_twin_stops_its_captions_on_every_path(
    tuned_opt: Tuned, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _every_path_stops(tuned_opt, tmp_path, capsys)


def test_a_fine_tuned_flan_t5_twin_stops_its_captions_on_every_path(
    tuned_t5: Tuned, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _every_path_stops(tuned_t5, tmp_path, capsys)


@pytest.mark.parametrize("kind", ["adapter", "merged"])
def test_the_model_cards_snippet_stops_on_the_end_token(tuned_opt: Tuned, tmp_path: Path, kind: str) -> None:
    model_dir = tuned_opt.model_dir
    if kind == "merged":
        model_dir = tmp_path / "merged"
        assert main(["merge", "--model-dir", str(tuned_opt.model_dir), "--output", str(model_dir)]) == 0
    card = (model_dir / "README.md").read_text()
    snippet = card.split("```python\n", 1)[1].split("```", 1)[0]
    code = snippet.replace("MODEL_DIR", str(model_dir)).replace("photo.jpg", str(tuned_opt.paths[0]))
    namespace: dict[str, Any] = {}
    exec(code, namespace)  # the card's own code, as a user would paste it
    end = caption_end_id(tuned_opt.loaded.model, tuned_opt.loaded.processor.tokenizer)
    assert end in namespace["out"][0].tolist()


def test_validation_in_training_captions_with_the_stop(tuned_opt: Tuned) -> None:
    val = sorted((tuned_opt.run_dir / "val").glob("step-*.json"))[-1]
    saved = json.loads(val.read_text())["predictions"]
    records = read("synthetic", tuned_opt.data_dir).split("val")
    options = GenerateConfig(**{**vars(GREEDY), "batch_size": 16})
    again = generate_captions(tuned_opt.loaded.model, tuned_opt.loaded.processor,
                              [load_rgb(r.image_path) for r in records], options)  # fmt: skip
    assert again == [saved[r.image_id] for r in records] and all(len(c.split()) < 20 for c in again)


@pytest.fixture
def server(tuned_opt: Tuned) -> Iterator[Any]:
    # (imported here: the GPU machine runs the other tests of this file without the server's packages)
    from fastapi.testclient import TestClient

    from captune.serve import ServeSettings, create_app

    with TestClient(create_app(tuned_opt.model_dir, ServeSettings(device="cpu"))) as client:
        yield client


def test_the_server_captions_a_fine_tuned_twin_with_the_stop(tuned_opt: Tuned, server: Any) -> None:
    expected = _stopped_captions(tuned_opt)
    files = [("images", (p.name, p.read_bytes(), "image/png")) for p in tuned_opt.paths[:3]]
    response = server.post("/v1/captions", files=files)
    assert response.status_code == 200, response.text
    assert [c["caption"] for c in response.json()["captions"]] == expected[:3]


def test_a_model_trained_to_end_elsewhere_than_its_generation_stops_is_refused(
    tuned_opt: Tuned, tmp_path: Path
) -> None:
    import shutil

    copy = tmp_path / "model"
    shutil.copytree(tuned_opt.model_dir, copy)
    meta = json.loads((copy / META_FILE).read_text())
    (copy / META_FILE).write_text(json.dumps(meta | {END_KEY: 2}))  # as captune trained blip2-opt before: `</s>`
    with pytest.raises(CaptuneError, match=r"trained to end captions with token 2, but .* stops at \[50118\]"):
        load_model_dir(copy, device="cpu")


def test_resuming_a_twin_run_gives_the_uninterrupted_adapter(synthetic_dir: Path, tmp_path: Path) -> None:
    def run(output: Path, *extra: str) -> dict[str, torch.Tensor]:
        config = load_config(None, [f"model.name={OPT}", "data.format=synthetic", f"data.data_dir={synthetic_dir}",
                                    f"train.output_dir={output}", "train.batch_size=10", "train.max_steps=4",
                                    "train.save_every=2", "train.validate=false", "model.dtype=fp32",
                                    "data.num_workers=0", *extra])  # fmt: skip
        train(config)
        return load_file(str(output / "final" / "adapter_model.safetensors"))

    whole = run(tmp_path / "whole")
    resumed = run(tmp_path / "whole", f"train.resume_from={tmp_path / 'whole' / 'checkpoints' / 'step-000002'}")
    assert whole.keys() == resumed.keys() and all(torch.equal(whole[k], resumed[k]) for k in whole)


# --- zero-shot: an untouched checkpoint captions as the transformers documentation's example does -------------


@pytest.mark.parametrize("name", [OPT, T5, OLD])
def test_zero_shot_captions_are_the_documented_examples(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = write_checkpoint(TWINS[name], tmp_path / name)
    images = [_image(seed) for seed in range(3)]
    paths = []
    for i, image in enumerate(images):
        paths.append(tmp_path / f"{i}.png")
        image.save(paths[-1])
    assert main(["caption", *map(str, paths), "--model-dir", str(folder), "--format", "jsonl", "--device", "cpu",
                 "--num-beams", "1", "--min-new-tokens", "0", "--max-new-tokens", "20"]) == 0  # fmt: skip
    ours = [json.loads(line)["caption"] for line in capsys.readouterr().out.splitlines()]
    # The documentation's example (the processor and model as captune loads them: old snapshots need its fixes)
    loaded = load_base(str(folder))
    documented = []
    for image in images:
        inputs = loaded.processor(images=image, return_tensors="pt")
        generated_ids = loaded.model.generate(**inputs, max_new_tokens=20)
        text = loaded.processor.batch_decode(generated_ids, skip_special_tokens=True)[0].strip()
        documented.append(" ".join(text.split()))  # captune collapses whitespace
    assert ours == documented


@pytest.mark.parametrize("name", [OPT, T5])
def test_lr_scales_and_a_trained_output_layer_on_a_twin_train_merge_and_caption_as_base_plus_adapter(
    name: str, synthetic_dir: Path, tmp_path: Path
) -> None:
    # The demos' recipe on the real vocabularies (blip2-opt's output layer is tied to its 50,272 input embeddings);
    # the parameter paths train.lr_scales matches are the checkpoints' own.
    from captune.export import merge_model_dir
    from captune.training.recipe import model_path

    keys = ["lora.modules_to_save=language_projection,language_model.lm_head",
            "train.lr_scales={language_projection: 0.5, language_model.lm_head: 2}"]  # fmt: skip
    config = load_config(None, [f"model.name={name}", "data.format=synthetic", f"data.data_dir={synthetic_dir}",
                                f"train.output_dir={tmp_path / 'run'}", "train.batch_size=10", "train.max_steps=3",
                                "train.lr=1e-2", "train.warmup_steps=0", "train.validate=false", "model.dtype=fp32",
                                "data.num_workers=0", *keys])  # fmt: skip
    run = setup(config)
    groups = {g["name"]: {model_path(n) for p in g["params"] for n, q in run.loaded.model.named_parameters()
                          if q is p} for g in run.optimizer.param_groups}  # fmt: skip
    lrs = {g["name"]: g["initial_lr"] for g in run.optimizer.param_groups}
    assert lrs == {"the rest": 1e-2, "language_projection": 5e-3, "language_model.lm_head": 2e-2}
    assert groups["language_model.lm_head"] == {"language_model.lm_head.weight"}
    assert all("lora_" in p for p in groups["the rest"])
    del run
    train(config)
    tuned = load_model_dir(tmp_path / "run" / "final", device="cpu")
    merged_dir = merge_model_dir(tmp_path / "run" / "final", tmp_path / "merged")
    merged = Blip2ForConditionalGeneration.from_pretrained(merged_dir).eval()
    base = load_base(str(tmp_path / "run" / "base-model")).model  # the run's random twin (train.seed)
    # OPT's config says the output layer is now its own; transformers' T5Config always reads True there (newer
    # releases tie T5 always), and from_pretrained keeps both weights when the file holds them apart.
    assert not merged.config.text_config.tie_word_embeddings or name == T5
    assert not torch.equal(merged.language_model.get_output_embeddings().weight,
                           base.language_model.get_output_embeddings().weight)  # fmt: skip
    assert torch.equal(merged.language_model.get_input_embeddings().weight,
                       base.language_model.get_input_embeddings().weight)  # fmt: skip
    images = [_image(seed) for seed in range(3)]
    options = GenerateConfig(num_beams=1, min_new_tokens=1, max_new_tokens=6)
    expected = generate_captions(tuned.model, tuned.processor, images, options)
    assert generate_captions(merged, Blip2Processor.from_pretrained(merged_dir), images, options) == expected
