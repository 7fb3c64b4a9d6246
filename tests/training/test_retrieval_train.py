"""Retrieval training (`task: retrieval`): the batch the collator makes, the training forward against the losses
computed by hand, the cached vision-encoder outputs giving the full path's loss, a resume bit for bit, the saved
model directory loaded back for evaluation and by `captune eval --task retrieval`, validation by recall keeping
best/, and the config checks that refuse what cannot run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from captune.cli import main
from captune.config import Config
from captune.config_loading import load_config
from captune.data import ReadOptions, read
from captune.errors import CaptuneError
from captune.model import LoadedModel, apply_train_mode, load_base
from captune.model_dir import read_weights
from captune.retrieval import (
    RetrievalLoss,
    contrastive_loss,
    evaluate_retrieval,
    image_embeddings,
    image_side,
    load_retrieval,
    matching_loss,
    text_embeddings,
)
from captune.training import recipe
from captune.training.batches import CaptionPairs, RetrievalCollator


def _config(data_dir: Path, output_dir: Path, *overrides: str) -> Config:
    """A fast CPU run on the small synthetic set: 24 train images, 120 pairs, batch 12 -> 10 steps an epoch."""
    return load_config(None, ["task=retrieval", "model.name=tiny-retrieval", "train.mode=qformer", "model.dtype=fp32",
                              "data.format=synthetic", f"data.data_dir={data_dir}", f"train.output_dir={output_dir}",
                              "train.batch_size=12", "train.lr=1e-3", "train.warmup_steps=2", "train.validate=false",
                              *overrides])  # fmt: skip


@pytest.fixture
def retrieval() -> LoadedModel:
    loaded = load_base("tiny-retrieval")
    loaded.model = apply_train_mode(loaded.model, _config(Path("."), Path(".")))
    return loaded


def _batch(loaded: LoadedModel, synthetic_dir: Path, pairs: int = 8) -> dict[str, torch.Tensor]:
    records = read("synthetic", synthetic_dir, ReadOptions()).split("train")[:3]
    rows = CaptionPairs(records, loaded.processor)
    rows.image_ids = True
    return RetrievalCollator(loaded.processor.tokenizer, 40)([rows[i] for i in range(pairs)])


def test_the_collator_gives_bert_layout_tokens_and_each_pairs_image(
    retrieval: LoadedModel, synthetic_dir: Path
) -> None:
    batch = _batch(retrieval, synthetic_dir)
    tokenizer = retrieval.processor.tokenizer
    assert (batch["input_ids"][:, 0] == tokenizer.cls_token_id).all()
    assert batch["image_ids"].tolist() == [0, 0, 0, 0, 0, 1, 1, 1]  # five captions an image, in order
    assert batch["two_images"] is True and _batch(retrieval, synthetic_dir, pairs=5)["two_images"] is False
    assert batch["pixel_values"].shape == (8, 3, 32, 32)
    assert ((batch["input_ids"] == tokenizer.sep_token_id).sum(dim=1) == 1).all()


def test_the_training_forward_is_the_contrastive_plus_the_matching_loss(
    retrieval: LoadedModel, synthetic_dir: Path
) -> None:
    batch = _batch(retrieval, synthetic_dir)
    model = retrieval.model.eval()  # no dropout: the two computations must meet
    torch.manual_seed(3)
    loss = RetrievalLoss(model)(**batch)
    torch.manual_seed(3)
    images = image_embeddings(model, batch["pixel_values"])
    texts = text_embeddings(model, batch["input_ids"], batch["attention_mask"])
    contrastive, local = contrastive_loss(images, texts, batch["image_ids"], model.temperature())
    matching = matching_loss(model, image_side(model, batch["pixel_values"]), batch["input_ids"],
                             batch["attention_mask"], batch["image_ids"], local)  # fmt: skip
    assert loss.item() == pytest.approx((contrastive + matching).item(), rel=1e-6)


def test_cached_vision_outputs_give_the_loss_of_pixels(retrieval: LoadedModel, synthetic_dir: Path) -> None:
    batch = _batch(retrieval, synthetic_dir)
    model = retrieval.model.eval()
    torch.manual_seed(0)
    from_pixels = RetrievalLoss(model)(**batch)
    features = image_side(model, batch.pop("pixel_values")).detach()
    torch.manual_seed(0)
    assert RetrievalLoss(model)(**batch, image_features=features).item() == pytest.approx(from_pixels.item())


def test_a_batch_of_one_image_trains_every_parameter_without_matching_negatives(
    retrieval: LoadedModel, synthetic_dir: Path
) -> None:
    batch = _batch(retrieval, synthetic_dir, pairs=3)  # the first image's captions only: no negative to match
    RetrievalLoss(retrieval.model)(**batch).backward()
    missing = [n for n, p in retrieval.model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing  # DDP needs every trainable parameter in the graph


def test_the_qformer_mode_trains_the_retrieval_heads_and_temperature_not_the_vit(retrieval: LoadedModel) -> None:
    trained = {n.split(".")[0] for n, p in retrieval.model.named_parameters() if p.requires_grad}
    assert trained == {"qformer", "query_tokens", "embeddings", "vision_projection", "text_projection", "itm_head",
                       "temperature"}  # fmt: skip


def test_the_vit_mode_trains_the_vision_encoder_too_from_pixels(synthetic_dir: Path, tmp_path: Path) -> None:
    recipe.train(_config(synthetic_dir, tmp_path / "run", "train.mode=vit+qformer", "train.max_steps=3"))
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert not results["image_features_cached"]  # the vision encoder trains: no cached outputs
    trained = read_weights(tmp_path / "run" / "final" / "trained.safetensors")
    base = dict(load_base(str(tmp_path / "run" / "base-model")).model.named_parameters())
    vit = [name for name in trained if name.startswith("vision_model.")]
    assert vit and any(not torch.equal(trained[name], base[name]) for name in vit)


@pytest.mark.parametrize("name", ["tiny-retrieval", "twin-blip2-itm-vit-g"])
def test_a_run_validates_saves_and_is_evaluated_from_its_model_directory(
    synthetic_dir: Path, tmp_path: Path, name: str
) -> None:
    config = _config(synthetic_dir, tmp_path / "run", f"model.name={name}", "train.epochs=2", "train.validate=true",
                     "train.val_k_test=4")  # fmt: skip
    state = recipe.train(config)
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["image_features_cached"] and state.best_step is not None
    assert results["best_r_mean"] == max(h["metrics"]["r_mean"] for h in results["history"])
    best = tmp_path / "run" / "best"
    assert {"trained.safetensors", "captune.json", "README.md", "tokenizer.json"} <= {p.name for p in best.iterdir()}
    assert "temperature.value" in read_weights(best / "trained.safetensors")
    assert "r_mean" in json.loads((best / "metrics.json").read_text())
    assert (tmp_path / "run" / "report.html").is_file()
    if name.startswith("twin-"):  # the real checkpoint's Q-Former tokenizer: BERT's ids and [DEC] as BOS
        tokenizer = load_retrieval(str(best)).tokenizer
        assert (tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.bos_token_id) == (101, 102, 30522)

    # The directory loads back as the model validation scored: the same recall on the val images.
    loaded = load_retrieval(str(best))
    records = read("synthetic", synthetic_dir, ReadOptions()).split("val")
    again = evaluate_retrieval(loaded, records, k_test=4).reranked
    assert again is not None
    assert again.r_mean == pytest.approx(results["best_r_mean"])
    code = main(["eval", "--task", "retrieval", "--model-dir", str(best), "--data", "synthetic", "--data-dir",
                 str(synthetic_dir), "--split", "val", "--k-test", "4",
                 "--output-dir", str(tmp_path / "eval")])  # fmt: skip
    assert code == 0
    printed = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert printed["reranked"]["r_mean"] == pytest.approx(again.r_mean)


def test_a_resume_gives_the_uninterrupted_run_bit_for_bit(synthetic_dir: Path, tmp_path: Path) -> None:
    recipe.train(_config(synthetic_dir, tmp_path / "full", "train.max_steps=8"))
    recipe.train(_config(synthetic_dir, tmp_path / "part", "train.max_steps=8", "train.save_every=3"))
    checkpoint = tmp_path / "part" / "checkpoints" / "step-000006"
    assert checkpoint.is_dir()
    recipe.train(_config(synthetic_dir, tmp_path / "resumed", "train.max_steps=8",
                         f"train.resume_from={checkpoint}"))  # fmt: skip
    expected = read_weights(tmp_path / "full" / "final" / "trained.safetensors")
    actual = read_weights(tmp_path / "resumed" / "final" / "trained.safetensors")
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.equal(expected[name], actual[name]), name


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.mode=lora-lm"], "has no language model for LoRA"),
        (["data.format=vqav2"], "is a VQA layout"),
        (["train.val_k_test=-1"], "train.val_k_test must be >= 0"),
    ],
)
def test_the_config_refuses_what_a_retrieval_run_cannot_do(
    synthetic_dir: Path, tmp_path: Path, overrides: list[str], message: str
) -> None:
    with pytest.raises(CaptuneError, match=message):
        recipe.train(_config(synthetic_dir, tmp_path, *overrides))


def test_a_captioning_model_is_refused_for_retrieval_and_back(synthetic_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(CaptuneError, match="is a captioning BLIP-2"):
        recipe.train(_config(synthetic_dir, tmp_path / "a", "model.name=tiny"))
    with pytest.raises(CaptuneError, match="is a retrieval BLIP-2"):
        recipe.train(_config(synthetic_dir, tmp_path / "b", "task=caption", "train.mode=qformer"))
