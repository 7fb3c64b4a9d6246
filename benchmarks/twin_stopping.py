"""On a GPU: a fine-tuned twin of blip2-opt-2.7b stops its captions at 50118 ("\\n") on every captioning path, the
compiled ones (CUDA graphs) included, and all paths give the same captions. Not a speed benchmark: a correctness
check of the GPU-only code (the tests run the same paths uncompiled on the CPU).

    PYTHONPATH=src python3 benchmarks/twin_stopping.py --work /tmp/twin --output OUT.json

The twin (captune.twins: the checkpoint's tokenizer, ids and config, hidden sizes 32-64, random weights) is
fine-tuned in float32 as tests/test_twins.py does it; captions are compared in float32, where captune's static loops
give `generate`'s tokens.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

from captune.config import GenerateConfig
from captune.config_loading import load_config
from captune.data import read
from captune.data.images import load_rgb
from captune.data.synthetic import SyntheticSpec, generate_synthetic
from captune.generation.core import generate_captions
from captune.generation.files import caption_paths
from captune.generation.inputs import text_inputs
from captune.model import caption_end_id
from captune.model_dir import load_model_dir
from captune.training.recipe import train, trained_model_dir
from captune.twins import learning_overrides


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args()
    data_dir, run_dir = args.work / "data", args.work / "run"
    generate_synthetic(data_dir, SyntheticSpec(train=24, val=6, test=16, seed=1))
    config = load_config(None, ["model.name=twin-blip2-opt-2.7b", "data.format=synthetic", f"data.data_dir={data_dir}",
                                f"train.output_dir={run_dir}", "model.dtype=fp32", "train.validate=false",
                                *learning_overrides("twin-blip2-opt-2.7b")])  # fmt: skip
    start = time.perf_counter()
    train(config)
    trained_s = time.perf_counter() - start
    device = "cuda" if torch.cuda.is_available() else "cpu"  # (the CPU: a dry run of the script)
    loaded = load_model_dir(trained_model_dir(run_dir), dtype=torch.float32, device=device)
    model, processor = loaded.model, loaded.processor
    end = caption_end_id(model, processor.tokenizer)
    paths = [r.image_path for r in read("synthetic", data_dir).split("test")]
    result: dict = {
        "command": shlex.join([sys.executable, *sys.argv]),
        "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor(),
        "versions": {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "transformers": __import__("transformers").__version__,
        },  # fmt: skip
        "end_token": end,
        "train_seconds": round(trained_s, 1),
        "paths": {},
    }
    for beams in (1, 3):
        options = GenerateConfig(num_beams=beams, min_new_tokens=1, max_new_tokens=20, batch_size=8)
        # generate's own ids: did every caption stop at the end token?
        images = [load_rgb(p) for p in paths]
        inputs = text_inputs(model, processor, len(images), "")
        pixels = processor.image_processor(images, return_tensors="pt")["pixel_values"].to(device)
        out = model.generate(**inputs, pixel_values=pixels, num_beams=beams, min_new_tokens=1, max_new_tokens=20)
        new = out[:, inputs["input_ids"].shape[1] :].tolist()
        reference = [" ".join(t.split()) for t in processor.batch_decode(new, skip_special_tokens=True)]
        entry = {"generate_rows_stopped": sum(end in row for row in new), "rows": len(new)}
        for static in (False, True):
            t0 = time.perf_counter()
            chosen = GenerateConfig(**{**vars(options), "static_cache": static})
            captions = [r.caption for r in caption_paths(model, processor, paths, chosen)]
            seconds = round(time.perf_counter() - t0, 2)
            entry[f"static_{static}"] = {"equal_to_generate": captions == reference, "seconds": seconds,
                                         "captions": captions[:4]}  # fmt: skip
        # single images (a server's requests): the compiled image side and prefill, caches held between calls
        static = GenerateConfig(**{**vars(options), "static_cache": True})
        singles = [generate_captions(model, processor, [image], static)[0] for image in images[:4]]
        entry["single_images_static_equal_to_generate"] = singles == reference[:4]
        result["paths"][f"beams_{beams}"] = entry
        print(json.dumps(entry, indent=1), flush=True)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
