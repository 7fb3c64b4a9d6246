"""Image-text retrieval with BLIP-2's Q-Former (`Blip2ForImageTextRetrieval`, the stage-1 model: ViT + Q-Former, no
language model): image and text embeddings, their similarity, and the two training losses transformers does not
have, image-text contrastive (ITC) and image-text matching (ITM) on hard negatives, as the BLIP-2 paper and LAVIS's
`blip2_qformer.py` compute them.

An image's embedding is its 32 query outputs projected to `image_text_hidden_size` (256) and L2-normalised; a text's
is its `[CLS]` output projected and normalised; their similarity is the best of the 32 query-text cosines (what the
model's own forward returns as `logits_per_image` without the matching head). The contrastive loss divides the
similarities by a learnable temperature (LAVIS: initialised at 0.07, clamped to [0.001, 0.5]); every caption of the
same image counts as a positive (LAVIS's `image_ids` targets), and under several processes the embeddings of every
process are gathered, so the negatives are the global batch and the gradients flow back to each process's own.
The matching loss takes, for each image, one negative caption sampled in proportion to its contrastive similarity
(the same image's captions excluded), and for each caption one negative image alike; the matching head scores the
positive pairs and both sets of negatives, two-way cross-entropy.

The tiny retrieval model (`build_tiny_retrieval`) is the real architecture at hidden sizes 32, with a word-level
BERT-like tokenizer built here whose last id is `[DEC]`, as blip2-itm-vit-g's Q-Former vocabulary (30,522 BERT ids +
`[DEC]` = 30522) ends.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from torch import nn
from transformers import (
    Blip2Config,
    Blip2ForImageTextRetrieval,
    BlipImageProcessorPil,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from captune.data import Record
from captune.data.images import processed_pixels
from captune.errors import CaptuneError
from captune.retrieval_metrics import RetrievalRecall, rerank, retrieval_recall
from captune.tiny import INIT_STD, TINY_WORDS, draw_tiny_inputs
from captune.twins import RETRIEVAL_TWINS

TEMPERATURE_INIT = 0.07
TEMPERATURE_RANGE = (0.001, 0.5)
"""LAVIS's `temp` (`blip2_qformer.py`): initial value and the clamp applied at every step."""


class Temperature(nn.Module):
    """The contrastive loss's learnable temperature, clamped to `TEMPERATURE_RANGE` where it is read."""

    def __init__(self, value: float = TEMPERATURE_INIT) -> None:
        super().__init__()
        self.value = nn.Parameter(torch.tensor(float(value)))

    def forward(self) -> torch.Tensor:
        return self.value.clamp(*TEMPERATURE_RANGE)


def image_embeddings(model: Blip2ForImageTextRetrieval, pixel_values: torch.Tensor) -> torch.Tensor:
    """(images, queries, dim): each image's query outputs, projected and L2-normalised."""
    return _image_embeddings_from(model, image_side(model, pixel_values))


def image_side(model: Blip2ForImageTextRetrieval, pixel_values: torch.Tensor) -> torch.Tensor:
    """(images, patches + 1, width): the vision encoder's output, which the matching head's Q-Former pass reads."""
    return model.vision_model(pixel_values=pixel_values).last_hidden_state


