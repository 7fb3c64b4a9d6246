"""The decode step's matrix-vector products alone: cuBLAS (`F.linear`, what the compiled step calls; also through
cuBLASLt, and as cuBLAS's matrix-vector `addmv`) against the compiler's float32 reduction (`linears._gemv`,
inductor's own reduction configs, and with its coordinate descent tuning) on OPT-2.7B's shapes, a few rows. Each
variant is replayed in a CUDA graph of 20 calls (launch cost as in the decode step's graph); microseconds a call and
the weight bytes read per second.

    PYTHONPATH=src python benchmarks/gemv_kernels.py --output OUT.json [--rows 1,2,4]
"""

from __future__ import annotations

import argparse
import functools
import json
import shlex
import statistics
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from captune.generation.static.linears import _gemv

SHAPES = {  # name: (in features, out features, bias) of OPT-2.7B's decoder layer and LM head
    "qkv (fused)": (2560, 7680, True),
    "out_proj": (2560, 2560, True),
    "fc1": (2560, 10240, True),
    "fc2": (10240, 2560, True),
    "lm_head": (2560, 50272, False),
}


def graph_time(works: list[Any], calls: int = 20, replays: int = 30) -> float:
    """Microseconds a call, from replays of a CUDA graph of `calls` calls taking `works` in turn (median replay)."""
    calls = max(calls, len(works))
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for work in works:
            work()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            works[i % len(works)]()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000 / calls)
    return statistics.median(times)


def variants(relu: bool) -> dict[str, Any]:
    """The products compared, each a function of (x, weight, bias); `relu` as fc1's activation after it."""
    after = F.relu if relu else (lambda t: t)

    def cublas(x: Any, w: Any, b: Any) -> Any:
        return after(F.linear(x, w, b))

    def reduction(x: Any, w: Any, b: Any) -> Any:
        return after(_gemv(x, w, b))

    def cublaslt(x: Any, w: Any, b: Any) -> Any:  # the same product through cuBLASLt (PyTorch's other BLAS backend)
        torch.backends.cuda.preferred_blas_library("cublaslt")
        try:
            return after(F.linear(x, w, b))
        finally:
            torch.backends.cuda.preferred_blas_library("cublas")

    def matrix_vector(x: Any, w: Any, b: Any) -> Any:  # cuBLAS's GEMV (addmv) instead of a GEMM of one row
        out = torch.stack([torch.mv(w, row) for row in x]) if b is None else torch.stack(
            [torch.addmv(b, w, row) for row in x])  # fmt: skip
        return after(out)

    return {
        "cublas": cublas,
        "cublas_compiled": cublas,
        "cublaslt": cublaslt,
        "cublas_gemv": matrix_vector,
        "reduction": reduction,
        "reduction_coordinate_descent": reduction,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--rows", default="1")
    args = parser.parse_args(argv)
    import torch._inductor.config as inductor

    result: dict[str, Any] = {
        "what": __doc__.splitlines()[0],
        "command": shlex.join(["python", "benchmarks/gemv_kernels.py", *(argv or sys.argv[1:])]),
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "dtype": "bfloat16",
        "us_per_call": {},
    }
    for rows in map(int, args.rows.split(",")):
        for name, (k, n, bias) in SHAPES.items():
            x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
            w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5
            # copies of the weight, taken in turn, over 200 MB: each call reads it from memory, not from the 50 MB L2
            # (as in the decode step, which reads 5.3 GB of weights; a first run here, with one copy, read the
            # smaller matrices out of L2 faster than memory can)
            weights = [w] + [w.clone() for _ in range(-(-200_000_000 // (2 * n * k)) - 1)]
            b = torch.randn(n, device="cuda", dtype=torch.bfloat16) if bias else None
            reference = F.linear(x.float(), w.float(), None if b is None else b.float())
            row: dict[str, Any] = {}
            for variant, function in variants(name == "fc1").items():
                torch._dynamo.reset()
                if variant not in ("cublas", "cublaslt", "cublas_gemv"):
                    with inductor.patch(coordinate_descent_tuning=variant.endswith("coordinate_descent")):
                        function = torch.compile(function, fullgraph=True, dynamic=False)
                        function(x, w, b)  # compiles (and tunes) here
                out = function(x, w, b)
                us = graph_time([functools.partial(function, x, copy, b) for copy in weights])
                error = (out.float() - (F.relu(reference) if name == "fc1" else reference)).abs().max().item()
                row[variant] = {"us": us, "weight_tb_per_s": n * k * 2 / us / 1e6, "max_abs_error": error}
            result["us_per_call"][f"{name}, rows {rows}"] = row
            print(f"rows {rows} {name:12s} " + "  ".join(f"{v} {r['us']:.2f} us ({r['weight_tb_per_s']:.2f} TB/s)"
                                                         for v, r in row.items()), flush=True)  # fmt: skip
            args.output.parent.mkdir(parents=True, exist_ok=True)
            args.output.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
