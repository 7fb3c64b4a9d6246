"""The retrieval model's embeddings and losses (captune.retrieval): the similarity the model's own forward gives, the
contrastive loss against a direct computation with several captions of one image, hard negatives never of the same
image, the matching head's logits as the model's forward computes them, and gradients reaching the Q-Former."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from captune.errors import CaptuneError
from captune.retrieval import (
    RetrievalModel,
    Temperature,
    build_tiny_retrieval,
    contrastive_loss,
    hard_negatives,
    image_embeddings,
    image_side,
    matching_logits,
    matching_loss,
    similarity,
    text_embeddings,
)

CAPTIONS = ["a red circle on the left", "a blue square at the top", "a small green triangle", "a large yellow square"]


@pytest.fixture(scope="module")
def tiny() -> RetrievalModel:
    return build_tiny_retrieval(0)


def _inputs(tiny: RetrievalModel, captions: list[str] = CAPTIONS) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    pixels = torch.randn(len(captions), 3, 32, 32, generator=torch.Generator().manual_seed(1))
    text = tiny.tokenizer(captions, padding=True, return_tensors="pt")
    return pixels, {"input_ids": text.input_ids, "attention_mask": text.attention_mask}


def test_the_tokenizer_keeps_blip2_itm_s_layout(tiny: RetrievalModel) -> None:
    tokenizer = tiny.tokenizer
    ids = tokenizer("a red circle").input_ids
    assert ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id and tokenizer.pad_token_id == 0
    assert tokenizer.bos_token == "[DEC]" and tokenizer.bos_token_id == len(tokenizer) - 1
    assert tiny.model.config.qformer_config.vocab_size == len(tokenizer)


def test_the_similarity_is_the_models_own_contrastive_logits(tiny: RetrievalModel) -> None:
    pixels, text = _inputs(tiny)
    with torch.no_grad():
        ours = similarity(image_embeddings(tiny.model, pixels), text_embeddings(tiny.model, **text))
        theirs = tiny.model(pixel_values=pixels, **text, use_image_text_matching_head=False).logits_per_image
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    assert ours.shape == (4, 4) and float(ours.std()) > 0  # the random queries differ


def test_the_matching_logits_are_the_models_own(tiny: RetrievalModel) -> None:
    pixels, text = _inputs(tiny)
    with torch.no_grad():
        ours = matching_logits(tiny.model, image_side(tiny.model, pixels), **text)
        theirs = tiny.model(pixel_values=pixels, **text, use_image_text_matching_head=True).logits_per_image
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_the_contrastive_loss_counts_every_caption_of_an_image_as_a_positive() -> None:
    generator = torch.Generator().manual_seed(0)
    images = F.normalize(torch.randn(5, 3, 8, generator=generator), dim=-1)
    texts = F.normalize(torch.randn(5, 8, generator=generator), dim=-1)
    ids = torch.tensor([0, 0, 1, 2, 2])  # pairs 0 and 1 (3 and 4) show one image
    temperature = torch.tensor(0.1)
    loss, local = contrastive_loss(images, texts, ids, temperature)
    # Directly: the max over queries of each image-text cosine, soft targets spread over the same image's pairs.
    sims = torch.tensor([[max(float(images[i, q] @ texts[t]) for q in range(3)) for t in range(5)] for i in range(5)])
    positives = (ids[:, None] == ids[None, :]).float()
    targets = positives / positives.sum(1, keepdim=True)
    i2t = -(F.log_softmax(sims / 0.1, 1) * targets).sum(1).mean()
    t2i = -(F.log_softmax(sims.t() / 0.1, 1) * targets).sum(1).mean()
    assert loss.item() == pytest.approx(((i2t + t2i) / 2).item(), rel=1e-5)
    torch.testing.assert_close(local, sims / 0.1, rtol=1e-5, atol=1e-5)


def test_the_temperature_learns_within_lavis_s_clamp() -> None:
    temperature = Temperature()
    assert temperature().item() == pytest.approx(0.07)
    with torch.no_grad():
        temperature.value.fill_(5.0)
    assert temperature().item() == pytest.approx(0.5)


def test_hard_negatives_are_never_of_the_same_image() -> None:
    ids = torch.tensor([0, 0, 1, 2, 2, 3])
    same = ids[:, None] == ids[None, :]
    scores = torch.zeros(6, 6) + 10 * same.float()  # the same image's pairs would be the likeliest
    generator = torch.Generator().manual_seed(0)
    for _ in range(50):
        picked = hard_negatives(scores, same, generator)
        assert not bool(same[torch.arange(6), picked].any())
    with pytest.raises(CaptuneError, match="at least two images"):
        hard_negatives(torch.zeros(2, 2), torch.ones(2, 2, dtype=torch.bool), generator)


def test_both_losses_reach_the_q_former_projections_and_temperature(tiny: RetrievalModel) -> None:
    pixels, text = _inputs(tiny)
    ids = torch.arange(4)
    tiny.model.zero_grad()
    temperature = Temperature()
    contrastive, local = contrastive_loss(image_embeddings(tiny.model, pixels), text_embeddings(tiny.model, **text),
                                          ids, temperature())  # fmt: skip
    matching = matching_loss(tiny.model, image_side(tiny.model, pixels), text["input_ids"], text["attention_mask"],
                             ids, local, torch.Generator().manual_seed(0))  # fmt: skip
    (contrastive + matching).backward()
    grads = {n: p.grad for n, p in tiny.model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    for name in ("vision_projection.weight", "text_projection.weight", "itm_head.weight", "query_tokens"):
        assert name in grads, name
    assert any(n.startswith("qformer.") for n in grads) and temperature.value.grad is not None
    assert matching.item() > 0 and contrastive.item() > 0


def _rank_contrastive(rank: int, world: int, store: str, out: str) -> None:
    """One process of two: its half of the batch, negatives gathered from both (the spawned target)."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    images, texts, ids = _global_batch()
    half = slice(rank * 3, rank * 3 + 3)
    local_images, local_texts = images[half].clone().requires_grad_(), texts[half].clone().requires_grad_()
    loss, _ = contrastive_loss(local_images, local_texts, ids[half], torch.tensor(0.1))
    loss.backward()
    torch.save({"loss": loss.detach(), "images": local_images.grad, "texts": local_texts.grad}, f"{out}.{rank}")
    torch.distributed.destroy_process_group()


