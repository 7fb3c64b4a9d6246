"""The training batches: labels of plain and packed rows, the collator's refusals, and the samplers' epoch orders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from captune.config_loading import load_config
from captune.errors import CaptuneError
from captune.model import LoadedModel, build_tiny
from captune.training.batches import (
    CaptionCollator,
    CaptionPairs,
    use_packing,
)
from captune.training.loss import IGNORE
from captune.training.sampling import EpochShuffle, LengthGroupedShuffle

from .test_loss import _packed_and_plain


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


def test_flash_attention_falls_back_to_a_row_per_caption(tiny: LoadedModel, caplog: pytest.LogCaptureFixture) -> None:
    tiny.model.language_model.config._attn_implementation = "flash_attention_2"
    with caplog.at_level("WARNING", logger="captune.training.batches"):
        assert not use_packing(load_config(None, []), tiny.model)
    assert "one row per caption instead" in caplog.text
    assert not use_packing(load_config(None, ["train.pack_captions=false"]), build_tiny(0).model)