def text_embeddings(
    model: Blip2ForImageTextRetrieval, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """(texts, dim): each text's first ([CLS]) output of the Q-Former's text pass, projected and L2-normalised."""
    embeds = model.embeddings(input_ids=input_ids)
    out = model.qformer(query_embeds=embeds, query_length=0, attention_mask=attention_mask)
    first = out.last_hidden_state[:, 0, :].to(model.text_projection.weight.dtype)
    return F.normalize(model.text_projection(first), dim=-1)


def similarity(images: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
    """(images, texts): the best of each image's query-text cosines, as the model's `logits_per_image`."""
    return torch.einsum("iqd,td->iqt", images, texts).amax(dim=1)


def matching_logits(
    model: Blip2ForImageTextRetrieval,
    vision: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
) -> torch.Tensor:
    """(pairs, 2): the matching head's logits (no match, match) for pair k = (vision[k], text k), the mean over the
    query outputs of the Q-Former's joint pass, as the model's forward with `use_image_text_matching_head`."""
    queries = model.query_tokens.expand(vision.shape[0], -1, -1)
    embeds = model.embeddings(input_ids=input_ids, query_embeds=queries)
    query_mask = torch.ones(queries.shape[:-1], dtype=attention_mask.dtype, device=attention_mask.device)
    image_mask = torch.ones(vision.shape[:-1], dtype=torch.long, device=vision.device)
    out = model.qformer(query_embeds=embeds, query_length=queries.shape[1],
                        attention_mask=torch.cat([query_mask, attention_mask], dim=1),
                        encoder_hidden_states=vision, encoder_attention_mask=image_mask)  # fmt: skip
    hidden = out.last_hidden_state[:, : queries.shape[1], :].to(model.itm_head.weight.dtype)
    return model.itm_head(hidden).mean(dim=1)


def gathered(tensor: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Every process's rows, in rank order, and where this process's rows start; the gradient of the result flows
    back to the local rows, summed over the processes that used them (`all_gather_tensor_autograd`, whose backward
    is a reduce-scatter; `torch.distributed.nn.all_gather` gave only the local loss's share, tested). Every process
    must hold as many rows (accelerate's `even_batches`). One process: itself."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return tensor, 0
    from torch.distributed._functional_collectives import all_gather_tensor_autograd

    world = torch.distributed.group.WORLD
    assert world is not None
    every = all_gather_tensor_autograd(tensor.contiguous(), gather_dim=0, group=world)
    return every, torch.distributed.get_rank() * len(tensor)


def contrastive_loss(
    images: torch.Tensor, texts: torch.Tensor, image_ids: torch.Tensor, temperature: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """ITC over the global batch: (loss, the local images x local texts similarities over the temperature,
    detached, from which the matching loss samples its negatives).

    `images` (local images, queries, dim) and `texts` (local texts, dim) are row k = pair k; `image_ids` (local) name
    each pair's image, so two captions of one image are both positives (their targets share the mass evenly). The
    loss is the mean of image->text and text->image cross-entropies of similarity / temperature."""
    if not (len(images) == len(texts) == len(image_ids)):
        raise CaptuneError(f"contrastive loss: {len(images)} images, {len(texts)} texts and {len(image_ids)} image "
                           "ids: a batch holds one image, one text and one image id per pair")  # fmt: skip
    all_images, start = gathered(images)
    all_texts, _ = gathered(texts)
    all_ids, _ = gathered(image_ids)
    image_to_text = similarity(images, all_texts) / temperature  # (local, global)
    text_to_image = similarity(all_images, texts).t() / temperature  # (local, global)
    positives = (image_ids[:, None] == all_ids[None, :]).float()
    targets = positives / positives.sum(dim=1, keepdim=True)
    loss_i2t = -(F.log_softmax(image_to_text, dim=1) * targets).sum(dim=1).mean()
    loss_t2i = -(F.log_softmax(text_to_image, dim=1) * targets).sum(dim=1).mean()
    local = image_to_text[:, start : start + len(images)]  # LAVIS samples negatives from sim / temperature
    return (loss_i2t + loss_t2i) / 2, local.detach()


def hard_negatives(
    scores: torch.Tensor, same_image: torch.Tensor, generator: torch.Generator | None, check: bool = True
) -> torch.Tensor:
    """For each row one column sampled in proportion to softmax(scores) over the columns that are not the row's own
    image's (`same_image` True); LAVIS's sampling of ITM negatives. A row whose every column is its own image's
    cannot have a negative: refused (batches need at least two images); `check=False` skips that test, which waits
    for the GPU, where the caller knows the batch holds two images."""
    weights = F.softmax(scores.float(), dim=1).masked_fill(same_image, 0.0)
    if check and bool((weights.sum(dim=1) <= 0).any()):
        raise CaptuneError("image-text matching needs a negative for every pair: a batch holds captions of one image "
                           "only; use a batch of at least two images")  # fmt: skip
    return torch.multinomial(weights, 1, generator=generator).squeeze(1)


class SharedImageKeys:
    """Within `over(vision)`, the Q-Former's cross-attention keys and values of the batch's images are computed once
    and reused: by the contrastive image pass and, through `rows`, by the matching pass, whose 3 x batch rows show
    only the batch's images (positives, negative captions, negative images). The values are the same tensors the
    projections would compute row by row, so the losses and gradients do not change (tested); without it each
    cross-attention layer projects every matching row's 257 x 1,408 vision outputs again: 3 x batch rows, twice.

    Inputs that are neither `vision` nor the tensor `rows` returned (a cast copy, another model call) are projected
    as usual."""

    def __init__(self, model: Blip2ForImageTextRetrieval) -> None:
        attentions = [layer.crossattention.attention for layer in model.qformer.encoder.layer
                      if layer.has_cross_attention]  # fmt: skip
        self.linears = [linear for attention in attentions for linear in (attention.key, attention.value)]
        self.vision: torch.Tensor | None = None
        self.selected: tuple[torch.Tensor, torch.Tensor] | None = None
        self.projected: dict[int, torch.Tensor] = {}

    @contextmanager
    def over(self, vision: torch.Tensor) -> Iterator[SharedImageKeys]:
        self.vision, self.selected, self.projected = vision, None, {}
        for linear in self.linears:
            linear.forward = self._forward_of(linear)  # type: ignore[method-assign]  # an instance's own, removed below
        try:
            yield self
        finally:
            for linear in self.linears:
                del linear.forward
            self.vision, self.selected, self.projected = None, None, {}

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        """`vision[index]`, whose projections inside `over` are the shared ones' rows `index`."""
        assert self.vision is not None, "SharedImageKeys.rows outside `over`"
        selected = self.vision[index]
        self.selected = (selected, index)
        return selected

    def _forward_of(self, linear: nn.Linear) -> Any:
        def forward(states: torch.Tensor) -> torch.Tensor:
            vision, selected = self.vision, self.selected
            if vision is None or not (states is vision or (selected is not None and states is selected[0])):
                return F.linear(states, linear.weight, linear.bias)
            projected = self.projected.get(id(linear))
            if projected is None:
                projected = self.projected[id(linear)] = F.linear(vision, linear.weight, linear.bias)
            return projected if states is vision else projected[selected[1]]  # type: ignore[index]

        return forward


def matching_loss(
    model: Blip2ForImageTextRetrieval,
    vision: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    image_ids: torch.Tensor,
    local_scores: torch.Tensor,
    generator: torch.Generator | None = None,
    check: bool = True,
    shared: SharedImageKeys | None = None,
) -> torch.Tensor:
    """ITM on the local batch: its positive pairs, each image with a hard negative caption and each caption with a
    hard negative image (sampled from `local_scores`, the local pairs' contrastive similarities), two-way
    cross-entropy. `shared` (inside its `over(vision)`): the matching rows' cross-attention keys and values are
    taken from the shared ones."""
    n = len(image_ids)
    same = image_ids[:, None] == image_ids[None, :]
    negative_text = hard_negatives(local_scores, same, generator, check)  # for each image
    negative_image = hard_negatives(local_scores.t(), same, generator, check)  # for each caption
    own = torch.arange(n, device=negative_image.device)
    rows = torch.cat([own, own, negative_image])
    vision_rows = shared.rows(rows) if shared is not None else vision[rows]
    ids = torch.cat([input_ids, input_ids[negative_text], input_ids])
    mask = torch.cat([attention_mask, attention_mask[negative_text], attention_mask])
    logits = matching_logits(model, vision_rows, ids, mask)
    labels = torch.cat([torch.ones(n, dtype=torch.long), torch.zeros(2 * n, dtype=torch.long)]).to(logits.device)
    return F.cross_entropy(logits.float(), labels)


class RetrievalLoss(nn.Module):
    """The training forward of `task: retrieval`: the contrastive loss plus the matching loss of a batch of
    (image, caption) pairs, from pixels or from the vision encoder's cached outputs (`image_features`, when the ViT
    is frozen: `captune.training.features`). The image-grounded text generation loss of the BLIP-2 paper is not
    computed.

    A batch (one process's share) whose pairs all show one image has no matching negative: its matching loss is the
    positive pairs' scored with weight 0, so every trainable parameter still gets a gradient (DDP needs them all)."""

    def __init__(self, model: Blip2ForImageTextRetrieval, share_image_keys: bool = True) -> None:
        """`share_image_keys`: compute each image's cross-attention keys and values once a step
        (`SharedImageKeys`); False projects them again for every row that reads them."""
        super().__init__()
        self.model = model
        self.shared = SharedImageKeys(model) if share_image_keys else None

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        image_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
        two_images: bool | None = None,
    ) -> torch.Tensor:
        """`two_images`: whether the batch holds pairs of at least two images (the collator says so, read on the
        CPU); None reads it from `image_ids`, which waits for the GPU."""
        model = self.model
        if image_features is None:
            assert pixel_values is not None
            image_features = image_side(model, pixel_values.to(model.query_tokens.dtype))
        with self.shared.over(image_features) if self.shared is not None else nullcontext() as shared:
            images = _image_embeddings_from(model, image_features)
            texts = text_embeddings(model, input_ids, attention_mask)
            temperature = model.temperature()  # type: ignore[operator]  # with_temperature attached it
            contrastive, local = contrastive_loss(images, texts, image_ids, temperature)
            if two_images is None:
                two_images = bool((image_ids != image_ids[0]).any())
            if two_images:  # (no check in the sampling: it would wait for the GPU at every step)
                return contrastive + matching_loss(model, image_features, input_ids, attention_mask, image_ids, local,
                                                   check=False, shared=shared)  # fmt: skip
            logits = matching_logits(model, image_features, input_ids, attention_mask)
            return contrastive + 0.0 * logits.float().sum()


# --- the tiny retrieval model ------------------------------------------------------------------------------------

TINY_RETRIEVAL = "tiny-retrieval"
BERT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def build_retrieval_tokenizer(words: tuple[str, ...] = tuple(TINY_WORDS)) -> PreTrainedTokenizerFast:
    """A word-level tokenizer laid out as BERT's (`[PAD]` 0, `[CLS]` text `[SEP]`, lower case) with `[DEC]` as its
    last id and BOS, as blip2-itm-vit-g's Q-Former tokenizer (bert-base-uncased + `[DEC]` = 30522)."""
    vocab = {token: i for i, token in enumerate(BERT_SPECIALS)}
    for word in words:
        vocab.setdefault(word, len(vocab))
    vocab["[DEC]"] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])]
    )
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]", bos_token="[DEC]")  # fmt: skip


