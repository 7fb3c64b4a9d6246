"""Load test of `captune serve` on 127.0.0.1 with the tiny model: latency, throughput and the server's memory under
concurrent clients. Bounded in requests and in time; it stops the server and itself.

    .venv/bin/python benchmarks/load_test.py                     # 500 requests at 32 clients, after 100 at 1 client
    .venv/bin/python benchmarks/load_test.py --requests 200 --concurrency 8 --output /tmp/load.json

1. The tiny BLIP-2 (random weights, default LoRA, greedy 1-5 new tokens) is saved as `captune train` saves a model,
   in a temporary folder.
2. `captune serve` starts as a subprocess on a free port of 127.0.0.1 with its default limits and batching (torch on
   one thread: OMP_NUM_THREADS=1, as for the tiny model everywhere), except `--max-connections-per-client`, which is
   the total `--max-connections` (256: every client is 127.0.0.1, as behind a proxy), and the script waits for
   /health.
3. Warm-up, then the baseline: `--baseline-requests` one after another (concurrency 1). Then the load:
   `--requests` requests from `--concurrency` concurrent clients (httpx2, asyncio), each a multipart upload of one
   224 x 224 JPEG (16 distinct images).
4. After each answer the server's RSS is read (psutil); the mean over the first and the last 100 answers of the
   load phase shows whether memory stays flat.
5. SIGTERM stops the server (graceful); its exit status is recorded. `--max-seconds` bounds the whole run.

Results go to benchmarks/results/serve-load-cpu.json with this command and the machine; the exit status is 1 if any
request failed or the server did not exit cleanly.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import io
import json
import os
import platform
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx2
import numpy as np
import psutil
import torch
from PIL import Image

from captune.model_dir import save_tiny_model_dir
from captune.serve import ServeSettings

RESULTS = Path(__file__).parent / "results" / "serve-load-cpu.json"


@dataclass
class Phase:
    """What the clients saw in one phase."""

    latencies_s: list[float] = field(default_factory=list)
    statuses: dict[str, int] = field(default_factory=dict)
    batch_images: list[int] = field(default_factory=list)
    rss_mib: list[float] = field(default_factory=list)
    seconds: float = 0.0


def _save_tiny_model(root: Path) -> Path:
    return save_tiny_model_dir(root, ["num_beams=1", "min_new_tokens=1", "max_new_tokens=5"])


def _images(count: int) -> list[bytes]:
    """Seeded smooth-noise 224 x 224 JPEGs (~10 KB), so each request's decode costs what a small photo costs."""
    rng = np.random.default_rng(0)
    images = []
    for _ in range(count):
        small = rng.integers(0, 256, (14, 14, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(small).resize((224, 224), Image.Resampling.BICUBIC).save(buffer, "JPEG", quality=90)
        images.append(buffer.getvalue())
    return images


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_healthy(url: str, process: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"captune serve exited with status {process.returncode} before answering")
        try:
            if httpx2.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx2.TransportError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"captune serve did not answer /health within {timeout:.0f} s")


async def _run_phase(url: str, images: list[bytes], requests: int, concurrency: int, server: psutil.Process,
                     deadline: float) -> Phase:  # fmt: skip
    """`requests` uploads from `concurrency` clients; each client takes the next request number until none is left."""
    phase = Phase()
    numbers = iter(range(requests))
    limits = httpx2.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx2.AsyncClient(base_url=url, limits=limits, timeout=60) as client:

        async def one_client() -> None:
            for number in numbers:
                if time.monotonic() > deadline:
                    phase.statuses["not sent (time limit)"] = phase.statuses.get("not sent (time limit)", 0) + 1
                    continue
                files = {"images": (f"{number}.jpg", images[number % len(images)], "image/jpeg")}
                started = time.perf_counter()
                try:
                    response = await client.post("/v1/captions", files=files)
                    status = str(response.status_code)
                    if response.status_code == 200:
                        phase.batch_images.append(response.json()["timing"]["batch_images"])
                except httpx2.HTTPError as err:
                    status = type(err).__name__
                phase.latencies_s.append(time.perf_counter() - started)
                phase.statuses[status] = phase.statuses.get(status, 0) + 1
                phase.rss_mib.append(server.memory_info().rss / 2**20)

        started = time.perf_counter()
        await asyncio.gather(*(one_client() for _ in range(concurrency)))
        phase.seconds = time.perf_counter() - started
    return phase


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def _summary(phase: Phase, concurrency: int) -> dict[str, Any]:
    ok = phase.statuses.get("200", 0)
    ms = [1000 * s for s in phase.latencies_s]
    window = min(100, len(phase.rss_mib))
    first, last = phase.rss_mib[:window], phase.rss_mib[-window:]
    return {
        "requests": len(phase.latencies_s),
        "concurrency": concurrency,
        "ok": ok,
        "failures": sum(phase.statuses.values()) - ok,
        "statuses": phase.statuses,
        "seconds": round(phase.seconds, 3),
        "requests_per_s": round(ok / phase.seconds, 1) if phase.seconds else None,
        "latency_ms": {
            name: round(_percentile(ms, q), 1) for name, q in (("p50", 50), ("p90", 90), ("p99", 99), ("max", 100))
        },  # fmt: skip
        "mean_images_per_generate_call": round(statistics.fmean(phase.batch_images), 2) if phase.batch_images else None,
        "server_rss_mib": {
            f"mean_first_{window}": round(statistics.fmean(first), 1) if first else None,
            f"mean_last_{window}": round(statistics.fmean(last), 1) if last else None,
            "max": round(max(phase.rss_mib), 1) if phase.rss_mib else None,
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=500, help="requests of the load phase")
    parser.add_argument("--concurrency", type=int, default=32, help="concurrent clients of the load phase")
    parser.add_argument("--baseline-requests", type=int, default=100, help="requests one at a time, before the load")
    parser.add_argument("--max-seconds", type=float, default=300, help="the whole run stops sending after this")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    run_deadline = time.monotonic() + args.max_seconds

    with tempfile.TemporaryDirectory(prefix="captune-load-") as tmp:
        model_dir = _save_tiny_model(Path(tmp))
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        # Every client is 127.0.0.1, as behind a proxy: the per-client connection limit is the total one.
        command = [sys.executable, "-m", "captune.cli", "serve", "--model-dir", str(model_dir), "--port", str(port),
                   "--device", "cpu", "--max-connections-per-client", str(ServeSettings.max_connections)]  # fmt: skip
        env = os.environ | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        with open(Path(tmp) / "serve.log", "wb") as log:
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            _wait_healthy(url, process, timeout=120)
            server = psutil.Process(process.pid)
            images = _images(16)
            asyncio.run(_run_phase(url, images, 20, 4, server, run_deadline))  # warm-up: first calls, allocator
            baseline = asyncio.run(_run_phase(url, images, args.baseline_requests, 1, server, run_deadline))
            loaded = asyncio.run(_run_phase(url, images, args.requests, args.concurrency, server, run_deadline))
            limits = httpx2.get(f"{url}/v1/model").json()["limits"]
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                exit_status = process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                exit_status = process.wait()
        log_text = (Path(tmp) / "serve.log").read_text(errors="replace")

    result: dict[str, Any] = {
        "what": "captune serve with the tiny model on the CPU: one-image multipart requests over 127.0.0.1",
        "command": shlex.join(
            [".venv/bin/python", "benchmarks/load_test.py", *(argv if argv is not None else sys.argv[1:])]
        ),
        "server": {
            "command": f"captune serve --model-dir TINY --device cpu --max-connections-per-client "
            f"{ServeSettings.max_connections} (OMP_NUM_THREADS=1)",
            "limits": limits,
            "exit_status_after_sigterm": exit_status,
            "tracebacks_in_log": log_text.count("Traceback"),
        },  # fmt: skip
        "baseline": _summary(baseline, 1),
        "load": _summary(loaded, args.concurrency),
        "machine": {
            "nproc": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "platform": platform.platform(),
            "load_average_at_end": round(os.getloadavg()[0], 2),
        },
        "date": datetime.date.today().isoformat(),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("baseline", "load")}, indent=2))
    print(f"written to {args.output}")
    clean = exit_status == 0 and result["server"]["tracebacks_in_log"] == 0
    return 0 if result["load"]["failures"] == 0 and result["baseline"]["failures"] == 0 and clean else 1


if __name__ == "__main__":
    sys.exit(main())