def _global_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    images = F.normalize(torch.randn(6, 3, 8, generator=generator), dim=-1)
    texts = F.normalize(torch.randn(6, 8, generator=generator), dim=-1)
    return images, texts, torch.tensor([0, 1, 1, 2, 3, 3])  # image 1 spans both processes' halves


def test_two_processes_give_the_loss_and_gradients_of_one_on_the_whole_batch(tmp_path: object) -> None:
    from pathlib import Path

    import torch.multiprocessing as mp

    folder = Path(str(tmp_path))
    mp.spawn(_rank_contrastive, args=(2, str(folder / "store"), str(folder / "rank")), nprocs=2, join=True)
    images, texts, ids = _global_batch()
    images.requires_grad_()
    texts.requires_grad_()
    whole, _ = contrastive_loss(images, texts, ids, torch.tensor(0.1))
    whole.backward()
    ranks = [torch.load(folder / f"rank.{r}") for r in range(2)]
    # The global loss is the mean of the processes' (equal halves); DDP averages their gradients the same way.
    assert whole.item() == pytest.approx((ranks[0]["loss"].item() + ranks[1]["loss"].item()) / 2, rel=1e-6)
    assert images.grad is not None and texts.grad is not None
    for r in range(2):
        torch.testing.assert_close(ranks[r]["images"] / 2, images.grad[r * 3 : r * 3 + 3], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(ranks[r]["texts"] / 2, texts.grad[r * 3 : r * 3 + 3], rtol=1e-5, atol=1e-7)


def test_evaluation_scores_every_pair_as_the_model_does_and_reranks_its_top_k(
    tiny: RetrievalModel, synthetic_dir: object
) -> None:
    from pathlib import Path

    from captune.data import read
    from captune.data.images import processed_pixels
    from captune.retrieval import evaluate_retrieval
    from captune.retrieval_metrics import rerank, retrieval_recall

    records = read("synthetic", Path(str(synthetic_dir))).split("test")  # 6 images, 30 captions
    result = evaluate_retrieval(tiny, records, batch_size=4, k_test=3)
    pixels = torch.stack([processed_pixels(r.image_path, tiny.image_processor) for r in records])
    texts = [c for r in records for c in r.captions]
    tokens = tiny.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        direct = tiny.model(pixel_values=pixels, input_ids=tokens.input_ids, attention_mask=tokens.attention_mask,
                            use_image_text_matching_head=False).logits_per_image  # fmt: skip
    torch.testing.assert_close(result.scores, direct, rtol=1e-5, atol=1e-6)
    assert result.text_image == [i for i in range(6) for _ in range(5)]
    assert result.contrastive == retrieval_recall(direct, result.text_image)

    def matching(image_index: torch.Tensor, text_index: torch.Tensor) -> torch.Tensor:  # the model's own ITM forward
        with torch.no_grad():
            logits = tiny.model(pixel_values=pixels[image_index], input_ids=tokens.input_ids[text_index],
                                attention_mask=tokens.attention_mask[text_index],
                                use_image_text_matching_head=True).logits_per_image  # fmt: skip
        return logits.softmax(dim=-1)[:, 1]

    expected = rerank(direct, matching, 3)
    assert result.reranked is not None
    reranked = retrieval_recall(expected.i2t, result.text_image, scores_t2i=expected.t2i)
    for ours, theirs in zip(result.reranked.as_dict().values(), reranked.as_dict().values(), strict=True):
        assert ours == pytest.approx(theirs)
    assert evaluate_retrieval(tiny, records, k_test=None).reranked is None


def check_shared_image_keys(loaded: RetrievalModel, image_size: int) -> None:
    """`RetrievalLoss` with each image's cross-attention keys and values shared (the default) gives the loss and
    gradients of projecting them for every row, and saves exactly the matching rows' projections: 3 x pairs rows of
    every cross-attention key and value layer, forward."""
    from torch.utils.flop_counter import FlopCounterMode

    from captune.retrieval import RetrievalLoss, with_temperature

    model = with_temperature(loaded.model) if not hasattr(loaded.model, "temperature") else loaded.model
    model.train()  # dropout on: both runs draw the same masks from the same seed
    text = loaded.tokenizer(CAPTIONS * 2, padding=True, return_tensors="pt")
    pixels = torch.randn(4, 3, image_size, image_size, generator=torch.Generator().manual_seed(2))
    ids = torch.tensor([0, 1, 2, 3, 1, 0, 3, 2])
    with torch.no_grad():
        vision = image_side(model, pixels)[ids]
    runs = []
    for share in (True, False):
        model.zero_grad()
        torch.manual_seed(5)
        with FlopCounterMode(display=False) as flops:
            loss = RetrievalLoss(model, share_image_keys=share)(text.input_ids, text.attention_mask, ids,
                                                                image_features=vision, two_images=True)  # fmt: skip
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        runs.append((loss.detach(), grads, flops.get_total_flops()))
    (shared_loss, shared_grads, shared_flops), (loss, grads, plain_flops) = runs
    torch.testing.assert_close(shared_loss, loss)
    assert shared_grads.keys() == grads.keys() and any("crossattention.attention.key" in n for n in grads)
    for name, grad in grads.items():
        torch.testing.assert_close(shared_grads[name], grad, msg=name)
    q = model.config.qformer_config
    layers = sum(1 for layer in model.qformer.encoder.layer if layer.has_cross_attention)
    patches, width = vision.shape[1:]
    saved = 2 * layers * (3 * len(ids)) * patches * width * q.hidden_size * 2  # K and V, multiply-adds x 2
    assert plain_flops - shared_flops == saved
    model.zero_grad()


def test_sharing_each_image_s_keys_changes_neither_loss_nor_gradients(tiny: RetrievalModel) -> None:
    check_shared_image_keys(tiny, 32)