def tiny_retrieval_config(vocab_size: int, image_size: int = 32) -> Blip2Config:
    """blip2-itm-vit-g's architecture (ViT, Q-Former with its text input, projections to `image_text_hidden_size`,
    the matching head) at hidden size 32 and 8 queries. Weights drawn at std 0.1 (`INIT_STD`), not BLIP-2's 0.02 (1e-10
    in the ViT): at 0.02 a random 2-layer Q-Former gives every text and every image nearly the same embedding
    (cosine 0.99999), and a contrastive run on the synthetic set stayed at the uniform loss ln(32) for 600 steps."""
    return Blip2Config(
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "image_size": image_size, "patch_size": 8, "initializer_range": INIT_STD},
        qformer_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                        "encoder_hidden_size": 32, "vocab_size": vocab_size, "max_position_embeddings": 64,
                        "use_qformer_text_input": True, "initializer_range": INIT_STD},
        num_query_tokens=8,
        image_text_hidden_size=16,
        image_token_index=None,
        initializer_range=INIT_STD,
    )  # fmt: skip


@dataclass(frozen=True)
class RetrievalProcessor:
    """What a retrieval model reads text and images with: its Q-Former tokenizer (BERT's layout) and image
    processor. Not a `Blip2Processor`, which adds an `<image>` token the Q-Former vocabulary has no row for."""

    tokenizer: PreTrainedTokenizerBase
    image_processor: BlipImageProcessorPil

    def save_pretrained(self, path: str | Path) -> None:
        self.tokenizer.save_pretrained(path)
        self.image_processor.save_pretrained(path)

    @classmethod
    def from_pretrained(cls, name: str | Path) -> RetrievalProcessor:
        """The tokenizer and image processor of a directory or hub id (as blip2-itm-vit-g's repository holds them)."""
        from transformers import AutoTokenizer

        return cls(AutoTokenizer.from_pretrained(name), BlipImageProcessorPil.from_pretrained(name))


