"""BLIP-2 with a T5 language model (as Salesforce/blip2-flan-t5-xl), on the built-in `tiny-t5`: labels for the
decoder, LoRA on T5's attention, the loss, and train / eval / caption / merge through the same commands."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json
from pathlib import Path

import pytest
import torch

from captune import metrics
from captune.cli import main
from captune.config_loading import load_config
from captune.data import read
from captune.export import merge_model_dir
from captune.generation.files import caption_paths
from captune.model import LoadedModel, apply_lora, build_tiny
from captune.model_dir import load_model_dir
from captune.tiny import TINY_T5
from captune.training.batches import CaptionCollator, CaptionPairs
from captune.training.features import image_features
from captune.training.loss import IGNORE, CaptionLoss


@pytest.fixture
def t5() -> LoadedModel:
    return build_tiny(0, TINY_T5)


def test_tiny_t5_is_an_encoder_decoder_blip2(t5: LoadedModel) -> None:
    assert not t5.model.config.use_decoder_only_language_model
    assert t5.model.language_model.config.model_type == "t5"


def test_encoder_reads_image_tokens_and_prompt_and_the_decoder_learns_the_caption(
    t5: LoadedModel, synthetic_dir: Path
) -> None:
    tokenizer = t5.processor.tokenizer
    records = read("synthetic", synthetic_dir).split("train")[:2]
    items = [CaptionPairs(records, t5.processor)[i] for i in (0, 5)]
    batch = CaptionCollator.for_model(t5.model, t5.processor, "a picture of")(items)
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    prefix = [image_id] * 8 + tokenizer("a picture of").input_ids
    assert batch["input_ids"].tolist() == [prefix, prefix] and bool(batch["attention_mask"].all())
    assert batch["caption_start"] == 0  # the labels are the caption from their first column on
    for row, item in enumerate(items):
        caption = tokenizer(item["caption"], add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        labels = batch["labels"][row].tolist()
        assert labels[: len(caption)] == caption and set(labels[len(caption) :]) <= {IGNORE}
        assert image_id not in labels


def test_default_lora_targets_map_to_t5_attention(t5: LoadedModel) -> None:
    model = apply_lora(t5.model, load_config(None, []).lora)  # q_proj/v_proj, OPT's names
    adapted = {name.split(".lora_A")[0] for name, _ in model.named_parameters() if "lora_A" in name}
    assert adapted and all(".language_model." in f".{n}" for n in adapted)
    assert {n.rsplit(".", 1)[-1] for n in adapted} == {"q", "v"}


def test_caption_loss_is_the_models_own(t5: LoadedModel, synthetic_dir: Path) -> None:
    records = read("synthetic", synthetic_dir).split("train")[:2]
    batch = CaptionCollator.for_model(t5.model, t5.processor)([CaptionPairs(records, t5.processor)[i] for i in (0, 5)])
    plain = {k: v for k, v in batch.items() if k != "caption_start"}
    with torch.no_grad():
        assert CaptionLoss(t5.model).eval()(**batch).item() == pytest.approx(t5.model(**plain).loss.item())


def test_cached_features_give_the_pixel_paths_loss_and_gradients(t5: LoadedModel, synthetic_dir: Path) -> None:
    model = apply_lora(t5.model, load_config(None, []).lora)
    torch.manual_seed(0)
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            parameter.data.normal_(0, 0.05)  # LoRA must change the loss for equal gradients to mean anything
    model.eval()
    records = read("synthetic", synthetic_dir).split("train")[:2]
    features = image_features(model, t5.processor, [r.image_path for r in records], batch_size=2, num_workers=0,
                              device=torch.device("cpu"), keep_on=torch.device("cpu"))  # fmt: skip
    collate = CaptionCollator.for_model(t5.model, t5.processor, "a picture of")
    with_pixels = collate([CaptionPairs(records, t5.processor)[i] for i in (0, 5)])
    cached = collate([CaptionPairs(records, t5.processor, with_pixels=False)[i] for i in (0, 5)])
    rows = cached.pop("image_index")
    ours = CaptionLoss(model).eval()
    results = []
    for compute in (lambda: ours(**cached, image_features=features[rows]), lambda: ours(**with_pixels)):
        model.zero_grad()
        loss = compute()
        loss.backward()
        results.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    (loss, grads), (reference, reference_grads) = results
    assert loss == pytest.approx(reference, rel=1e-6) and grads
    for name, grad in grads.items():
        torch.testing.assert_close(grad, reference_grads[name], rtol=1e-5, atol=1e-7, msg=name)
    # Divided by a token count (what DDP passes: the mean over processes), the loss is the summed loss over it.
    count = (cached["labels"] != IGNORE).sum()
    with torch.no_grad():
        scaled = ours(**cached, image_features=features[rows], token_count=count * 2).item()
    assert scaled == pytest.approx(loss / 2, rel=1e-6)


def test_train_eval_caption_and_merge_end_to_end(
    synthetic_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(metrics, "_SPICE_LIB", tmp_path / "no-spice")
    run = tmp_path / "run"
    fast = ["max_steps=20", "train.batch_size=8", "warmup_steps=0", "lr=3e-3", "log_every=5", "generate.num_beams=1",
            "generate.min_new_tokens=1", "generate.max_new_tokens=6", "val_max_images=4"]  # fmt: skip
    assert main(["train", f"model={TINY_T5}", "data=synthetic", f"data_dir={synthetic_dir}", f"output_dir={run}",
                 *fast]) == 0  # fmt: skip
    results = json.loads((run / "results.json").read_text())
    assert results["total_steps"] == 20 and results["image_features_cached"] is True  # LoRA on the T5 only
    losses = [json.loads(line)["loss"] for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert losses[-1] < losses[0]
    out = tmp_path / "eval"
    args = ["--data", "synthetic", "--data-dir", str(synthetic_dir), "--split", "test", "--output-dir", str(out)]
    assert main(["eval", "--model-dir", str(run / "best"), *args, "--workers", "0"]) == 0
    assert set(json.loads((out / "metrics.json").read_text())) >= {"Bleu_4", "METEOR", "CIDEr"}
    merged = merge_model_dir(run / "best", tmp_path / "merged")
    images = [r.image_path for r in read("synthetic", synthetic_dir).split("test")[:4]]
    adapter, standalone = load_model_dir(str(run / "best")), load_model_dir(str(merged))
    options = load_config(None, fast).generate
    assert [r.caption for r in caption_paths(adapter.model, adapter.processor, images, options)] == [
        r.caption for r in caption_paths(standalone.model, standalone.processor, images, options)
    ]
