"""On a GPU: captune's static loops (compiled step, graphed step, compiled prefill and image side) answer batches of
mixed-length questions (one prompt per row, left-padded) with plain `generate`'s tokens. Not a speed benchmark: a
correctness check of the GPU-only code (tests/generation/static/test_prompts.py runs the same loops uncompiled on the
CPU). Prints the share of identical answers per case and exits 1 if one differs.

    PYTHONPATH=src python benchmarks/answer_check.py --model-dir DIR [--dtype fp32] [--output OUT.json]
    PYTHONPATH=src python benchmarks/answer_check.py --tiny        (or --twin: the OPT twin of blip2-opt-2.7b)

Cases: greedy and beam 3 at 4 images (the compiled step, <= StaticOptions.compiled_step_up_to rows) and at 64 images
(GraphedStep), through `generate_from_pixels`; and the bulk path (`caption_paths`: per-row prompts padded to the run's
longest, each image's side computed once for its several questions) against plain `generate` on the same files.
Compare in float32 (the default) for exact equality; bf16 answers may differ where two tokens nearly tie.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
from PIL import Image

from captune.config import GenerateConfig
from captune.generation.core import generate_from_pixels
from captune.generation.files import caption_paths
from captune.model import LoadedModel, load_base
from captune.model_dir import load_model_dir

QUESTIONS = [
    "what colour is it?",
    "which shape is in the picture, and is it large or small compared with the whole image?",
    "where?",
    "is there a circle?",
    "how many objects are there on the left side of the image?",
    "what is this?",
    "is it big?",
    "what colour is the shape at the top right corner of the picture?",
]
"""Questions of 1 to 17 words, cycled over the rows: every batch mixes lengths."""
TEMPLATE = "Question: {} Answer:"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _pixels(loaded: LoadedModel, count: int, dtype: torch.dtype) -> torch.Tensor:
    size = loaded.processor.image_processor.size
    generator = torch.Generator().manual_seed(count)
    return torch.randn(count, 3, size["height"], size["width"], generator=generator).to("cuda", dtype)


def _prompts(count: int, offset: int = 0) -> list[str]:
    return [TEMPLATE.format(QUESTIONS[(i + offset) % len(QUESTIONS)]) for i in range(count)]


def _share(ours: list[str], plain: list[str]) -> float:
    return sum(a == b for a, b in zip(ours, plain, strict=True)) / len(plain)


def batch_cases(loaded: LoadedModel, dtype: torch.dtype) -> dict[str, float]:
    """Share of identical answers, static loops against `generate`, per batch size and beam width."""
    shares: dict[str, float] = {}
    for images in (4, 64):
        for beams in (1, 3):
            pixels, prompts = _pixels(loaded, images, dtype), _prompts(images)
            plain = GenerateConfig(num_beams=beams, min_new_tokens=1, max_new_tokens=5, static_cache=False)
            static = GenerateConfig(num_beams=beams, min_new_tokens=1, max_new_tokens=5, static_cache=True)
            expected = generate_from_pixels(loaded.model, loaded.processor, pixels, plain, prompts)
            for call in ("first", "second"):  # the second replays the graphs recorded by the first
                ours = generate_from_pixels(loaded.model, loaded.processor, pixels, static, prompts)
                shares[f"images={images} beams={beams} {call} call"] = _share(ours, expected)
    return shares


def bulk_case(loaded: LoadedModel, dtype: torch.dtype) -> dict[str, float]:
    """`caption_paths` with three questions an image (static loops, batches of 48 rows) against `generate`."""
    shares: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as folder:
        files = []
        for i in range(40):
            generator = torch.Generator().manual_seed(i)
            array = torch.randint(0, 256, (96, 128, 3), generator=generator, dtype=torch.uint8).numpy()
            files.append(Path(folder) / f"{i}.png")
            Image.fromarray(array).save(files[-1])
        paths = [p for p in files for _ in range(3)]
        prompts = _prompts(len(paths), offset=1)
        for beams in (1, 3):
            options = GenerateConfig(num_beams=beams, min_new_tokens=1, max_new_tokens=5, batch_size=48)
            plain = [r.caption for r in caption_paths(loaded.model, loaded.processor, paths,
                                                      GenerateConfig(**{**vars(options), "static_cache": False}),
                                                      prompts)]  # fmt: skip
            static = GenerateConfig(**{**vars(options), "static_cache": True})
            ours = [r.caption for r in caption_paths(loaded.model, loaded.processor, paths, static, prompts)]
            shares[f"bulk 120 questions on 40 images beams={beams}"] = _share(ours, plain)  # type: ignore[arg-type]
    return shares


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--model-dir", help="a saved model (RUN/best) or a BLIP-2 directory")
    which.add_argument("--tiny", action="store_true", help="the built-in tiny model")
    which.add_argument("--twin", action="store_true", help="the OPT twin of blip2-opt-2.7b (random weights)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--output", type=Path, help="also write the shares here as JSON")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("answer_check.py checks the GPU-only code of the static loops: run it on a machine with a GPU")
    dtype = DTYPES[args.dtype]
    if args.model_dir:
        loaded = load_model_dir(args.model_dir, dtype=dtype, device="cuda")
    else:
        loaded = load_base("tiny" if args.tiny else "twin-blip2-opt-2.7b", dtype=dtype)
        loaded.model.to("cuda")
    loaded.model.eval()
    shares = {**batch_cases(loaded, dtype), **bulk_case(loaded, dtype)}
    for case, share in shares.items():
        print(f"{case:55s} identical {100 * share:6.2f} %")
    if args.output:
        args.output.write_text(json.dumps({"dtype": args.dtype, "shares": shares}, indent=2))
    sys.exit(0 if all(share == 1.0 for share in shares.values()) else 1)


if __name__ == "__main__":
    main()
