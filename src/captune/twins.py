"""Twins of the real BLIP-2 checkpoints: their hub files (config, generation config, tokenizer, processor) with random
weights, at tiny hidden sizes for tests and the CPU, or at full size for speed and memory measurements on a GPU.

No weights can be downloaded here, and a model captune builds for itself keeps its special tokens self-consistent
where the real checkpoints do not: blip2-opt ends a text at token 50118 (OPT's "\\n", its generation config's EOS),
not at the tokenizer's `</s>` (2); its embedding has 50,304 rows for 50,266 tokens; BOS = EOS = UNK; `<image>` stands
before BOS. A twin keeps every such id and setting and changes only the hidden sizes, so code that is right for the
twin is right for the checkpoint (except for caption quality: the weights are random).

`captune/checkpoints/` holds the recorded files of `Salesforce/blip2-opt-2.7b` and `Salesforce/blip2-flan-t5-xl`
byte for byte. The other captioning checkpoints differ from those in ways their hub configs show, applied by
`CHECKPOINTS`: sizes (6.7b, xxl), the old-style files of snapshots not updated for current transformers (no
`image_token_index` or `vocab_size` in the config, no `<image>` in the tokenizer, no processor, added-tokens or
generation config files), and 364 px images (`*-coco`).

`Salesforce/blip2-itm-vit-g`, the image-text retrieval model (`Blip2ForImageTextRetrieval`: ViT-g and a Q-Former
with text input, no language model), has no recorded files: its folder is **reconstructed** from what is known of it
(the Q-Former tokenizer's special ids and `[DEC]` = 30522, Q-Former vocabulary 30,523, 32 queries, 256-d
projections; what is known and what assumed: `checkpoints/README.md`), with a placeholder vocabulary. Its twin is in
`RETRIEVAL_TWINS`, not in `TWINS`, which holds the captioning twins every captioning path takes.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2ForImageTextRetrieval

RECORDED = Path(__file__).parent / "checkpoints"
"""The recorded hub files, one folder per checkpoint (where each was recorded from: its README.md)."""

OLD_STYLE_DROPPED = ("added_tokens.json", "generation_config.json", "processor_config.json")
"""Files the old-style snapshots (blip2-opt-6.7b, *-coco) do not have."""


@dataclass(frozen=True)
class Checkpoint:
    """A BLIP-2 checkpoint on the hub, as the recorded files it is made from and what differs from them."""

    recorded: str
    """The folder of `RECORDED` it is made from."""
    text: dict[str, Any] = field(default_factory=dict)
    """`text_config` fields other than the recorded ones (the language model's sizes)."""
    old_style: bool = False
    """A snapshot from before the hub's "Update for transformers": no `image_token_index` and no text `vocab_size`
    (OPT's default 50,272 applies) in the config, no `<image>` token, no `OLD_STYLE_DROPPED` files."""
    image_size: int | None = None
    """Image side in pixels when it is not the recorded 224 (the `coco` fine-tunes: 364)."""
    retrieval: bool = False
    """An image-text retrieval model (`Blip2ForImageTextRetrieval`, no language model) rather than a captioning one
    (`Blip2ForConditionalGeneration`)."""


_OPT_6_7B = {"hidden_size": 4096, "ffn_dim": 16384, "word_embed_proj_dim": 4096, "_name_or_path": "facebook/opt-6.7b"}
_FLAN_T5_XXL = {"d_model": 4096, "d_ff": 10240, "d_kv": 64, "num_heads": 64, "num_layers": 24, "num_decoder_layers": 24}
CHECKPOINTS = {
    "Salesforce/blip2-opt-2.7b": Checkpoint("blip2-opt-2.7b"),
    "Salesforce/blip2-opt-6.7b": Checkpoint("blip2-opt-2.7b", text=_OPT_6_7B, old_style=True),
    "Salesforce/blip2-opt-2.7b-coco": Checkpoint("blip2-opt-2.7b", old_style=True, image_size=364),
    "Salesforce/blip2-flan-t5-xl": Checkpoint("blip2-flan-t5-xl"),
    "Salesforce/blip2-flan-t5-xxl": Checkpoint("blip2-flan-t5-xl", text=_FLAN_T5_XXL),
    "Salesforce/blip2-itm-vit-g": Checkpoint("blip2-itm-vit-g", retrieval=True),
}

TWIN_PREFIX = "twin-"
TWINS = {TWIN_PREFIX + hub_id.split("/")[1]: hub_id for hub_id, c in CHECKPOINTS.items() if not c.retrieval}
"""`model.name` values that build a captioning twin (`twin-blip2-opt-2.7b`, ...), by the hub id it is the twin of."""
RETRIEVAL_TWINS = {TWIN_PREFIX + hub_id.split("/")[1]: hub_id for hub_id, c in CHECKPOINTS.items() if c.retrieval}
"""The retrieval twins (`twin-blip2-itm-vit-g`), by hub id: `Blip2ForImageTextRetrieval`s, which no captioning path
takes."""

TWIN_SIZES = {
    "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2},
    "qformer_config": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "encoder_hidden_size": 32,
    },  # fmt: skip
    "opt": {
        "hidden_size": 64,
        "ffn_dim": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "word_embed_proj_dim": 64,
    },  # fmt: skip
    "t5": {"d_model": 64, "d_kv": 16, "d_ff": 128, "num_layers": 2, "num_decoder_layers": 2, "num_heads": 4},
}
"""The hidden sizes of a twin (a few hundred thousand parameters besides the embeddings); patch size, vocabulary,
query tokens, ids and every other field stay the checkpoint's. A retrieval twin takes the vision and Q-Former sizes
(it has no language model)."""


