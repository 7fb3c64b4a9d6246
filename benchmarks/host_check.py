"""The image processor's time on this host, before and after compiling with CUDA graphs in the same process (the single-
caption timelines in results/caption-single-latency-h100-gemv-*.json showed its share at 2 to 24 ms between
processes; results/host-check-h100-image-processor.json), with the CPU's load and PyTorch's threads; then what makes the
host slow (results/host-check-h100-cpu.json): the CPU and kernel it reports, a pure-Python loop, and the small
tensor operations a processor runs (with PyTorch's threads and with one), on memory allocated afresh (page faults at
first touch) and on memory reused, also in a child process whose glibc keeps freed memory instead of unmapping it. No
model needed.

    python benchmarks/host_check.py --output OUT.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import BlipImageProcessorPil


def _times_ms(work: Any, calls: int = 40, warm_up: int = 0) -> list[float]:
    """Milliseconds of `calls` calls of work(), after `warm_up` untimed ones, in order of size."""
    for _ in range(warm_up):
        work()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        work()
        times.append(1000 * (time.perf_counter() - start))
    return sorted(times)


def processor_ms(processor: Any, image: Image.Image, calls: int = 40) -> dict[str, float]:
    """Median and p90 milliseconds of the image processor on one image."""
    times = _times_ms(lambda: processor([image], return_tensors="pt"), calls)
    return {"median_ms": statistics.median(times), "p90_ms": times[int(0.9 * len(times))], "max_ms": times[-1]}


def _median_ms(work: Any, calls: int = 40) -> float:
    return statistics.median(_times_ms(work, calls, warm_up=3))


def host_facts() -> dict[str, Any]:
    """The kernel and CPU as the host reports them (a sandboxed kernel, e.g. gVisor, makes page faults and system
    calls expensive)."""
    facts: dict[str, Any] = {"kernel": platform.release(), "version": Path("/proc/version").read_text().strip()}
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []
    for key in ("model name", "cpu MHz"):
        facts[key] = sorted({line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith(key)})[:4]
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo if line.startswith("flags")), [])
    facts["avx2"], facts["avx512f"] = "avx2" in flags, "avx512f" in flags
    return facts


def micro() -> dict[str, float]:
    """Milliseconds (medians) of a pure-Python loop and of a 3x224x224 float32 image's operations (600 kB), each
    on a fresh output and on one reused: if fresh ones are much slower, the time is the memory's first touch."""
    size = (3, 224, 224)
    pixels = torch.randint(0, 255, size, dtype=torch.uint8)
    floats = pixels.float()
    out = torch.empty(size)
    array = np.empty(size, np.float32)
    return {
        "python_loop_1e6": _median_ms(lambda: sum(range(1_000_000)), calls=10),
        "numpy_ones_fresh": _median_ms(lambda: np.ones(size, np.float32)),
        "numpy_fill_reused": _median_ms(lambda: array.fill(1.0)),
        "torch_to_float_fresh": _median_ms(lambda: pixels.float()),
        "torch_to_float_reused": _median_ms(lambda: out.copy_(pixels)),
        "torch_sub_fresh": _median_ms(lambda: floats - 0.5),
        "torch_sub_reused": _median_ms(lambda: torch.sub(floats, 0.5, out=out)),
        "torch_div_in_place": _median_ms(lambda: out.div_(0.5)),
        "torch_stack_fresh": _median_ms(lambda: torch.stack([floats])),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--micro-only", action="store_true", help="only `micro` (the child process's part)")
    args = parser.parse_args()
    if args.micro_only:
        args.output.write_text(json.dumps(micro(), indent=2) + "\n")
        return
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
    out["host"] = host_facts()
    out["micro"] = micro()
    torch.set_num_threads(1)  # an operation above the grain size (32,768 elements) wakes PyTorch's thread pool
    out["micro_one_thread"] = micro()
    torch.set_num_threads(out["torch_threads"])
    child = args.output.with_suffix(".child.json")  # glibc: never unmap freed memory, never trim the heap
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(2**30), "MALLOC_TRIM_THRESHOLD_": str(2**31)}
    subprocess.run([sys.executable, __file__, "--micro-only", "--output", str(child)], env=env, check=True)
    out["micro_malloc_keeps_memory"] = json.loads(child.read_text())
    child.unlink()
    for name, kind in (("pil_224", "BlipImageProcessorPil"), ("torchvision_224", "BlipImageProcessor")):
        import transformers

        try:
            made = getattr(transformers, kind)(size={"height": 224, "width": 224})
            out[f"processor_{name}"] = {"class": type(made).__name__, **processor_ms(made, image)}
        except Exception as error:  # (torchvision missing or broken: recorded, not fatal)
            out[f"processor_{name}"] = {"error": f"{type(error).__name__}: {error}"}
    print(json.dumps(out, indent=1))
    args.output.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
