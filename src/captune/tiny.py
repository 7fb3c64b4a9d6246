"""The built-in tiny BLIP-2s, `tiny` (OPT), `tiny-vqa` (OPT, knowing the synthetic questions' words) and `tiny-t5`
(T5): their word-level tokenizer and processor, and a
`Blip2Config` of the real architecture at hidden sizes 32-64, built in code, nothing to download
(`captune.model.build_tiny` gives them random weights)."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import Blip2Config, Blip2Processor, BlipImageProcessorPil, PreTrainedTokenizerFast
from transformers.models.blip_2.modeling_blip_2 import Blip2ForConditionalGeneration, Blip2ForImageTextRetrieval

TINY = "tiny"
TINY_T5 = "tiny-t5"
TINY_VQA = "tiny-vqa"
TINY_MODELS = (TINY, TINY_T5, TINY_VQA)
"""Built-in random BLIP-2s for tests and the demos: `tiny` (OPT language model, as blip2-opt), `tiny-t5` (T5
encoder-decoder, as blip2-flan-t5) and `tiny-vqa` (`tiny` with `VQA_WORDS` in its tokenizer, for `captune demo
--task vqa`), with small word-level tokenizers whose special tokens are self-consistent."""

INIT_STD = 0.1
"""The tiny models' ViT and Q-Former weights are drawn at std 0.1, not at their configs' defaults (BLIP-2's ViT:
1e-10, Q-Former: 0.02). At 1e-10 a random ViT's patch embeddings are far below its layer norms' epsilon, so its
output hardly depends on the image at all, and a captioner fine-tuned on the synthetic set named the wrong shape or
position in many held-out captions (CIDEr 2.1 after, benchmarks/LOG.md); at 0.02 a random 2-layer Q-Former gives
every image nearly the same output (cosine 0.99999 in the retrieval model)."""
POSITION_STD = 1.0
"""The tiny ViT's position embeddings are drawn at std 1, not `INIT_STD`: at 0.1 they are a tenth of the patch
embeddings (std ~1.4), the Q-Former's cross-attention barely sees where a patch is, and after fine-tuning the
retrieval model's caption position matched the best image's in 33% of val captions (chance: 25%); at 1.0, in 82% (8
epochs of the synthetic set, benchmarks/LOG.md)."""
PATCH_SIZE = 4
"""The tiny captioners' ViT patch size: 4 px, an 8 x 8 grid over their 32-px images, so a drawn shape spans several
patches. With 8-px patches (a 4 x 4 grid) a small shape sat inside one patch; the demo's held-out captions named
the right shape in 41% (chance 33%), against 51% with 4-px patches (8 epochs, benchmarks/LOG.md)."""
QUERY_STD = 0.02
"""The tiny models' query tokens are drawn at std 0.02 (BLIP-2's own initialisation in LAVIS): transformers starts
them at zero, which makes every query the same."""


def draw_tiny_inputs(model: Blip2ForConditionalGeneration | Blip2ForImageTextRetrieval) -> None:
    """Draws a tiny model's query tokens (`QUERY_STD`) and ViT position embeddings (`POSITION_STD`) in place, from
    torch's current random state."""
    with torch.no_grad():
        model.query_tokens.normal_(std=QUERY_STD)
        model.vision_model.embeddings.position_embedding.normal_(std=POSITION_STD)  # type: ignore[union-attr,operator]


# The tiny tokenizer's words: exactly those of the built-in synthetic captions. The tiny model's output layer is
# random, so every extra word is one more logit training has to push down; other text maps to <unk>.
TINY_WORDS = (
    "a at bottom blue circle green in is large left of on picture red right small square the there top triangle yellow"
).split()
VQA_WORDS = (
    "what",
    "colour",
    "which",
    "shape",
    "it",
    "where",
    "how",
    "big",
    "yes",
    "no",
    "?",
    "Question",
    "Answer",
    ":",
)
"""The words of the synthetic questions (`captune.data.synthetic.QUESTIONS`), of the VQA prompt (`Question: {}
Answer:`) and the yes/no answers, which `tiny-vqa`'s tokenizer has besides `TINY_WORDS`: with `tiny`'s they are all
<unk>, so the questions differ only in their few caption words and no yes/no answer can be said (held-out VQA
accuracy 34.4% against 95.8%, benchmarks/LOG.md)."""
VOCABULARIES = {TINY: tuple(TINY_WORDS), TINY_T5: tuple(TINY_WORDS), TINY_VQA: (*TINY_WORDS, *VQA_WORDS)}
"""Each built-in tiny model's tokenizer words (`build_tiny_processor`'s `words`)."""


def build_tiny_processor(
    num_query_tokens: int = 8, image_size: int = 32, t5: bool = False, words: tuple[str, ...] = tuple(TINY_WORDS)
) -> Blip2Processor:
    """A word-level tokenizer of `words` built locally with `tokenizers` and a PIL image processor; `Blip2Processor`
    adds the `<image>` token itself. OPT-like: `</s>` is BOS and EOS and starts every text; T5-like (`t5`): pad 0,
    `</s>` 1 ends every text, no BOS."""
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2} if t5 else {"<pad>": 0, "<unk>": 1, "</s>": 2}
    for word in words:
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    template = "$A </s>" if t5 else "</s> $A"
    backend.post_processor = processors.TemplateProcessing(single=template, special_tokens=[("</s>", vocab["</s>"])])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=None if t5 else "</s>", eos_token="</s>", pad_token="<pad>",
        unk_token="<unk>",
    )  # fmt: skip
    image_processor = BlipImageProcessorPil(size={"height": image_size, "width": image_size})
    return Blip2Processor(image_processor, tokenizer, num_query_tokens=num_query_tokens)


def tiny_config(processor: Blip2Processor, image_size: int = 32, t5: bool = False) -> Blip2Config:
    """A BLIP-2 of the real architecture (ViT, Q-Former, OPT or T5) at hidden sizes 32-64: ~0.1 M parameters."""
    tokenizer = processor.tokenizer
    opt = {
        "model_type": "opt",
        "hidden_size": 64,
        "ffn_dim": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "word_embed_proj_dim": 64,
        "max_position_embeddings": 128,
        "bos_token_id": tokenizer.bos_token_id,
    }
    t5_text = {
        "model_type": "t5",
        "d_model": 64,
        "d_kv": 16,
        "d_ff": 128,
        "num_layers": 2,
        "num_decoder_layers": 2,
        "num_heads": 4,
        "relative_attention_num_buckets": 8,
        "decoder_start_token_id": tokenizer.pad_token_id,
        "tie_word_embeddings": False,
    }
    return Blip2Config(
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": image_size,
            "patch_size": PATCH_SIZE,
            "initializer_range": INIT_STD,
        },
        qformer_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "encoder_hidden_size": 32,
            "vocab_size": 64,
            "max_position_embeddings": 64,
            "initializer_range": INIT_STD,
        },
        text_config={
            **(t5_text if t5 else opt),
            "vocab_size": len(tokenizer),
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        num_query_tokens=processor.num_query_tokens,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
    )
