"""Bulk image indexing throughput (issue 25): images/s of `captune.search.index_images` (files -> embeddings -> an
on-disk vector index) beside the vision side alone on preloaded pixels (the ceiling), one process, one GPU.

    PYTHONPATH=src:benchmarks:.gpu/site python benchmarks/index_throughput.py --model-dir DIR --output OUT.json
    (DIR from `python benchmarks/random_blip2.py --arch itm-vit-g --output DIR`; --tiny for a CPU dry run on the twin)

What runs, in order:
1. Data: `--images` generated JPEGs (500 x 375, `train_throughput.make_data`).
2. The ceiling, per `--batch-sizes`: one batch of pixels preprocessed once and kept on the GPU, then `--steps` timed
   forwards (after 3 warm-up ones) under `torch.inference_mode()` as `index_images` runs them (float32 weights, bf16
   autocast on a GPU): the ViT-g alone, and the whole image side of an embedding (ViT-g, the Q-Former's 32 queries,
   the projection, `captune.retrieval.image_embeddings`). No decoding, no preprocessing, no copy to the GPU, nothing
   written: what the GPU allows.
3. captune, per `--batch-sizes`: `index_images(paths, loaded, output, model_id=DIR, batch_size=..., workers=...)` over
   every image into a fresh index folder (decoding and preprocessing in `--workers` processes while the GPU works,
   the embeddings written as the index's chunks, then the FAISS index built), timed whole, first batch included; the
   index must then hold every image.
4. On a GPU, the ceiling again with the weights cast to bf16 (no autocast): what bf16 weights would give.

The model is `captune.retrieval.load_retrieval(DIR)` on the device, float32 as `index_images` takes it; the speed of
a random-weight model is that of the real one. Goal (issue 25): >= 800 images/s on an H200 at 224 px, where the vision
side alone ran ~920/s. Writes `--output` (JSON: every number, the software versions, the GPU, this command) and prints
a table.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from train_throughput import _environment, _sync, make_data

from captune.data.images import processed_pixels
from captune.retrieval import RetrievalModel, image_embeddings, image_side, load_retrieval
from captune.twins import write_checkpoint


def time_forward(forward: Callable[[], Any], images: int, steps: int, device: torch.device) -> dict[str, float]:
    """images/s of `steps` calls of `forward` (each on `images` images), after 3 warm-up calls."""
    with torch.inference_mode():
        for _ in range(3):
            forward()
        _sync(device)
        start = time.perf_counter()
        for _ in range(steps):
            forward()
        _sync(device)
    seconds = time.perf_counter() - start
    return {"images_per_s": images * steps / seconds, "seconds": seconds, "steps": steps}


def ceiling(
    loaded: RetrievalModel, paths: list[Path], batch_size: int, steps: int, device: torch.device, autocast: bool
) -> dict[str, Any]:
    """The vision side on one batch of preloaded pixels: the ViT alone, and ViT + Q-Former + projection; under bf16
    autocast when `autocast` (as `index_images` runs float32 weights on a GPU)."""
    model = loaded.model
    batch = [paths[i % len(paths)] for i in range(batch_size)]
    pixels = torch.stack([processed_pixels(p, loaded.image_processor) for p in batch]).to(device, model.dtype)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    context = torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast)
    with context:
        vit = time_forward(lambda: image_side(model, pixels), batch_size, steps, device)
        embed = time_forward(lambda: image_embeddings(model, pixels), batch_size, steps, device)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    return {"vit_alone": vit, "image_embeddings": embed, "peak_gib": peak}


def run_captune(
    loaded: RetrievalModel,
    model_id: str,
    paths: list[Path],
    output: Path,
    batch_size: int,
    workers: int,
    device: torch.device,
    profile_batches: int = 0,
) -> dict[str, Any]:
    """`index_images` over every path into a fresh index folder, timed whole. `profile_batches` > 0: the GPU's kernels
    over that many batches after the first 9 are recorded (PyTorch's profiler, GPU activity only), and their busy time
    set against the wall time of the same batches: what share of the steady state the GPU waits."""
    try:
        from captune.search import index_images
    except ImportError as err:
        raise SystemExit(f"captune.search.index_images is not in this checkout ({err}): the captune side cannot run; "
                         "the ceiling's numbers are in --output") from err  # fmt: skip
    import captune.search as search

    shutil.rmtree(output, ignore_errors=True)  # a fresh index, never a resumed one
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    arrivals: list[float] = []  # when each batch's embeddings reached index_images (where its time goes)
    embedded_batches = search._embedded_batches

    profiler = None
    if profile_batches and device.type == "cuda":
        from torch.profiler import ProfilerActivity, profile, schedule

        profiler = profile(activities=[ProfilerActivity.CUDA],
                           schedule=schedule(wait=8, warmup=1, active=profile_batches, repeat=1))  # fmt: skip
        profiler.start()

    def timed(*args: Any, **kwargs: Any) -> Any:
        for item in embedded_batches(*args, **kwargs):
            arrivals.append(time.perf_counter())
            if profiler is not None:
                profiler.step()
            yield item

    search._embedded_batches = timed  # type: ignore[assignment]
    _sync(device)
    start = time.perf_counter()
    try:
        summary = index_images(paths, loaded, output, model_id=model_id, batch_size=batch_size, workers=workers,
                               progress=False)  # fmt: skip
    finally:
        search._embedded_batches = embedded_batches  # type: ignore[assignment]
    _sync(device)
    seconds = time.perf_counter() - start
    between = len(paths) - batch_size  # images that arrived after the first batch
    phases = {"first_batch_s": arrivals[0] - start, "after_last_batch_s": start + seconds - arrivals[-1],
              "steady_images_per_s": between / (arrivals[-1] - arrivals[0]) if len(arrivals) > 1 else None}  # fmt: skip
    if summary.count != len(paths) or summary.skipped:
        raise SystemExit(f"{output}: the index holds {summary.count} vectors after index_images of {len(paths)} "
                         f"images ({len(summary.skipped)} skipped)")  # fmt: skip
    if profiler is not None:
        profiler.stop()
        events = profiler.key_averages()
        busy_ms = sum(e.self_device_time_total for e in events) / 1000
        window = arrivals[9 + profile_batches] - arrivals[9] if len(arrivals) > 9 + profile_batches else None
        phases["profile"] = {
            "batches": profile_batches, "gpu_busy_ms": busy_ms,
            "wall_ms": 1000 * window if window else None,
            "busy_share": busy_ms / (1000 * window) if window else None,
            "top": [{"name": e.key[:100], "gpu_ms": e.self_device_time_total / 1000, "calls": e.count}
                    for e in sorted(events, key=lambda e: e.self_device_time_total, reverse=True)[:10]],
        }  # fmt: skip
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    return {"batch_size": batch_size, "workers": workers, "images": len(paths), "seconds": seconds,
            "images_per_s": len(paths) / seconds, "peak_gib": peak, "index_kind": summary.index_kind,
            **phases}  # fmt: skip


def loader_alone(loaded: RetrievalModel, paths: list[Path], batch_size: int, workers: int) -> dict[str, Any]:
    """images/s of decoding and preprocessing alone: `index_images`' DataLoader (the same dataset, workers, batch
    size and pinned memory) iterated with nothing else, from its start (workers' start-up included) and after the
    first batch."""
    from torch.utils.data import DataLoader

    from captune.data import freeze_inherited_objects
    from captune.data.images import PixelFiles

    loader = DataLoader(PixelFiles(paths, loaded.image_processor), batch_size=batch_size, num_workers=workers,
                        collate_fn=list, prefetch_factor=2 if workers else None, pin_memory=torch.cuda.is_available(),
                        worker_init_fn=freeze_inherited_objects)  # fmt: skip
    start = time.perf_counter()
    first = None
    for _ in loader:
        first = first or time.perf_counter()
    seconds = time.perf_counter() - start
    assert first is not None
    return {"batch_size": batch_size, "workers": workers, "images_per_s": len(paths) / seconds,
            "first_batch_s": first - start,
            "steady_images_per_s": (len(paths) - batch_size) / (start + seconds - first)}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, help="a Blip2ForImageTextRetrieval directory")
    parser.add_argument("--tiny", action="store_true", help="CPU dry run on the twin of blip2-itm-vit-g, 64 images")
    parser.add_argument("--work", type=Path, default=Path(".bench"))
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--images", type=int, default=10000)
    parser.add_argument("--batch-sizes", default="128,256")
    parser.add_argument("--steps", type=int, default=20, help="timed forwards of the ceiling per batch size")
    parser.add_argument("--workers", type=int, default=12, help="index_images' decoding processes")
    parser.add_argument(
        "--profile-batches",
        type=int,
        default=0,
        help="also a profiled index_images run: the GPU's busy share over this many steady batches",
    )
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args.work.mkdir(parents=True, exist_ok=True)
    model_dir = args.model_dir
    if args.tiny:  # the twin: blip2-itm-vit-g's config at tiny sizes, 224 px
        model_dir = write_checkpoint("Salesforce/blip2-itm-vit-g", args.work / "twin-itm")
        args.images, args.batch_sizes, args.steps, args.workers = 64, "16", 3, 0
    assert model_dir is not None, "--model-dir or --tiny"
    manifest = make_data(args.work / "data", args.images)
    paths = [manifest.parent / json.loads(line)["image"] for line in manifest.read_text().splitlines()]
    loaded = load_retrieval(str(model_dir), device=device)
    cuda = device.type == "cuda"
    result: dict[str, Any] = {"what": __doc__.splitlines()[0], "images": len(paths), "autocast_bf16": cuda}
    result.update(_environment(device, argv))

    def save() -> None:  # after every stage, so that a run cut short keeps what it measured
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=2) + "\n")

    batch_sizes = list(map(int, args.batch_sizes.split(",")))
    result["ceiling"] = {}
    for batch_size in batch_sizes:
        result["ceiling"][batch_size] = ceiling(loaded, paths, batch_size, args.steps, device, autocast=cuda)
        print(f"vision side alone, batch {batch_size}: {result['ceiling'][batch_size]}", flush=True)
        save()
    result["captune"] = []
    for batch_size in batch_sizes:
        output = args.work / f"index-{batch_size}"
        run = run_captune(loaded, str(model_dir), paths, output, batch_size, args.workers, device)
        result["captune"].append(run)
        print(f"index_images, batch {batch_size}: {run}", flush=True)
        save()
    if args.profile_batches:
        run = run_captune(loaded, str(model_dir), paths, args.work / "index-profiled", batch_sizes[-1], args.workers,
                          device, args.profile_batches)  # fmt: skip
        result["captune_profiled"] = run
        print(f"index_images under the profiler, batch {batch_sizes[-1]}: {run}", flush=True)
        save()
    result["loader_alone"] = loader_alone(loaded, paths, batch_sizes[-1], args.workers)
    print(f"decoding alone: {result['loader_alone']}", flush=True)
    save()
    if cuda:
        loaded.model.to(torch.bfloat16)
        run = run_captune(loaded, str(model_dir), paths, args.work / "index-bf16", batch_sizes[-1], args.workers,
                          device)  # fmt: skip
        result["captune_bf16_weights"] = run
        print(f"index_images, bf16 weights, batch {batch_sizes[-1]}: {run}", flush=True)
        result["ceiling_bf16_weights"] = {}
        for batch_size in batch_sizes:
            result["ceiling_bf16_weights"][batch_size] = ceiling(loaded, paths, batch_size, args.steps, device, False)
            print(f"vision side, bf16 weights, batch {batch_size}: {result['ceiling_bf16_weights'][batch_size]}")
            save()
    best = max(result["captune"], key=lambda r: r["images_per_s"])
    vit = result["ceiling"][best["batch_size"]]["vit_alone"]["images_per_s"]
    result["best_images_per_s"] = best["images_per_s"]
    result["share_of_vit_alone"] = best["images_per_s"] / vit
    save()
    print(f"index_images best {best['images_per_s']:.1f} images/s at batch {best['batch_size']} "
          f"({result['share_of_vit_alone']:.0%} of the ViT alone at that batch, {vit:.1f}); written to "
          f"{args.output}")  # fmt: skip


if __name__ == "__main__":
    main()