def learning_overrides(name: str) -> list[str]:
    """Config overrides with which a short fine-tune of twin `name` learns its captions and their end: a random twin's
    frozen output layer and final layer norm bound its logits (~1.3 at most over 50k tokens), so the run trains the
    final layer norm and the projection in full and LoRA on q, v and the feed-forward layers (tests and the GPU
    check of `benchmarks/twin_stopping.py`)."""
    t5 = CHECKPOINTS[TWINS[name]].recorded.startswith("blip2-flan-t5")
    final_norm = "language_model.decoder.final_layer_norm" if t5 else "language_model.model.decoder.final_layer_norm"
    return [f"lora.modules_to_save=language_projection,{final_norm}", "lora.target_modules=q_proj,v_proj,fc1,fc2",
            "train.epochs=6", "train.batch_size=10", "train.lr=1e-2", "train.warmup_steps=2"]  # fmt: skip


def write_checkpoint(
    hub_id: str,
    folder: Path,
    *,
    full_size: bool = False,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
) -> Path:
    """Writes `folder` as the hub has `hub_id`, with random weights: the twin (tiny hidden sizes) or, with
    `full_size`, the real architecture. It loads through `from_pretrained` like the checkpoint itself
    (`Blip2ForConditionalGeneration`, or `Blip2ForImageTextRetrieval` for a retrieval checkpoint; its query tokens
    drawn at the initializer range (0.02) as LAVIS starts them: transformers starts them at zero, which makes
    every query the same and the best-of-32 similarity one query's).

    Raises:
        KeyError: `hub_id` is not one of CHECKPOINTS.
    """
    checkpoint = CHECKPOINTS[hub_id]
    folder.mkdir(parents=True, exist_ok=True)
    dropped = OLD_STYLE_DROPPED if checkpoint.old_style else ()
    for file in sorted((RECORDED / checkpoint.recorded).iterdir()):
        if file.name not in dropped:
            shutil.copyfile(file, folder / file.name)
    _edit_json(folder / "config.json", lambda config: _config(config, checkpoint, full_size))
    if checkpoint.image_size:
        size = {"height": checkpoint.image_size, "width": checkpoint.image_size}
        _edit_json(folder / "preprocessor_config.json", lambda processor: processor | {"size": size})
    if checkpoint.old_style:
        _edit_json(folder / "tokenizer.json", _without_image_token)
        _edit_json(folder / "tokenizer_config.json", _without_image_token)
    # The weights: save_pretrained writes config files of its own, so it writes into a folder beside, and only the
    # weight files move.
    with torch.random.fork_rng(), tempfile.TemporaryDirectory(dir=folder.parent) as tmp:
        torch.manual_seed(seed)
        config = Blip2Config.from_pretrained(folder)
        with torch.device(device):
            if checkpoint.retrieval:
                model: Any = Blip2ForImageTextRetrieval(config)
                with torch.no_grad():
                    model.query_tokens.normal_(std=config.initializer_range)
            else:
                model = Blip2ForConditionalGeneration(config)
        model.to(dtype)  # (Any: mypy takes transformers' `to` wrapper for a method of another class)
        model.save_pretrained(tmp, safe_serialization=True)
        for file in Path(tmp).glob("model*.safetensors*"):
            shutil.move(str(file), folder / file.name)
    return folder


def _config(config: dict[str, Any], checkpoint: Checkpoint, full_size: bool) -> dict[str, Any]:
    """The checkpoint's config.json as a dictionary: the recorded one with the checkpoint's differences, and the twin's
    sizes unless `full_size`."""
    if checkpoint.image_size:
        config["vision_config"] = config["vision_config"] | {"image_size": checkpoint.image_size}
    if not full_size:
        for section in ("vision_config", "qformer_config"):
            config[section] = config[section] | TWIN_SIZES[section]
    if checkpoint.retrieval:  # no language model
        return config
    text = config["text_config"] | checkpoint.text
    if checkpoint.old_style:
        config.pop("image_token_index")
        text.pop("vocab_size")
    if not full_size:
        text |= TWIN_SIZES[text["model_type"]]
    return config | {"text_config": text}


def _without_image_token(tokenizer: dict[str, Any]) -> dict[str, Any]:
    """A tokenizer file (tokenizer.json or tokenizer_config.json) without its `<image>` entry, as before the update."""
    if "added_tokens" in tokenizer:
        tokenizer["added_tokens"] = [t for t in tokenizer["added_tokens"] if t["content"] != "<image>"]
    if "added_tokens_decoder" in tokenizer:
        decoder = tokenizer["added_tokens_decoder"]
        tokenizer["added_tokens_decoder"] = {k: v for k, v in decoder.items() if v["content"] != "<image>"}
    return tokenizer


def _edit_json(path: Path, edit: Any) -> None:
    path.write_text(json.dumps(edit(json.loads(path.read_text())), indent=2, ensure_ascii=False) + "\n")
