"""The training modes: one `TrainingMode` per `train.mode`, the one place the modes differ, and the files a run of
each saves."""

from __future__ import annotations

from dataclasses import dataclass

ADAPTER_FILE = "adapter_model.safetensors"
"""What a LoRA mode's run saves: the PEFT adapter (beside PEFT's adapter_config.json)."""
TRAINED_FILE = "trained.safetensors"
"""What a run of a mode without LoRA saves: the weights trained in full, by their names in
Blip2ForConditionalGeneration."""
TRAINABLE_FILE = "trainable.safetensors"
"""A checkpoint's trainable weights by parameter name, as training holds them (also in the model directories of a
PiSSA or OLoRA run, whose adapter file holds them converted for the unchanged base)."""
QFORMER_LORA_DEFAULT = ["query", "value"]
VIT_LORA_DEFAULT = ["qkv"]
"""The vision encoder's LoRA targets when `lora.vit_target_modules` is empty: BLIP-2's ViT fuses query, key and value
into one `qkv` layer, so this is the ViT's counterpart of the language model's `q_proj`/`v_proj` and the Q-Former's
`query`/`value` (the layers that make attention's inputs). Its output `projection` is left out as the other defaults
leave out `out_proj`: at r=8 LoRA on ViT-g's 39 `qkv` layers is ~1.8M parameters, `projection` would add ~0.9M, and
`vit+qformer` trains over 1B. Set `lora.vit_target_modules=qkv,projection` to adapt the attention's output too."""


@dataclass(frozen=True)
class TrainingMode:
    """What one `train.mode` trains and how: the one place the modes differ, read by the config checks, by applying
    the mode (`captune.model.apply_train_mode`), by saving and loading model directories, the model card and the
    merge."""

    lora: bool
    """Trained through PEFT LoRA on the `lora.*` layers (the lora keys apply): a run saves the adapter
    (`ADAPTER_FILE`), loading wraps the base in a PeftModel, the card's library is peft and merging folds the adapter
    into the base weights. False: the parameters under `in_full` train in full (`lora.*` is not used), a run saves
    them (`TRAINED_FILE`), loading puts them over the base and merging has nothing left to fold."""
    lora_on_qformer: bool = False
    """The Q-Former gets LoRA too (`lora.qformer_target_modules`, `QFORMER_LORA_DEFAULT` when empty); a LoRA mode
    without it refuses Q-Former targets."""
    lora_on_vit: bool = False
    """The vision encoder's attention gets LoRA too (`lora.vit_target_modules`, `VIT_LORA_DEFAULT` when empty), its
    own weights frozen; a LoRA mode without it refuses ViT targets. Image features cannot be cached then."""
    in_full: tuple[str, ...] = ()
    """Parameter name prefixes trained in full (the rest frozen), when not `lora`."""
    card: str = ""
    """What the model card says a saved directory of this mode holds."""

    @property
    def saves(self) -> str:
        """The weights file a run's model directories hold."""
        return ADAPTER_FILE if self.lora else TRAINED_FILE


_ADAPTER_CARD = (
    "This directory holds a PEFT adapter for the base model below, its processor and `captune.json` (base "
    "model and the run's config). Load it with the base model, or make a standalone model with `captune merge "
    "--model-dir MODEL_DIR --output MERGED_DIR`."
)

_QFORMER_IN_FULL = ("qformer.", "query_tokens", "language_projection.", "embeddings.", "vision_projection.",
                    "text_projection.", "itm_head.", "temperature.")  # fmt: skip
"""What `qformer` trains: the Q-Former, its query tokens and the projection into the language model; the last five
exist in a retrieval model (Blip2ForImageTextRetrieval) only: its Q-Former's text embeddings, the two projections to
the shared space, the matching head and the contrastive temperature."""

TRAINING_MODES = {
    "lora-lm": TrainingMode(lora=True, card=_ADAPTER_CARD),
    "lora-lm+qformer": TrainingMode(lora=True, lora_on_qformer=True, card=_ADAPTER_CARD),
    "lora-lm+qformer+vit": TrainingMode(lora=True, lora_on_qformer=True, lora_on_vit=True, card=_ADAPTER_CARD),
    "qformer": TrainingMode(
        lora=False,
        in_full=_QFORMER_IN_FULL,
        card=(
            "This directory holds the Q-Former, its query tokens and the language projection, trained in full (the "
            f"LAVIS caption fine-tune, `train.mode=qformer`; after a `task: retrieval` run: the Q-Former, its query "
            "tokens and text embeddings, both projections, the matching head and the temperature), as "
            f"`{TRAINED_FILE}`, with the processor and `captune.json` (base model and the run's config). They "
            "replace the base model's own weights of those names; `captune merge --model-dir MODEL_DIR --output "
            "MERGED_DIR` writes a standalone model."
        ),
    ),
    "vit+qformer": TrainingMode(
        lora=False,
        in_full=("vision_model.", *_QFORMER_IN_FULL),
        card=(
            "This directory holds the vision encoder, the Q-Former and its query tokens with the language projection "
            "(a captioner) or the retrieval heads (a retrieval model), trained in full (`train.mode=vit+qformer`: "
            f"LAVIS's fine-tunes with `freeze_vit: False`), as `{TRAINED_FILE}`, with the processor and "
            "`captune.json` (base model and the run's config). They replace the base model's own weights of those "
            "names; `captune merge --model-dir MODEL_DIR --output MERGED_DIR` writes a standalone model."
        ),
    ),
}
"""Every `train.mode`, by name (see `TrainConfig.mode`). A new mode is a row here, plus its apply function in
captune.model when it is neither LoRA nor trains named parameters in full."""
