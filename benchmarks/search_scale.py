"""Build time, memory, single-query latency and recall@10 of captune's vector index on N random vectors, on the CPU.

    .venv/bin/python benchmarks/search_scale.py                              # 1,000,000 x 256-d, exact and HNSW
    .venv/bin/python benchmarks/search_scale.py --n 50000 --kinds flat,hnsw,ivf --output /tmp/search.json

1. N seeded standard-normal vectors are streamed into a `captune.vector_index` folder in chunks of 50,000, as
   `captune index` stores embeddings (normalised there, so the inner product is the cosine).
2. For each kind (flat: exact `IndexFlatIP`; hnsw, ivf: the approximate ones, `BuildOptions`' defaults unless
   `--hnsw-m` / `--hnsw-ef-construction` say otherwise) `build`, timed; memory is the size of the written FAISS index
   file, and the process's peak resident set is recorded.
3. For each search effort (`--ef-search` for HNSW, `--nprobe` for IVF, set on the built index), `--queries` random
   queries (another seed), one `VectorIndex.search(query, top=10)` call each: p50 and p95 milliseconds; then
   `recall_against_exact` at k=10 over the same queries.

Random vectors are the hard case for approximate search (no clusters to exploit), so recall on real embeddings is at
least as good at the same settings. Results go to benchmarks/results/search-scale-cpu<cores>-<N>.json with the
command, versions, CPU and date.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from captune.vector_index import FAISS_FILE, BuildOptions, VectorIndex, recall_against_exact

CHUNK = 50_000


def _environment(argv: list[str] | None) -> dict[str, Any]:
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), None)
    return {
        "versions": {"faiss": faiss.__version__, "numpy": np.__version__, "python": platform.python_version()},
        "device": model or platform.processor() or "cpu",
        "nproc": os.cpu_count(),
        "faiss_threads": faiss.omp_get_max_threads(),
        "load_average_at_start": round(os.getloadavg()[0], 2),
        "command": shlex.join(["python", "benchmarks/search_scale.py", *(argv or sys.argv[1:])]),
        "date": datetime.date.today().isoformat(),
    }


def store(folder: Path, n: int, dim: int) -> VectorIndex:
    """An index folder of n seeded random vectors, added CHUNK at a time."""
    rng = np.random.default_rng(0)
    index = VectorIndex.create(folder, dim, "random")
    for start in range(0, n, CHUNK):
        rows = min(CHUNK, n - start)
        index.add(rng.standard_normal((rows, dim), dtype=np.float32), [f"item-{i}" for i in range(start, start + rows)])
    return index


def measure(index: VectorIndex, kind: str, options: BuildOptions, queries: np.ndarray, k: int,
            efforts: list[int]) -> dict[str, Any]:  # fmt: skip
    """Build `kind`, then its size and, per search effort (HNSW efSearch, IVF nprobe; none for flat), single-query
    latency and recall@k against exact search."""
    start = time.perf_counter()
    index.build(options)
    build_s = time.perf_counter() - start
    entry: dict[str, Any] = {
        "build_s": round(build_s, 2),
        "index_bytes": (index.folder / FAISS_FILE).stat().st_size,
        "build": index.manifest["build"],
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "searches": [],
    }
    built = index.faiss_index()
    for effort in efforts if kind != "flat" else [0]:
        if kind == "hnsw":
            built.hnsw.efSearch = effort
        elif kind == "ivf":
            built.nprobe = effort
        latencies = []
        for query in queries:
            start = time.perf_counter()
            index.search(query, top=k)
            latencies.append((time.perf_counter() - start) * 1000)
        entry["searches"].append({
            "effort": effort or None,
            "p50_ms": round(float(np.percentile(latencies, 50)), 3),
            "p95_ms": round(float(np.percentile(latencies, 95)), 3),
            f"recall_at_{k}": round(recall_against_exact(index, queries, k), 4),
        })  # fmt: skip
        print(f"{kind} effort {effort}: {entry['searches'][-1]}", flush=True)
    return entry


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="vectors in the index")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--kinds", default="flat,hnsw", help="comma-separated: flat, hnsw, ivf")
    parser.add_argument("--hnsw-m", type=int, default=BuildOptions.hnsw_m)
    parser.add_argument("--hnsw-ef-construction", type=int, default=BuildOptions.hnsw_ef_construction)
    parser.add_argument(
        "--ef-search", default=str(BuildOptions.hnsw_ef_search), help="HNSW efSearch values, e.g. 256,1024"
    )
    parser.add_argument("--nprobe", default=str(BuildOptions.ivf_nprobe), help="IVF nprobe values, e.g. 64,256")
    parser.add_argument("--work", type=Path, default=None, help="the index folder's parent (default: a temp dir)")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)
    name = f"search-scale-cpu{os.cpu_count()}-{args.n // 1000}k.json"
    output = args.output or Path(__file__).parent / "results" / name
    result: dict[str, Any] = {**_environment(argv), "n": args.n, "dim": args.dim, "queries": args.queries, "kinds": {}}
    queries = np.random.default_rng(1).standard_normal((args.queries, args.dim), dtype=np.float32)
    if args.work is not None:
        args.work.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.work) as work:
        start = time.perf_counter()
        index = store(Path(work) / "index", args.n, args.dim)
        result["store_s"] = round(time.perf_counter() - start, 2)
        print(f"stored {args.n:,} x {args.dim} in {result['store_s']} s", flush=True)
        for kind in args.kinds.split(","):
            options = BuildOptions(hnsw_m=args.hnsw_m, hnsw_ef_construction=args.hnsw_ef_construction)
            if kind != "flat":
                options.approximate_above, options.approximate = 0, kind
            efforts = [int(e) for e in (args.nprobe if kind == "ivf" else args.ef_search).split(",")]
            result["kinds"][kind] = measure(index, kind, options, queries, args.k, efforts)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
