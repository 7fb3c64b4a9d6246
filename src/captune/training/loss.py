"""The training forward: a batch's caption loss, from pixels or from image features computed once per image.

In LoRA-on-the-language-model training nothing upstream of the language model learns, so an image's projected
Q-Former output (32 vectors of the LM's width) is the same at every step: `captune.training.features` computes it once
per image and `CaptionLoss` takes it instead of pixels. `CaptionLoss` is what `captune train` calls (through
accelerate, so that DDP sees the forward). It computes exactly what `Blip2ForConditionalGeneration.forward(...,
labels=...)` does — image features into the image-token positions of the embedded input, the language model, the mean
cross-entropy of the caption tokens — with two savings for decoder-only language models: the LM head runs only on
positions whose next token is a caption label (not on the 32 image positions, the prompt or the padding), and the
cross-entropy runs in chunks whose float32 logits are recomputed in the backward pass instead of kept, so the (tokens
x 50k) float32 logits of a batch never exist at once. Encoder-decoder language models (Flan-T5) take the language
model's own loss on the same embedded input (image features into the encoder's image-token positions), with pixels or
cached features. Packed batches (`train.pack_captions`, see captune.training.batches.PackedCaptionCollator) hold one row
per image with its captions behind one copy of the image tokens and prompt; a block mask and restarting position ids
make the result that of a row per caption. VQA rows with weighted answers (`weights`, one a row; packed, also
`token_weights`, one a label) take the weighted mean of the rows' losses (each row's loss the mean over its answer
tokens) instead of the mean over tokens.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.modeling_outputs import BaseModelOutput

from captune.errors import CaptuneError
from captune.model import blip_of, embedded_inputs

IGNORE = -100  # label value the loss skips
CE_CHUNK_TOKENS = 2048
"""Caption tokens per cross-entropy chunk: 2048 x 50,272 float32 logits are 0.4 GB."""


def upstream_of_language_model_trains(model: nn.Module) -> list[str]:
    """Names of trainable parameters outside the language model (vision encoder, Q-Former, query tokens, projection).

    Cached image features are only valid when this is empty.
    """
    return [name for name, p in model.named_parameters() if p.requires_grad and ".language_model." not in f".{name}"]


class CaptionLoss(nn.Module):
    """The mean cross-entropy of a batch's caption tokens (labels != -100), as BLIP-2's own forward computes it.

    Args:
        model: BLIP-2, usually wrapped by PEFT; held, not copied.
        caption_logits_only: Decoder-only LMs: run the LM head on caption positions only, in recomputed chunks.
            False runs the LM head on every position and takes transformers' loss (the usual recipe's numbers).
    """

    def __init__(self, model: nn.Module, caption_logits_only: bool = True) -> None:
        super().__init__()
        self.model = model
        self.caption_logits_only = caption_logits_only

    def train(self, mode: bool = True) -> CaptionLoss:
        """Train mode, except a frozen image side (vision encoder, Q-Former) stays in eval mode, as LAVIS keeps its
        frozen ViT: dropout in modules that do not learn only adds noise, and with it an image's features would
        differ from step to step, so the cached path and the full path would not compute the same loss."""
        super().train(mode)
        if mode and not upstream_of_language_model_trains(self.model):
            blip = blip_of(self.model)
            blip.vision_model.eval()
            blip.qformer.eval()
        return self

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        caption_start: int | None = None,
        pixel_values: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
        token_count: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        predict_from: torch.Tensor | None = None,
        caption_image: torch.Tensor | None = None,
        weights: torch.Tensor | None = None,
        token_weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The loss of a batch as `CaptionCollator` makes it (`caption_start`: the first caption column, the same in
        every row since image tokens and prompt come first and padding last), or as `PackedCaptionCollator` makes it
        (one row per image: `position_ids` and a block `attention_mask` of shape (rows, 1, length, length),
        `predict_from` the flat row x length index of the hidden state that predicts each of the flat `labels`; T5:
        `caption_image` the image row of each caption's labels), with pixels or cached features.
        `token_count`, when given, divides the summed loss instead of this batch's own caption-token count
        (captune.training.recipe passes the mean over processes, so that DDP's gradient average is the global
        batch's). `weights` (VQA, one a row; packed, with `token_weights`, one a label): the loss is sum(weight
        x row loss) / `token_count` or the weights' sum (`label_tokens` gives either)."""
        blip = blip_of(self.model)
        embeds = embedded_inputs(blip, input_ids, pixel_values, image_features)
        lm = blip.language_model
        if weights is not None:  # VQA's weighted answers: each row's mean over its tokens, weighted
            token_count = token_count if token_count is not None else weights.sum()
        if predict_from is not None:  # packed decoder-only: a row per image, its captions after one shared prefix
            mask = block_mask_for(lm, attention_mask, embeds.dtype)
            hidden = lm.base_model(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids)
            hidden = hidden.last_hidden_state.flatten(0, 1)[predict_from]
            return chunked_cross_entropy(hidden, labels, lm.get_output_embeddings(), token_count, token_weights)
        if weights is not None:
            assert token_count is not None
            if not blip.config.use_decoder_only_language_model:
                logits = lm(inputs_embeds=embeds, attention_mask=attention_mask, labels=labels).logits
                return _weighted_cross_entropy(logits, labels, weights, token_count)
            assert caption_start is not None
            hidden = lm.base_model(inputs_embeds=embeds, attention_mask=attention_mask).last_hidden_state
            targets = labels[:, caption_start:]
            token_weights = row_token_weights(targets, weights)
            return chunked_cross_entropy(hidden[:, caption_start - 1 : -1].flatten(0, 1), targets.flatten(),
                                         lm.get_output_embeddings(), token_count, token_weights.flatten())  # fmt: skip
        if not blip.config.use_decoder_only_language_model:  # T5: the encoder reads images + prompt, labels decode
            if caption_image is None:
                loss = lm(inputs_embeds=embeds, attention_mask=attention_mask, labels=labels).loss
            else:  # packed: each image's prompt is encoded once, each caption decoded against it
                encoded = lm.get_encoder()(inputs_embeds=embeds, attention_mask=attention_mask).last_hidden_state
                loss = lm(encoder_outputs=BaseModelOutput(last_hidden_state=encoded[caption_image]),
                          attention_mask=attention_mask[caption_image], labels=labels).loss  # fmt: skip
            # T5's loss is the mean over this batch's label tokens; as a sum over token_count it is DDP-exact too.
            return loss if token_count is None else loss * (labels != IGNORE).sum() / token_count
        assert caption_start is not None
        if not self.caption_logits_only:
            logits = lm(inputs_embeds=embeds, attention_mask=attention_mask).logits
            return lm.loss_function(logits=logits, labels=labels, vocab_size=lm.config.vocab_size)
        hidden = lm.base_model(inputs_embeds=embeds, attention_mask=attention_mask).last_hidden_state
        # The hidden state at position t predicts token t + 1: from caption_start - 1 on, the next token is a caption
        # label or padding (-100, skipped). Slicing by a number, not by a mask, keeps the GPU from waiting on the CPU.
        hidden = hidden[:, caption_start - 1 : -1].flatten(0, 1)
        targets = labels[:, caption_start:].flatten()
        return chunked_cross_entropy(hidden, targets, lm.get_output_embeddings(), token_count)


