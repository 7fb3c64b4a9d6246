"""Load test of `captune serve` on 127.0.0.1 with the tiny model: latency, throughput and the server's memory under
concurrent clients, on the REST API alone and then on the REST API and the web app together. Bounded in requests and
in time; it stops the server and itself.

    .venv/bin/python benchmarks/load_test.py                     # 500 requests at 32 clients, after 100 at 1 client
    .venv/bin/python benchmarks/load_test.py --requests 200 --concurrency 8 --output /tmp/load.json

1. The tiny BLIP-2 (random weights, default LoRA, greedy 1-5 new tokens) is saved as `captune train` saves a model,
   in a temporary folder, and the 16 request images are indexed there with tiny-retrieval (`index_images`).
2. `captune serve --index` starts as a subprocess on a free port of 127.0.0.1 with its default limits and batching
   (torch on one thread: OMP_NUM_THREADS=1, as for the tiny model everywhere), except `--max-connections-per-client`,
   which is the total `--max-connections` (256: every client is 127.0.0.1, as behind a proxy), and the script waits
   for /health.
3. Warm-up, then the baseline: `--baseline-requests` one after another (concurrency 1). Then the load:
   `--requests` requests from `--concurrency` concurrent clients (httpx2, asyncio), each a multipart upload of one
   224 x 224 JPEG (16 distinct images).
4. Together: four groups of `--mixed-concurrency` clients at once, `--mixed-requests` requests each: the REST API's
   `POST /v1/captions` (as in 3), the web app's Caption endpoint over Gradio's HTTP API (upload the file, call
   `/gradio_api/call/caption`, read its event stream: what the page and `gradio_client` do), `POST /v1/search` and the
   app's Search endpoint (each alternating a text query and an image query). Each group is summarised apart.
5. After each answer the server's RSS is read (psutil); the mean over the first and the last 100 answers of the
   load phase shows whether memory stays flat.
6. SIGTERM stops the server (graceful); its exit status is recorded. `--max-seconds` bounds the whole run.

Results go to benchmarks/results/serve-load-cpu.json (`--output`) with this command and the machine; the exit status
is 1 if any request failed or the server did not exit cleanly.
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
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx2
import numpy as np
import psutil
import torch
from PIL import Image

from captune.model_dir import save_tiny_model_dir
from captune.retrieval import TINY_RETRIEVAL, build_tiny_retrieval
from captune.search import index_images
from captune.serve import ServeSettings

RESULTS = Path(__file__).parent / "results" / "serve-load-cpu.json"
TEXT_QUERIES = ["a red square on the left", "a small blue circle", "a green triangle in the middle", "a photo"]
GROUPS = ("api_captions", "app_captions", "api_search", "app_search")
"""The clients of the phase that runs the REST API and the web app together."""

Send = Callable[[httpx2.AsyncClient, int], Awaitable[tuple[str, int | None]]]
"""One request of a client: its status ("200", or what failed) and the answer's batch_images (captions) or None."""


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


def _index(root: Path, images: list[bytes]) -> Path:
    """The request images as files, indexed with tiny-retrieval as `captune index` indexes them."""
    folder = root / "images"
    folder.mkdir()
    paths = [folder / f"{i:02d}.jpg" for i in range(len(images))]
    for path, data in zip(paths, images, strict=True):
        path.write_bytes(data)
    index_images(paths, build_tiny_retrieval(), root / "index", model_id=TINY_RETRIEVAL, progress=False)
    return root / "index"


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


def _api_captions(images: list[bytes]) -> Send:
    async def send(client: httpx2.AsyncClient, number: int) -> tuple[str, int | None]:
        files = {"images": (f"{number}.jpg", images[number % len(images)], "image/jpeg")}
        response = await client.post("/v1/captions", files=files)
        ok = response.status_code == 200
        return str(response.status_code), response.json()["timing"]["batch_images"] if ok else None

    return send


