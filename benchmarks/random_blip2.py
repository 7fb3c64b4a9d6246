"""Build a full-size BLIP-2 from the recorded hub files of a real checkpoint, with random weights, as a model directory.

    python benchmarks/random_blip2.py --arch opt-2.7b --output /tmp/blip2-opt-2.7b-random

No weights can be downloaded on the benchmark machines, and the compute of a forward/backward pass does not depend on
the weights' values, so speed and memory measured on this model are those of the real `Salesforce/blip2-opt-2.7b`
(captions and metrics are not: the weights are random). Everything but the weights is the checkpoint's own
(captune.twins: its config.json, generation_config.json, tokenizer and processor files as the hub has them), so the
numbers are taken on the real ids: the GPT-2 BPE tokenizer, 50,304 embedding rows, captions ending at token 50118.
The directory loads through captune's normal path: `captune train model.name=/tmp/blip2-opt-2.7b-random`.

    python benchmarks/random_blip2.py --arch itm-vit-g --output /tmp/itm

builds the image-text retrieval model (`Blip2ForImageTextRetrieval`: ViT-g, the Q-Former with its text input, the
projections and matching head; 1.17 B parameters, no language model) from the files captune **reconstructed** for
`Salesforce/blip2-itm-vit-g` (none were recorded; captune/checkpoints/README.md says what is known and what assumed:
the architecture and ids are the checkpoint's, its vocabulary placeholders), for `captune train task=retrieval
model.name=/tmp/itm` and `captune.retrieval.load_retrieval`.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from captune.twins import CHECKPOINTS, write_checkpoint

ARCHITECTURES = {hub_id.removeprefix("Salesforce/blip2-"): hub_id for hub_id in CHECKPOINTS}
"""`--arch` values (opt-2.7b, opt-6.7b, flan-t5-xl, ..., itm-vit-g) by the hub id whose files the model is built
from."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", choices=sorted(ARCHITECTURES), default="opt-2.7b")
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args()
    start = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    write_checkpoint(ARCHITECTURES[args.arch], args.output, full_size=True, dtype=torch.bfloat16, device=device)
    print(f"saved {ARCHITECTURES[args.arch]} (random weights, bf16) to {args.output} in "
          f"{time.perf_counter() - start:.0f} s")  # fmt: skip


if __name__ == "__main__":
    main()