@dataclass
class RetrievalModel:
    """A retrieval model with what it reads text and images with; its contrastive temperature is the model's
    `temperature` module (`with_temperature`)."""

    model: Blip2ForImageTextRetrieval
    tokenizer: PreTrainedTokenizerBase
    image_processor: BlipImageProcessorPil

    @property
    def temperature(self) -> Temperature:
        return self.model.temperature  # type: ignore[return-value]  # attached by with_temperature

    @property
    def processor(self) -> RetrievalProcessor:
        return RetrievalProcessor(self.tokenizer, self.image_processor)


def with_temperature(model: Blip2ForImageTextRetrieval) -> Blip2ForImageTextRetrieval:
    """The model with a `temperature` submodule (at `TEMPERATURE_INIT`) when it has none: transformers' class keeps
    no temperature (LAVIS's `temp` is dropped by its conversion), and a run trains and checkpoints it with the rest
    (`temperature.value`). Its weights files leave it out (`without_temperature`): it only scales the training loss,
    and rankings do not depend on it."""
    if not isinstance(getattr(model, "temperature", None), Temperature):
        model.temperature = Temperature().to(model.query_tokens.device)
    return model


def without_temperature(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A retrieval model's state dict as transformers' class has it (for `save_pretrained`)."""
    return {name: value for name, value in state_dict.items() if not name.startswith("temperature.")}


def is_retrieval(model: nn.Module) -> bool:
    """Whether the model (or the model inside a PEFT or accelerate wrapper) is a retrieval BLIP-2."""
    get_base_model = getattr(model, "get_base_model", None)
    inner = get_base_model() if callable(get_base_model) else getattr(model, "module", model)
    return isinstance(inner, Blip2ForImageTextRetrieval)


def build_tiny_retrieval(seed: int = 0, image_size: int = 32) -> RetrievalModel:
    """The tiny retrieval model with random weights (`captune.tiny.draw_tiny_inputs`), deterministic for a seed."""
    tokenizer = build_retrieval_tokenizer()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Blip2ForImageTextRetrieval(tiny_retrieval_config(len(tokenizer), image_size))
        draw_tiny_inputs(model)
    processor = BlipImageProcessorPil(size={"height": image_size, "width": image_size})
    return RetrievalModel(with_temperature(model).eval(), tokenizer, processor)


# --- evaluation --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RetrievalEvaluation:
    """A split's retrieval scores: Recall@K on the contrastive similarities alone and after the matching head
    re-ranked each query's top `k_test` (`captune.retrieval_metrics`), and the matrices they came from."""

    contrastive: RetrievalRecall
    reranked: RetrievalRecall | None
    scores: torch.Tensor
    """(images, texts) contrastive similarities."""
    text_image: list[int]
    """The image index of each text (caption)."""

    def metrics(self) -> dict[str, float]:
        """The numbers validation and the demo keep, LAVIS's keys (`txt_r1` ... `r_mean`): the re-ranked recall, and
        the contrastive scores' own as `itc_*` (without re-ranking, the contrastive recall alone)."""
        contrastive = self.contrastive.as_dict()
        if self.reranked is None:
            return contrastive
        return self.reranked.as_dict() | {f"itc_{key}": value for key, value in contrastive.items()}


@torch.no_grad()
def evaluate_retrieval(
    loaded: RetrievalModel,
    records: list[Record],
    batch_size: int = 64,
    k_test: int | None = 128,
    device: torch.device | None = None,
) -> RetrievalEvaluation:
    """Recall@1/5/10 both ways on `records` (every caption of an image a match): every image and caption embedded
    once, all pairs scored by the contrastive similarity, then (unless `k_test` is None) each query's top `k_test`
    re-scored by the matching head plus the contrastive score, as LAVIS's BLIP-2 retrieval evaluation does. The
    vision encoder's outputs of every image are kept for the re-ranking (images x (patches + 1) x width)."""
    if not records:
        raise CaptuneError("retrieval evaluation: no images to score")
    from captune.model import evaluating  # (captune.model imports this module)

    with evaluating(loaded.model):  # (validation during training: no dropout)
        return _evaluate_retrieval(loaded, records, batch_size, k_test, device)


def _evaluate_retrieval(
    loaded: RetrievalModel, records: list[Record], batch_size: int, k_test: int | None, device: torch.device | None
) -> RetrievalEvaluation:
    model = loaded.model
    device = device or next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    texts = [caption for record in records for caption in record.captions]
    text_image = [i for i, record in enumerate(records) for _ in record.captions]
    images, vision = [], []
    for start in range(0, len(records), batch_size):
        chunk = records[start : start + batch_size]
        pixels = torch.stack([processed_pixels(r.image_path, loaded.image_processor) for r in chunk])
        side = image_side(model, pixels.to(device, dtype))
        vision.append(side)
        images.append(_image_embeddings_from(model, side))
    tokens = loaded.tokenizer(texts, padding=True, truncation=True, max_length=64, return_tensors="pt").to(device)
    text_embeds = torch.cat([
        text_embeddings(model, tokens.input_ids[s : s + batch_size], tokens.attention_mask[s : s + batch_size])
        for s in range(0, len(texts), batch_size)
    ])  # fmt: skip
    scores = similarity(torch.cat(images), text_embeds).float().cpu()
    contrastive = retrieval_recall(scores, text_image)
    if k_test is None:
        return RetrievalEvaluation(contrastive, None, scores, text_image)
    all_vision = torch.cat(vision)

    def matching(image_index: torch.Tensor, text_index: torch.Tensor) -> torch.Tensor:
        images, texts = image_index.to(device), text_index.to(device)
        logits = matching_logits(model, all_vision[images], tokens.input_ids[texts], tokens.attention_mask[texts])
        return logits.float().softmax(dim=-1)[:, 1].cpu()  # the probability of a match

    reranked = rerank(scores, matching, k_test)
    return RetrievalEvaluation(
        contrastive, retrieval_recall(reranked.i2t, text_image, scores_t2i=reranked.t2i), scores, text_image
    )


def _image_embeddings_from(model: Blip2ForImageTextRetrieval, vision: torch.Tensor) -> torch.Tensor:
    """`image_embeddings` from the vision encoder's output already computed."""
    queries = model.query_tokens.expand(vision.shape[0], -1, -1)
    mask = torch.ones(vision.shape[:-1], dtype=torch.long, device=vision.device)
    out = model.qformer(query_embeds=queries, encoder_hidden_states=vision, encoder_attention_mask=mask)
    projected = model.vision_projection(out.last_hidden_state.to(model.vision_projection.weight.dtype))
    return F.normalize(projected, dim=-1)


# --- loading and saving ------------------------------------------------------------------------------------------


def retrieval_base_name(name: str) -> bool:
    """Whether a `model.name` names a retrieval model: `tiny-retrieval`, or a directory whose config.json is a
    `Blip2ForImageTextRetrieval`'s (a hub id is read from the local cache only when it is there)."""
    if name == TINY_RETRIEVAL or name in RETRIEVAL_TWINS:
        return True
    config_file = Path(name).expanduser() / "config.json"
    if not config_file.is_file():
        try:
            from huggingface_hub import try_to_load_from_cache

            found = try_to_load_from_cache(name, "config.json")
        except ValueError:  # not a hub id either
            return False
        if not isinstance(found, str):
            return False
        config_file = Path(found)
    import json

    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError):
        return False
    return "Blip2ForImageTextRetrieval" in (config.get("architectures") or [])