def _api_search(images: list[bytes]) -> Send:
    """Even numbers a text query, odd ones an image query."""

    async def send(client: httpx2.AsyncClient, number: int) -> tuple[str, int | None]:
        if number % 2:
            query: list[Any] = [("image", (f"{number}.jpg", images[number % len(images)], "image/jpeg"))]
        else:
            query = [("text", (None, TEXT_QUERIES[number // 2 % len(TEXT_QUERIES)]))]
        response = await client.post("/v1/search", files=[*query, ("top", (None, "5"))])
        return str(response.status_code), None

    return send


async def _app_call(client: httpx2.AsyncClient, endpoint: str, data: list[Any]) -> tuple[str, list[Any] | None]:
    """One call of the web app's endpoint over Gradio's HTTP API: POST the inputs, then read the event stream to
    its `complete` (the outputs) or `error` event."""
    response = await client.post(f"/gradio_api/call/{endpoint}", json={"data": data})
    if response.status_code != 200:
        return str(response.status_code), None
    event = ""
    async with client.stream("GET", f"/gradio_api/call/{endpoint}/{response.json()['event_id']}") as stream:
        async for line in stream.aiter_lines():
            if line.startswith("event: "):
                event = line.removeprefix("event: ")
            elif line.startswith("data: ") and event in ("complete", "error"):
                return ("200", json.loads(line.removeprefix("data: "))) if event == "complete" else ("app error", None)
    return "stream ended", None


async def _app_upload(client: httpx2.AsyncClient, name: str, data: bytes) -> dict[str, Any]:
    """A file for the app's inputs: uploaded as the page uploads it, named as Gradio names an uploaded file."""
    response = await client.post("/gradio_api/upload", files={"files": (name, data, "image/jpeg")})
    response.raise_for_status()
    return {"path": response.json()[0], "orig_name": name, "meta": {"_type": "gradio.FileData"}}


def _app_captions(images: list[bytes]) -> Send:
    async def send(client: httpx2.AsyncClient, number: int) -> tuple[str, int | None]:
        upload = await _app_upload(client, f"{number}.jpg", images[number % len(images)])
        status, outputs = await _app_call(client, "caption", [[upload], None, None, None, None])
        # The timing line names the batch: "1 image(s) in 40 ms (generation 30 ms, 16 image(s) in the batch)"
        return status, int(outputs[1].split(", ")[-1].split()[0]) if outputs else None

    return send


def _app_search(images: list[bytes]) -> Send:
    async def send(client: httpx2.AsyncClient, number: int) -> tuple[str, int | None]:
        if number % 2:
            upload = await _app_upload(client, f"{number}.jpg", images[number % len(images)])
            data: list[Any] = ["", upload, 5, 0]
        else:
            data = [TEXT_QUERIES[number // 2 % len(TEXT_QUERIES)], None, 5, 0]
        return (await _app_call(client, "search", data))[0], None

    return send


async def _run_phase(url: str, send: Send, requests: int, concurrency: int, server: psutil.Process,
                     deadline: float) -> Phase:  # fmt: skip
    """`requests` requests (`send`) from `concurrency` clients; each client takes the next request number until none
    is left."""
    phase = Phase()
    numbers = iter(range(requests))
    limits = httpx2.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx2.AsyncClient(base_url=url, limits=limits, timeout=60) as client:

        async def one_client() -> None:
            for number in numbers:
                if time.monotonic() > deadline:
                    phase.statuses["not sent (time limit)"] = phase.statuses.get("not sent (time limit)", 0) + 1
                    continue
                started = time.perf_counter()
                try:
                    status, batch = await send(client, number)
                    if batch is not None:
                        phase.batch_images.append(batch)
                except httpx2.HTTPError as err:
                    status = type(err).__name__
                phase.latencies_s.append(time.perf_counter() - started)
                phase.statuses[status] = phase.statuses.get(status, 0) + 1
                phase.rss_mib.append(server.memory_info().rss / 2**20)

        started = time.perf_counter()
        await asyncio.gather(*(one_client() for _ in range(concurrency)))
        phase.seconds = time.perf_counter() - started
    return phase


async def _together(url: str, images: list[bytes], requests: int, concurrency: int, server: psutil.Process,
                    deadline: float) -> dict[str, Phase]:  # fmt: skip
    """The four groups of clients (`GROUPS`) at once."""
    sends = [_api_captions(images), _app_captions(images), _api_search(images), _app_search(images)]
    phases = await asyncio.gather(*(_run_phase(url, send, requests, concurrency, server, deadline) for send in sends))
    return dict(zip(GROUPS, phases, strict=True))


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
    parser.add_argument("--mixed-requests", type=int, default=200,
                        help="requests of each group of the REST API and web app phase")  # fmt: skip
    parser.add_argument("--mixed-concurrency", type=int, default=8,
                        help="concurrent clients of each group of that phase (four groups)")  # fmt: skip
    parser.add_argument("--max-seconds", type=float, default=300, help="the whole run stops sending after this")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    run_deadline = time.monotonic() + args.max_seconds

    with tempfile.TemporaryDirectory(prefix="captune-load-") as tmp:
        model_dir = _save_tiny_model(Path(tmp))
        images = _images(16)
        index_dir = _index(Path(tmp), images)
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        # Every client is 127.0.0.1, as behind a proxy: the per-client connection limit is the total one.
        command = [sys.executable, "-m", "captune.cli", "serve", "--model-dir", str(model_dir), "--index",
                   str(index_dir), "--port", str(port), "--device", "cpu", "--max-connections-per-client",
                   str(ServeSettings.max_connections)]  # fmt: skip
        env = os.environ | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        with open(Path(tmp) / "serve.log", "wb") as log:
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            _wait_healthy(url, process, timeout=120)
            server = psutil.Process(process.pid)
            captions = _api_captions(images)
            asyncio.run(_run_phase(url, captions, 20, 4, server, run_deadline))  # warm-up: first calls, allocator
            asyncio.run(_together(url, images, 8, 2, server, run_deadline))  # and the app's and search's first calls
            baseline = asyncio.run(_run_phase(url, captions, args.baseline_requests, 1, server, run_deadline))
            loaded = asyncio.run(_run_phase(url, captions, args.requests, args.concurrency, server, run_deadline))
            together = asyncio.run(_together(url, images, args.mixed_requests, args.mixed_concurrency, server,
                                             run_deadline))  # fmt: skip
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
        "what": "captune serve --index with the tiny model on the CPU: one-image multipart requests over 127.0.0.1, "
        "then the REST API and the web app together (captions and search)",
        "command": shlex.join(
            [".venv/bin/python", "benchmarks/load_test.py", *(argv if argv is not None else sys.argv[1:])]
        ),
        "server": {
            "command": f"captune serve --model-dir TINY --index INDEX --device cpu --max-connections-per-client "
            f"{ServeSettings.max_connections} (OMP_NUM_THREADS=1; INDEX: the 16 request images, {TINY_RETRIEVAL})",
            "limits": limits,
            "exit_status_after_sigterm": exit_status,
            "tracebacks_in_log": log_text.count("Traceback"),
        },  # fmt: skip
        "baseline": _summary(baseline, 1),
        "load": _summary(loaded, args.concurrency),
        "together": {group: _summary(phase, args.mixed_concurrency) for group, phase in together.items()},  # fmt: skip
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
    print(json.dumps({k: result[k] for k in ("baseline", "load", "together")}, indent=2))
    print(f"written to {args.output}")
    clean = exit_status == 0 and result["server"]["tracebacks_in_log"] == 0
    phases = [result["baseline"], result["load"], *result["together"].values()]
    return 0 if all(phase["failures"] == 0 for phase in phases) and clean else 1


if __name__ == "__main__":
    sys.exit(main())
