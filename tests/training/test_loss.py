"""The training forward on the tiny model: the caption-logits-only loss, cached image features and packed rows give
BLIP-2's own loss and the same LoRA gradients."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from captune.config_loading import load_config
from captune.data import read
from captune.model import LoadedModel, apply_lora, blip_of, build_tiny
from captune.tiny import TINY_T5
from captune.training.batches import CaptionCollator, CaptionPairs, ImageCaptions, PackedCaptionCollator
from captune.training.features import image_features
from captune.training.loss import CaptionLoss, chunked_cross_entropy, label_tokens


def _batch(loaded: LoadedModel, synthetic_dir: Path, with_pixels: bool = True) -> dict[str, torch.Tensor]:
    records = read("synthetic", synthetic_dir).split("train")[:4]
    pairs = CaptionPairs(records, loaded.processor, with_pixels=with_pixels)
    return CaptionCollator.for_model(loaded.model, loaded.processor, "a picture of")([pairs[i] for i in (0, 5, 11, 17)])


def _loss_and_grads(model: torch.nn.Module, compute: object) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad()
    loss = compute()  # type: ignore[operator]
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.item(), grads


def test_caption_logits_only_gives_blip2s_loss_and_gradients(lora: LoadedModel, synthetic_dir: Path) -> None:
    batch = _batch(lora, synthetic_dir)
    lora.model.eval()  # no dropout: both sides must compute the same function
    ours = CaptionLoss(lora.model, caption_logits_only=True).eval()
    loss, grads = _loss_and_grads(lora.model, lambda: ours(**batch))
    blip2_inputs = {k: v for k, v in batch.items() if k != "caption_start"}
    reference, reference_grads = _loss_and_grads(lora.model, lambda: lora.model(**blip2_inputs).loss)
    assert loss == pytest.approx(reference, rel=1e-6)
    assert grads.keys() == reference_grads.keys() and len(grads) > 0
    for name, grad in grads.items():
        torch.testing.assert_close(grad, reference_grads[name], rtol=1e-5, atol=1e-7, msg=name)


def test_cached_features_give_the_pixel_paths_loss_and_gradients(lora: LoadedModel, synthetic_dir: Path) -> None:
    lora.model.eval()
    records = read("synthetic", synthetic_dir).split("train")[:4]
    features = image_features(lora.model, lora.processor, [r.image_path for r in records], batch_size=3,
                              num_workers=0, device=torch.device("cpu"), keep_on=torch.device("cpu"))  # fmt: skip
    assert features.shape == (4, lora.processor.num_query_tokens, lora.model.get_input_embeddings().embedding_dim)
    with_pixels, cached = _batch(lora, synthetic_dir), _batch(lora, synthetic_dir, with_pixels=False)
    assert "pixel_values" not in cached
    rows = cached.pop("image_index")
    ours = CaptionLoss(lora.model).eval()
    loss, grads = _loss_and_grads(lora.model, lambda: ours(**cached, image_features=features[rows]))
    reference, reference_grads = _loss_and_grads(lora.model, lambda: ours(**with_pixels))
    assert loss == pytest.approx(reference, rel=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, reference_grads[name], rtol=1e-5, atol=1e-7, msg=name)


def test_train_mode_keeps_the_frozen_image_side_in_eval_mode(lora: LoadedModel) -> None:
    CaptionLoss(lora.model).train()
    blip = blip_of(lora.model)
    assert not blip.vision_model.training and not blip.qformer.training
    assert blip.language_model.training


def test_chunked_cross_entropy_equals_the_plain_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("captune.training.loss.CE_CHUNK_TOKENS", 7)  # 3 chunks, the last one short
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 11)
    hidden = torch.randn(19, 8, requires_grad=True)
    targets = torch.randint(0, 11, (19,))
    chunked = chunked_cross_entropy(hidden, targets, head)
    (grad_chunked,) = torch.autograd.grad(chunked, hidden)
    plain = F.cross_entropy(head(hidden), targets)
    (grad_plain,) = torch.autograd.grad(plain, hidden)
    torch.testing.assert_close(chunked, plain)
    torch.testing.assert_close(grad_chunked, grad_plain)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(lora: LoadedModel, synthetic_dir: Path) -> None:
    batch = _batch(lora, synthetic_dir)
    ours = CaptionLoss(lora.model).train()  # transformers checkpoints only in training mode
    torch.manual_seed(0)  # the same dropout masks in both runs: the recomputation replays the RNG state
    loss, grads = _loss_and_grads(lora.model, lambda: ours(**batch))
    lm = blip_of(lora.model).language_model
    lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert lm.is_gradient_checkpointing
    torch.manual_seed(0)
    checkpointed, checkpointed_grads = _loss_and_grads(lora.model, lambda: ours(**batch))
    assert checkpointed == pytest.approx(loss, rel=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(checkpointed_grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def _packed_and_plain(loaded: LoadedModel, synthetic_dir: Path, with_pixels: bool = True) -> tuple[dict, dict]:
    """Three images with all their captions, packed (one row per image) and plain (one row per caption)."""
    records = read("synthetic", synthetic_dir).split("train")[:3]
    pairs = CaptionPairs(records, loaded.processor, with_pixels=with_pixels)
    images = ImageCaptions(pairs)
    packed = PackedCaptionCollator.for_model(loaded.model, loaded.processor, "a picture of")(
        [images[i] for i in range(3)]
    )
    plain = CaptionCollator.for_model(loaded.model, loaded.processor, "a picture of")(
        [pairs[i] for i in range(len(pairs))]
    )
    return packed, plain


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_rows_give_the_per_caption_loss_and_gradients(
    lora: LoadedModel, synthetic_dir: Path, attention: str
) -> None:
    blip_of(lora.model).language_model.config._attn_implementation = attention
    packed, plain = _packed_and_plain(lora, synthetic_dir)
    assert len(packed["input_ids"]) == 3 and packed["samples"] == len(plain["input_ids"]) > 3
    packed.pop("samples")
    lora.model.eval()
    ours = CaptionLoss(lora.model).eval()
    loss, grads = _loss_and_grads(lora.model, lambda: ours(**packed))
    reference, reference_grads = _loss_and_grads(lora.model, lambda: ours(**plain))
    assert loss == pytest.approx(reference, rel=1e-5)
    assert len(grads) > 0
    for name, grad in grads.items():
        torch.testing.assert_close(grad, reference_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    # The packed rows hold fewer tokens: the prefix (8 image tokens + BOS + 3 prompt words) once per image.
    assert packed["input_ids"].numel() < plain["input_ids"].numel()


def test_packed_rows_with_cached_features_and_a_caption_token_count(lora: LoadedModel, synthetic_dir: Path) -> None:
    lora.model.eval()
    records = read("synthetic", synthetic_dir).split("train")[:3]
    features = image_features(lora.model, lora.processor, [r.image_path for r in records], batch_size=3,
                              num_workers=0, device=torch.device("cpu"), keep_on=torch.device("cpu"))  # fmt: skip
    packed, plain = _packed_and_plain(lora, synthetic_dir, with_pixels=False)
    packed.pop("samples")
    assert label_tokens(packed) == label_tokens(plain) == len(packed["labels"])
    ours = CaptionLoss(lora.model).eval()
    rows = packed.pop("image_index")
    count = torch.tensor(40.0)  # as DDP passes it: the summed loss over a given count
    loss = ours(**packed, image_features=features[rows], token_count=count)
    reference = ours(**{k: v for k, v in plain.items() if k != "image_index"},
                     image_features=features[plain["image_index"]], token_count=count)  # fmt: skip
    assert loss.item() == pytest.approx(reference.item(), rel=1e-5)


def test_t5_packed_batches_encode_each_image_once(synthetic_dir: Path) -> None:
    t5 = build_tiny(0, TINY_T5)
    model = apply_lora(t5.model, load_config(None, []).lora)
    torch.manual_seed(0)
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            parameter.data.normal_(0, 0.05)
    model.eval()
    packed, plain = _packed_and_plain(t5, synthetic_dir)
    packed.pop("samples")
    assert len(packed["input_ids"]) == 3 and len(packed["labels"]) == len(plain["labels"])
    ours = CaptionLoss(model).eval()
    loss, grads = _loss_and_grads(model, lambda: ours(**packed))
    reference, reference_grads = _loss_and_grads(model, lambda: ours(**plain))
    assert loss == pytest.approx(reference, rel=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, reference_grads[name], rtol=1e-4, atol=1e-6, msg=name)
