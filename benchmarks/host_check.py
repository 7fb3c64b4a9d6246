"""The image processor's time on this host, before and after compiling with CUDA graphs in the same process (the
single-caption timelines of session 8 showed its share at 2 to 24 ms between processes), with the CPU's load and
PyTorch's threads. No model needed.

    python benchmarks/host_check.py --output OUT.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import BlipImageProcessorPil


def processor_ms(processor: Any, image: Image.Image, calls: int = 40) -> dict[str, float]:
    """Median and p90 milliseconds of the image processor on one image."""
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        processor([image], return_tensors="pt")
        times.append(1000 * (time.perf_counter() - start))
    times.sort()
    return {"median_ms": statistics.median(times), "p90_ms": times[int(0.9 * len(times))], "max_ms": times[-1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args()
    processor = BlipImageProcessorPil(size={"height": 384, "width": 384})
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (480, 640, 3), dtype=np.uint8))
    out: dict[str, Any] = {"cpu": platform.processor(), "cpus": os.cpu_count(),
                           "torch_threads": torch.get_num_threads(), "load_before": os.getloadavg()}  # fmt: skip
    out["before_cuda"] = processor_ms(processor, image)
    model = torch.nn.Sequential(*[torch.nn.Linear(2048, 2048) for _ in range(8)]).cuda().half()
    compiled = torch.compile(model, mode="reduce-overhead")
    x = torch.randn(1, 2048, device="cuda", dtype=torch.half)
    start = time.perf_counter()
    for _ in range(5):
        compiled(x)
    torch.cuda.synchronize()
    out["compile_seconds"] = time.perf_counter() - start
    out["after_compile"] = processor_ms(processor, image)
    torch.set_num_threads(1)
    out["after_compile_one_thread"] = processor_ms(processor, image)
    torch.set_num_threads(out["torch_threads"])
    time.sleep(5)
    out["after_compile_5s_later"] = processor_ms(processor, image)
    out["load_after"] = os.getloadavg()
    print(json.dumps(out, indent=1))
    args.output.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