def load_retrieval_base(name: str, seed: int = 0) -> RetrievalModel:
    """A retrieval model by name: `tiny-retrieval` (built here, random weights for `seed`), `twin-blip2-itm-vit-g`
    (blip2-itm-vit-g's files as `captune.twins` reconstructs them, tiny sizes, random weights), or a directory or hub id
    holding a `Blip2ForImageTextRetrieval` with its tokenizer and image processor (`from_pretrained`, as
    blip2-itm-vit-g's repository holds them), in float32 on the CPU.

    Raises:
        CaptuneError: the directory holds another BLIP-2 (a captioning model has no text projection or matching
            head, and loading it as a retrieval model would leave them random)."""
    if name == TINY_RETRIEVAL:
        return build_tiny_retrieval(seed)
    if name in RETRIEVAL_TWINS:
        import tempfile

        from captune.twins import write_checkpoint

        with tempfile.TemporaryDirectory(prefix="captune-twin-") as tmp:
            return load_retrieval_base(str(write_checkpoint(RETRIEVAL_TWINS[name], Path(tmp) / name, seed=seed)))
    config = Blip2Config.from_pretrained(name)
    qformer: Any = config.qformer_config
    if getattr(qformer, "qformer_text_input", False):  # an early config's name of the key
        qformer.use_qformer_text_input = True
    text_input = bool(getattr(qformer, "use_qformer_text_input", False))
    architectures = config.architectures or ["Blip2ForImageTextRetrieval"]
    if not text_input or "Blip2ForImageTextRetrieval" not in architectures:
        raise CaptuneError(
            f"{name}: not an image-text retrieval BLIP-2 (its config's architectures are {config.architectures}, "
            f"use_qformer_text_input is {text_input}); retrieval takes a Blip2ForImageTextRetrieval such as "
            "Salesforce/blip2-itm-vit-g, or tiny-retrieval"
        )
    model = Blip2ForImageTextRetrieval.from_pretrained(name, config=config)
    processor = RetrievalProcessor.from_pretrained(name)
    return RetrievalModel(with_temperature(model).eval(), processor.tokenizer, processor.image_processor)


