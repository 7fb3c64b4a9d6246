"""The twin of Salesforce/blip2-itm-vit-g (captune.twins, reconstructed files: see captune/checkpoints/README.md):
its tokenizer's BERT-uncased layout and ids, its config, a clean `from_pretrained`, and captune.retrieval's
similarity and matching logits against the model's own forward on it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import Blip2Config, Blip2ForImageTextRetrieval

from captune.retrieval import (
    RetrievalModel,
    image_embeddings,
    image_side,
    load_retrieval,
    matching_logits,
    similarity,
    text_embeddings,
)
from captune.twins import RECORDED, RETRIEVAL_TWINS, TWINS, write_checkpoint

ITM = "twin-blip2-itm-vit-g"
CAPTIONS = ["A red circle on the left", "a blue square at the top", "a small green triangle", "there is a large square"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_checkpoint(RETRIEVAL_TWINS[ITM], tmp_path_factory.mktemp("itm") / ITM)


@pytest.fixture(scope="module")
def twin(folder: Path) -> RetrievalModel:
    return load_retrieval(str(folder))


def test_the_retrieval_twin_is_not_a_captioning_twin() -> None:
    # Every captioning path (load_base, the twin fixtures of test_twins.py) takes each name of TWINS.
    assert ITM not in TWINS and RETRIEVAL_TWINS == {ITM: "Salesforce/blip2-itm-vit-g"}


def test_the_tokenizer_has_bert_uncased_ids_and_dec_as_bos(twin: RetrievalModel) -> None:
    tokenizer = twin.tokenizer
    assert len(tokenizer) == 30523
    assert (tokenizer.pad_token_id, tokenizer.unk_token_id, tokenizer.cls_token_id, tokenizer.sep_token_id,
            tokenizer.mask_token_id) == (0, 100, 101, 102, 103)  # fmt: skip
    assert (tokenizer.bos_token, tokenizer.bos_token_id) == ("[DEC]", 30522)
    # bert-base-uncased's ids of these words (transformers' BLIP conversion script asserts them); lower-cased
    assert tokenizer("A Picture of THE").input_ids == [101, 1037, 3861, 1997, 1996, 102]
    ids = tokenizer(CAPTIONS[0]).input_ids
    assert ids[0] == 101 and ids[-1] == 102 and tokenizer.unk_token_id not in ids


def test_words_outside_the_vocabulary_split_into_pieces_not_unk(twin: RetrievalModel) -> None:
    assert twin.tokenizer.tokenize("Zebra 42!") == ["z", "##e", "##b", "##r", "##a", "4", "##2", "!"]


def test_the_config_is_blip2_itm_vit_gs(twin: RetrievalModel, folder: Path) -> None:
    config = twin.model.config
    assert config.architectures == ["Blip2ForImageTextRetrieval"]
    assert config.qformer_config.vocab_size == 30523 and config.qformer_config.use_qformer_text_input
    assert (config.num_query_tokens, config.image_text_hidden_size, config.image_token_index) == (32, 256, None)
    assert twin.model.embeddings.word_embeddings.num_embeddings == 30523
    processor = twin.image_processor
    assert (processor.size.height, processor.size.width, processor.resample) == (224, 224, 3)
    assert processor.image_mean == pytest.approx([0.48145466, 0.4578275, 0.40821073])  # CLIP's
    image = Image.new("RGB", (50, 40), (200, 30, 90))
    assert processor(image, return_tensors="pt").pixel_values.shape == (1, 3, 224, 224)


def test_the_full_size_config_is_vit_g_and_the_qformer_of_blip2_opt_2_7b() -> None:
    itm = Blip2Config.from_pretrained(RECORDED / "blip2-itm-vit-g")
    opt = Blip2Config.from_pretrained(RECORDED / "blip2-opt-2.7b")
    assert itm.vision_config.to_dict() == opt.vision_config.to_dict()
    assert (itm.vision_config.hidden_size, itm.vision_config.num_hidden_layers) == (1408, 39)
    text_input = ("vocab_size", "use_qformer_text_input")
    qformer = {k: v for k, v in itm.qformer_config.to_dict().items() if k not in text_input}
    assert qformer == {k: v for k, v in opt.qformer_config.to_dict().items() if k not in text_input}
    assert (itm.qformer_config.hidden_size, itm.qformer_config.num_hidden_layers) == (768, 12)


def test_blip2_for_image_text_retrieval_loads_every_weight(folder: Path) -> None:
    model, info = Blip2ForImageTextRetrieval.from_pretrained(folder, output_loading_info=True)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set() and info["mismatched_keys"] == set()
    assert float(model.query_tokens.detach().std()) > 0.01  # drawn, not transformers' zeros


def _inputs(twin: RetrievalModel) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    pixels = torch.randn(len(CAPTIONS), 3, 224, 224, generator=torch.Generator().manual_seed(1))
    text = twin.tokenizer(CAPTIONS, padding=True, return_tensors="pt")
    return pixels, {"input_ids": text.input_ids, "attention_mask": text.attention_mask}


def test_the_similarity_is_the_models_own_contrastive_logits(twin: RetrievalModel) -> None:
    pixels, text = _inputs(twin)
    with torch.no_grad():
        ours = similarity(image_embeddings(twin.model, pixels), text_embeddings(twin.model, **text))
        theirs = twin.model(pixel_values=pixels, **text, use_image_text_matching_head=False).logits_per_image
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    assert ours.shape == (4, 4) and float(ours.std()) > 0


def test_the_matching_logits_are_the_models_own(twin: RetrievalModel) -> None:
    pixels, text = _inputs(twin)
    with torch.no_grad():
        ours = matching_logits(twin.model, image_side(twin.model, pixels), **text)
        theirs = twin.model(pixel_values=pixels, **text, use_image_text_matching_head=True).logits_per_image
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    assert ours.shape == (4, 2) and float(ours[:, 1].std()) > 0


def test_sharing_each_image_s_keys_changes_neither_loss_nor_gradients_on_the_twin(twin: RetrievalModel) -> None:
    from tests.test_retrieval import check_shared_image_keys

    check_shared_image_keys(twin, twin.image_processor.size["height"])
