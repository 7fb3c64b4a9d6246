"""Where a profiled call's GPU waits: reads a Chrome trace (`caption_throughput.py --latency-only --trace`) and prints
the GPU's busy and idle time, its longest idle gaps with what the host was doing meanwhile, and the kernels by name.

    python benchmarks/trace_gaps.py TRACE.json.gz [--gaps 15] [--kernels 40] [--output SUMMARY.json]
"""

from __future__ import annotations

import argparse
import gzip
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

GPU_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")
HOST_CATEGORIES = ("cpu_op", "user_annotation", "python_function", "cuda_runtime", "cuda_driver")


def load(path: Path) -> list[dict[str, Any]]:
    """The trace's complete events (phase X) with a duration."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as handle:
        data = json.load(handle)
    events = data["traceEvents"] if isinstance(data, dict) else data
    return [e for e in events if e.get("ph") == "X" and "dur" in e]


def busy_intervals(kernels: list[dict[str, Any]]) -> list[tuple[float, float]]:
    """The union of the GPU events' [start, end) intervals, in order."""
    merged: list[list[float]] = []
    for event in sorted(kernels, key=lambda e: e["ts"]):
        start, end = float(event["ts"]), float(event["ts"]) + float(event["dur"])
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(a, b) for a, b in merged]


def summarize(events: list[dict[str, Any]], gaps: int = 15, kernels: int = 40) -> dict[str, Any]:
    """Busy and idle GPU time over the span of the GPU's work, the `gaps` longest idle gaps (with the host operators
    that began in each, longest first), and the `kernels` names with the most GPU time (count, total and mean us)."""
    gpu = [e for e in events if e.get("cat") in GPU_CATEGORIES]
    host = [e for e in events if e.get("cat") in HOST_CATEGORIES]
    if not gpu:
        raise SystemExit("no GPU events in this trace (profiled on a CPU?)")
    intervals = busy_intervals(gpu)
    begin, end = intervals[0][0], intervals[-1][1]
    busy = sum(b - a for a, b in intervals)
    idle = [(b0, a1) for (_, b0), (a1, _) in zip(intervals, intervals[1:], strict=False)]
    longest = sorted(idle, key=lambda gap: gap[0] - gap[1])[:gaps]
    out: dict[str, Any] = {
        "gpu_span_us": end - begin,
        "gpu_busy_us": busy,
        "gpu_idle_us": end - begin - busy,
        "host_span_us": (max(e["ts"] + e["dur"] for e in host) - min(e["ts"] for e in host)) if host else None,
        "gaps": [],
    }
    for start, stop in sorted(longest):
        during = sorted((e for e in host if start <= e["ts"] < stop), key=lambda e: -e["dur"])
        out["gaps"].append({
            "at_us": start - begin,
            "idle_us": stop - start,
            "host_ops": [f"{e['name'][:70]} ({e['dur']:.0f} us)" for e in during[:6]],
        })  # fmt: skip
    by_name: dict[str, list[float]] = defaultdict(list)
    for event in gpu:
        by_name[event["name"][:90]].append(float(event["dur"]))
    top = sorted(by_name.items(), key=lambda item: -sum(item[1]))[:kernels]
    out["kernels"] = [
        {"name": name, "count": len(durations), "total_us": sum(durations), "mean_us": sum(durations) / len(durations)}
        for name, durations in top
    ]
    out["kernel_count"] = len(gpu)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trace", type=Path)
    parser.add_argument("--gaps", type=int, default=15)
    parser.add_argument("--kernels", type=int, default=40)
    parser.add_argument("--output", type=Path)
    args = parser.parse_args(argv)
    out = summarize(load(args.trace), args.gaps, args.kernels)
    print(f"GPU span {out['gpu_span_us'] / 1000:.2f} ms: busy {out['gpu_busy_us'] / 1000:.2f}, idle "
          f"{out['gpu_idle_us'] / 1000:.2f}; host span {(out['host_span_us'] or 0) / 1000:.2f} ms; "
          f"{out['kernel_count']} GPU events")  # fmt: skip
    for gap in out["gaps"]:
        print(f"  idle {gap['idle_us']:8.0f} us at {gap['at_us'] / 1000:7.2f} ms; host: {'; '.join(gap['host_ops'])}")
    for kernel in out["kernels"]:
        print(f"  {kernel['total_us']:9.0f} us {kernel['count']:6d} x {kernel['mean_us']:7.2f}  {kernel['name']}")
    if args.output:
        args.output.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
