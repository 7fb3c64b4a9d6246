"""The training forward (captune.step) on the tiny model: the cached-feature path and the caption-logits-only loss give
BLIP-2's own loss and the same LoRA gradients; when caching applies; length-grouped batches."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from captune import step
from captune.config import load_config
from captune.data import read
from captune.errors import CaptuneError
from captune.model import TINY_T5, LoadedModel, apply_lora, build_tiny
from captune.step import CaptionLoss, chunked_cross_entropy, image_features, upstream_of_language_model_trains
from captune.train import (
    CaptionCollator,
    CaptionPairs,
    ImageCaptions,
    LengthGroupedShuffle,
    PackedCaptionCollator,
    _use_feature_cache,
    _use_packing,
)


@pytest.fixture
def lora(tiny: LoadedModel) -> LoadedModel:
    """The tiny model with the default LoRA, its LoRA B matrices made non-zero so that LoRA changes the loss."""
    tiny.model = apply_lora(tiny.model, load_config(None, []).lora)
    torch.manual_seed(0)
    for name, parameter in tiny.model.named_parameters():
        if "lora_B" in name:
            parameter.data.normal_(0, 0.05)
    return tiny


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
    blip = step.blip_of(lora.model)
    assert not blip.vision_model.training and not blip.qformer.training
    assert blip.language_model.training


def test_chunked_cross_entropy_equals_the_plain_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(step, "CE_CHUNK_TOKENS", 7)  # 3 chunks, the last one short
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


def test_features_are_cached_only_when_nothing_upstream_trains(tiny: LoadedModel) -> None:
    config = load_config(None, [])
    assert upstream_of_language_model_trains(apply_lora(tiny.model, config.lora)) == []
    assert _use_feature_cache(config, tiny.model)
    assert not _use_feature_cache(load_config(None, ["cache_image_features=off"]), tiny.model)


def test_the_run_log_says_which_path_and_why(tiny: LoadedModel, caplog: pytest.LogCaptureFixture) -> None:
    config = load_config(None, ["qformer_target_modules=query,value", "train.mode=lora-lm+qformer"])
    model = apply_lora(tiny.model, config.lora)
    with caplog.at_level("INFO", logger="captune.train"):
        assert not _use_feature_cache(config, model)
    assert "training path: full (image features recomputed every step): parameters outside the language model" in (
        caplog.text
    )


def test_cache_on_with_a_trained_qformer_is_an_error(tiny: LoadedModel) -> None:
    config = load_config(
        None, ["qformer_target_modules=query,value", "train.mode=lora-lm+qformer", "cache_image_features=on"]
    )
    model = apply_lora(tiny.model, config.lora)
    assert any(".qformer." in name for name in upstream_of_language_model_trains(model))
    assert not _use_feature_cache(
        load_config(None, ["qformer_target_modules=query,value", "train.mode=lora-lm+qformer"]), model
    )
    with pytest.raises(CaptuneError, match=r"cache_image_features=on, but parameters outside the language model"):
        _use_feature_cache(config, model)


def test_length_grouped_batches_cover_everything_once_with_little_padding() -> None:
    lengths = np.random.default_rng(0).integers(5, 80, size=1003)
    sampler = LengthGroupedShuffle(lengths, batch_size=10, seed=3)
    sampler.set_epoch(2)
    order = list(sampler)
    assert sorted(order) == list(range(1003)) and order == list(sampler)  # a permutation, the same every time
    batches = [order[i : i + 10] for i in range(0, 1003, 10)]
    assert [len(b) for b in batches[:-1]] == [10] * 100 and len(batches[-1]) == 3
    spread = np.mean([np.ptp(lengths[b]) for b in batches[:-1]])
    random_spread = np.mean([np.ptp(lengths[np.array(b)]) for b in np.array_split(np.arange(1000), 100)])
    assert spread < random_spread / 5
    sampler.set_epoch(3)
    assert list(sampler) != order


def test_length_grouped_runs_give_one_steps_processes_similar_lengths() -> None:
    # accelerate hands a step's 4 consecutive batches to 4 processes: they should come from one sorted group.
    lengths = np.random.default_rng(1).integers(5, 80, size=4003)

    def step_spread(order: list[int]) -> float:  # the mean length range over a step's 4 batches of 10
        return float(np.mean([np.ptp(lengths[np.array(order[i : i + 40])]) for i in range(0, 4000, 40)]))

    runs = list(LengthGroupedShuffle(lengths, batch_size=10, seed=3, processes=4))
    assert sorted(runs) == list(range(4003))
    alone = list(LengthGroupedShuffle(lengths, batch_size=10, seed=3))
    assert step_spread(runs) < step_spread(alone) / 5  # measured 5.8 vs 48


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(lora: LoadedModel, synthetic_dir: Path) -> None:
    batch = _batch(lora, synthetic_dir)
    ours = CaptionLoss(lora.model).train()  # transformers checkpoints only in training mode
    torch.manual_seed(0)  # the same dropout masks in both runs: the recomputation replays the RNG state
    loss, grads = _loss_and_grads(lora.model, lambda: ours(**batch))
    lm = step.blip_of(lora.model).language_model
    lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert lm.is_gradient_checkpointing
    torch.manual_seed(0)
    checkpointed, checkpointed_grads = _loss_and_grads(lora.model, lambda: ours(**batch))
    assert checkpointed == pytest.approx(loss, rel=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(checkpointed_grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)


# ------------------------------------------------------------------------------------------------ packed batches ---
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
    step.blip_of(lora.model).language_model.config._attn_implementation = attention
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
    assert step.label_tokens(packed) == step.label_tokens(plain) == len(packed["labels"])
    ours = CaptionLoss(lora.model).eval()
    rows = packed.pop("image_index")
    count = torch.tensor(40.0)  # as DDP passes it: the summed loss over a given count
    loss = ours(**packed, image_features=features[rows], token_count=count)
    reference = ours(**{k: v for k, v in plain.items() if k != "image_index"},
                     image_features=features[plain["image_index"]], token_count=count)  # fmt: skip
    assert loss.item() == pytest.approx(reference.item(), rel=1e-5)


def test_packed_row_layout(tiny: LoadedModel, synthetic_dir: Path) -> None:
    packed, _ = _packed_and_plain(tiny, synthetic_dir)
    prefix = 8 + 1 + 3  # image tokens, BOS, "a picture of"
    mask, positions, ids = packed["attention_mask"][0, 0], packed["position_ids"][0], packed["input_ids"][0]
    length = len(ids)
    eos = tiny.processor.tokenizer.eos_token_id
    ends = [i for i in range(prefix, length) if ids[i] == eos]  # each caption ends with EOS
    first = prefix
    for end in ends:
        caption = range(first, end + 1)
        assert positions[first : end + 1].tolist() == list(range(prefix, prefix + len(caption)))
        for q in caption:  # the prefix and its own earlier tokens, nothing else
            assert mask[q].nonzero().flatten().tolist() == [*range(prefix), *range(first, q + 1)]
        first = end + 1
    assert mask[:prefix, :prefix].equal(torch.ones(prefix, prefix, dtype=torch.bool).tril())
    # the first label of each caption is predicted from the prefix's last position
    assert (packed["predict_from"] == prefix - 1).sum() == len(ends)


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


def test_flash_attention_falls_back_to_a_row_per_caption(tiny: LoadedModel, caplog: pytest.LogCaptureFixture) -> None:
    tiny.model.language_model.config._attn_implementation = "flash_attention_2"
    with caplog.at_level("WARNING", logger="captune.train"):
        assert not _use_packing(load_config(None, []), tiny.model)
    assert "one row per caption instead" in caplog.text
    assert not _use_packing(load_config(None, ["train.pack_captions=false"]), build_tiny(0).model)


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
    real_loader = step.DataLoader
    monkeypatch.setattr(step, "DataLoader", lambda *a, **k: shares.append(k["batch_size"]) or real_loader(*a, **k))
    blip = step.blip_of(lora.model)
    real = blip.get_image_features
    monkeypatch.setattr(blip, "get_image_features", lambda **k: seen.append(len(k["pixel_values"])) or real(**k))
    workers = image_features(lora.model, lora.processor, paths, batch_size=3, num_workers=2, device=cpu, keep_on=cpu,
                             progress=False)  # fmt: skip
    assert shares == [2] and seen == [3, 3, 1]
    torch.testing.assert_close(workers, serial, rtol=0, atol=0)