def load_retrieval(name: str, device: str | torch.device | None = None) -> RetrievalModel:
    """A retrieval model to embed, evaluate or search with: what `captune train` saved with `task: retrieval`
    (RUN/best, RUN/final: base + trained weights, `captune.model_dir.load_model_dir`), or a model
    `load_retrieval_base` loads by name. On `device` (None: where it was built, the CPU)."""
    from captune.model_dir import META_FILE, load_model_dir

    if (Path(name).expanduser() / META_FILE).is_file():
        loaded = load_model_dir(name, dtype=torch.float32, device=str(device or "cpu"))
        if not is_retrieval(loaded.model):
            raise CaptuneError(f"{name}: a captune model directory of a captioning BLIP-2, not a retrieval model; "
                               "retrieval takes a run trained with task: retrieval, or tiny-retrieval")  # fmt: skip
        return RetrievalModel(loaded.model, loaded.processor.tokenizer, loaded.processor.image_processor)
    retrieval = load_retrieval_base(name)
    if device is not None:
        from captune.model import resolve_device

        target = resolve_device(device) if isinstance(device, str) else device
        retrieval.model.to(target)  # type: ignore[arg-type]  # transformers' stubs of .to
    return retrieval


def save_retrieval(loaded: RetrievalModel, path: Path) -> None:
    """Writes a directory `load_retrieval` reads: the model's weights and config, the tokenizer and the image
    processor, into a temporary folder put in place whole."""
    from captune.files import replace_dir

    tmp = path.with_name(f".tmp-{path.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    loaded.model.save_pretrained(tmp, state_dict=without_temperature(loaded.model.state_dict()))
    loaded.processor.save_pretrained(tmp)
    replace_dir(tmp, path)
