"""Build a full-size BLIP-2 architecture from its config with random weights, saved as a model directory.

    python benchmarks/random_blip2.py --arch opt-2.7b --output /tmp/blip2-opt-2.7b-random

No weights can be downloaded on the benchmark machines, and the compute of a forward/backward pass does not depend on
the weights' values, so speed and memory measured on this model are those of the real `Salesforce/blip2-opt-2.7b`
(captions and metrics are not: the weights are random). The tokenizer is built locally with `tokenizers`: a word-level
vocabulary padded to OPT's size, with OPT's special-token ids, so embedding and output layers have the real shapes.
The directory loads through captune's normal path: `captune train model.name=/tmp/blip2-opt-2.7b-random`.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2Processor,
    BlipImageProcessorPil,
    PreTrainedTokenizerFast,
)

from captune.model import TINY_WORDS

# The text side of the public blip2-opt-2.7b config (OPT-2.7B); vision (ViT-g, 39 layers) and Q-Former
# (12 layers, cross-attention every 2nd) are Blip2Config's defaults, which are those of the released checkpoints.
ARCHITECTURES = {
    "opt-2.7b": {
        "model_type": "opt",
        "hidden_size": 2560,
        "ffn_dim": 10240,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "word_embed_proj_dim": 2560,
        "max_position_embeddings": 2048,
        "vocab_size": 50272,
        "bos_token_id": 2,
        "eos_token_id": 2,
        "pad_token_id": 1,
    },
}
# blip2-opt-6.7b: the same image side, OPT-6.7B (the public facebook/opt-6.7b config).
ARCHITECTURES["opt-6.7b"] = ARCHITECTURES["opt-2.7b"] | {
    "hidden_size": 4096,
    "ffn_dim": 16384,
    "word_embed_proj_dim": 4096,
}
# blip2-flan-t5-xl: the same image side, Flan-T5-XL (the public google/flan-t5-xl config).
ARCHITECTURES["flan-t5-xl"] = {
    "model_type": "t5",
    "d_model": 2048,
    "d_kv": 64,
    "d_ff": 5120,
    "num_layers": 24,
    "num_decoder_layers": 24,
    "num_heads": 32,
    "feed_forward_proj": "gated-gelu",
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "layer_norm_epsilon": 1e-6,
    "vocab_size": 32128,
    "tie_word_embeddings": False,
    "decoder_start_token_id": 0,
    "pad_token_id": 0,
    "eos_token_id": 1,
}
OPT_TEXT_VOCAB = 50265  # ids 0..50264; <image> becomes 50265, as in the released processor
T5_TEXT_VOCAB = 32100  # ids 0..32099 (with T5's 100 sentinels); <image> becomes 32100


def build_processor(t5: bool = False) -> Blip2Processor:
    """The synthetic captions' words between the real special ids and filler up to the real vocabulary size. OPT:
    <s> 0, <pad> 1, </s> 2 (BOS and EOS, starts every text), <unk> 3. T5: <pad> 0, </s> 1 (ends every text), <unk> 2."""
    specials = {"<pad>": 0, "</s>": 1, "<unk>": 2} if t5 else {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    vocab = dict(specials)
    for word in TINY_WORDS:
        vocab.setdefault(word, len(vocab))
    while len(vocab) < (T5_TEXT_VOCAB if t5 else OPT_TEXT_VOCAB):
        vocab[f"<filler{len(vocab)}>"] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    template = "$A </s>" if t5 else "</s> $A"
    backend.post_processor = processors.TemplateProcessing(single=template, special_tokens=[("</s>", vocab["</s>"])])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=None if t5 else "</s>", eos_token="</s>", pad_token="<pad>",
        unk_token="<unk>",
    )  # fmt: skip
    return Blip2Processor(BlipImageProcessorPil(size={"height": 224, "width": 224}), tokenizer, num_query_tokens=32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", choices=sorted(ARCHITECTURES), default="opt-2.7b")
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args()
    start = time.perf_counter()
    processor = build_processor(t5=ARCHITECTURES[args.arch]["model_type"] == "t5")
    image_token = processor.tokenizer.convert_tokens_to_ids("<image>")
    config = Blip2Config(text_config=ARCHITECTURES[args.arch], num_query_tokens=32, image_token_index=image_token)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(device):
        model = Blip2ForConditionalGeneration(config).to(torch.bfloat16)
    model.save_pretrained(args.output, safe_serialization=True)
    processor.save_pretrained(args.output)
    sizes = {name: sum(p.numel() for p in getattr(model, name).parameters()) / 1e9
             for name in ("vision_model", "qformer", "language_model")}  # fmt: skip
    print(f"saved {args.arch} ({', '.join(f'{k} {v:.2f} B' for k, v in sizes.items())}) to {args.output} "
          f"in {time.perf_counter() - start:.0f} s")  # fmt: skip


if __name__ == "__main__":
    main()