PACKING_ATTENTION = ("sdpa", "eager")
"""Attention implementations that take the packed rows' block mask (a custom 4D mask); flash attention does not."""


def block_mask_for(lm: nn.Module, allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A (rows, 1, length, length) boolean mask (True: may attend) as the language model's attention takes it: SDPA
    takes booleans, eager attention adds 0 or the dtype's minimum to its scores."""
    implementation = getattr(lm, "config")._attn_implementation  # noqa: B009  (a PreTrainedModel)
    if implementation == "sdpa":
        return allowed
    if implementation == "eager":
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
            ~allowed, torch.finfo(dtype).min
        )
    raise CaptuneError(
        f"train.pack_captions needs sdpa or eager attention, not {implementation}; set train.pack_captions=false"
    )


def row_token_weights(labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Each label token's weight: its row's weight over the row's label tokens (0 for -100), so that the weighted sum
    of the tokens' losses is the weighted sum of the rows' mean losses."""
    counted = (labels != IGNORE).float()
    return counted * (weights / counted.sum(dim=1).clamp(min=1))[:, None]


def _weighted_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor, divisor: torch.Tensor
) -> torch.Tensor:
    """sum(weight x each row's mean cross-entropy over its labels) / divisor, from (rows, length, vocab) logits
    aligned with (rows, length) labels (T5's decoder: logits t predict labels t)."""
    losses = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE, reduction="none")
    return (losses * row_token_weights(labels, weights).flatten()).sum() / divisor


def label_tokens(batch: dict[str, Any]) -> torch.Tensor:
    """The number of caption tokens the loss of a collated batch (packed or not) averages over; with weighted VQA
    rows, the sum of their weights (which the loss divides by instead)."""
    if "weights" in batch:
        return batch["weights"].sum()
    labels = batch["labels"]
    if "caption_start" in batch:
        labels = labels[:, batch["caption_start"] :]
    return (labels != IGNORE).sum()


def chunked_cross_entropy(
    hidden: torch.Tensor,
    targets: torch.Tensor,
    head: nn.Module,
    divisor: torch.Tensor | None = None,
    token_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean cross-entropy of head(hidden) against targets (-100 skipped), CE_CHUNK_TOKENS rows at a time, logits in
    float32; with `token_weights`, the weighted sum of the tokens' cross-entropies over `divisor`.

    Each chunk's logits are recomputed in the backward pass (activation checkpointing), so only one chunk's
    float32 logits exist at any moment.
    """
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, len(targets), CE_CHUNK_TOKENS):
        rows = slice(start, start + CE_CHUNK_TOKENS)
        weights = None if token_weights is None else token_weights[rows]
        total = total + checkpoint(_summed_cross_entropy, hidden[rows], targets[rows], head, weights,
                                   use_reentrant=False)  # fmt: skip
    return total / (divisor if divisor is not None else (targets != IGNORE).sum().clamp(min=1))


def _summed_cross_entropy(
    hidden: torch.Tensor, targets: torch.Tensor, head: nn.Module, weights: torch.Tensor | None
) -> torch.Tensor:
    if weights is None:
        return F.cross_entropy(head(hidden).float(), targets, ignore_index=IGNORE, reduction="sum")
    losses = F.cross_entropy(head(hidden).float(), targets, ignore_index=IGNORE, reduction="none")
    return (losses * weights).sum()
