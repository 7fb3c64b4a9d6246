"""Images/s of captune's image pipeline on the CPU: decode + RGB + resize to BLIP-2's 224 x 224 + normalise, per core
and through the training DataLoader's worker processes, and the time of `captune data check`'s image pass.

    .venv/bin/python benchmarks/data_pipeline.py                 # 2,000 JPEGs of 500 x 375 (Flickr/COCO-like)
    .venv/bin/python benchmarks/data_pipeline.py --images 500 --output /tmp/data.json

The images are generated (seeded smooth noise, saved as JPEG quality 90, ~60 KB each: what a Flickr8k image weighs) so
that decoding costs what real photos cost. Each stage is timed once after a warm-up of 50 images:

1. `load_rgb` alone (decode + convert), one process: images/s of one core.
2. `load_rgb` + the BLIP-2 image processor (bicubic resize to 224 x 224, rescale, normalise; `BlipImageProcessorPil`
   as `Salesforce/blip2-opt-2.7b` configures it), one process: what one DataLoader worker can feed.
3. The same through `captune.training.batches.CaptionPairs` in a `DataLoader` with 0, 1 and 2 worker processes, batch
   32.
4. `check_images` (the image pass of `captune data check`: decode only, a thread pool over all cores).

Results go to benchmarks/results/data-cpu.json with the machine and this command.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader
from transformers import BlipImageProcessorPil

from captune.data import CaptionSet, Record, check_images
from captune.data.images import decode_size, load_rgb
from captune.training.batches import CaptionPairs

RESULTS = Path(__file__).parent / "results" / "data-cpu.json"
PHOTOS = Path(__file__).parent / "results" / "photos-cpu.json"
WARM_UP = 50


def make_images(folder: Path, count: int, seed: int = 0) -> list[Path]:
    """Writes `count` 500 x 375 JPEGs of smooth seeded noise (photo-like to a JPEG codec)."""
    rng = np.random.default_rng(seed)
    paths = []
    for index in range(count):
        coarse = rng.integers(0, 256, size=(24, 32, 3), dtype=np.uint8)
        fine = rng.integers(-20, 21, size=(375, 500, 3))
        image = np.asarray(Image.fromarray(coarse).resize((500, 375), Image.Resampling.BICUBIC), dtype=np.int64)
        path = folder / f"{index:06d}.jpg"
        Image.fromarray(np.clip(image + fine, 0, 255).astype(np.uint8)).save(path, quality=90)
        paths.append(path)
    return paths


def blip2_processor() -> BlipImageProcessorPil:
    """The image processor of Salesforce/blip2-opt-2.7b (its preprocessor_config.json), built offline."""
    return BlipImageProcessorPil(
        size={"height": 224, "width": 224},
        resample=3,  # bicubic
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
        do_convert_rgb=True,
    )


def rate(count: int, seconds: float) -> dict[str, float]:
    return {"images": count, "seconds": round(seconds, 3), "images_per_s": round(count / seconds, 1)}


def time_single(paths: list[Path], processor: BlipImageProcessorPil | None) -> dict[str, float]:
    for path in paths[:WARM_UP]:
        load_rgb(path)
    start = time.perf_counter()
    for path in paths:
        image = load_rgb(path)
        if processor is not None:
            processor(image, return_tensors="pt")
    return rate(len(paths), time.perf_counter() - start)


def time_loader(paths: list[Path], processor: BlipImageProcessorPil, workers: int) -> dict[str, float]:
    records = [Record(p.name, p, ("a caption",), "train") for p in paths]

    class _Processor:  # CaptionPairs takes a Blip2Processor; it only uses its image processor
        image_processor = processor

    pairs = CaptionPairs(records, _Processor())  # type: ignore[arg-type]
    loader = DataLoader(pairs, batch_size=32, num_workers=workers, prefetch_factor=2 if workers else None)
    start = None
    seen = 0
    for batch_index, batch in enumerate(loader):
        if batch_index == 1:  # from the second batch on: the workers are up
            start, seen = time.perf_counter(), 0
        seen += len(batch["caption"])
    assert start is not None
    return rate(seen, time.perf_counter() - start)


def make_photos(folder: Path, count: int, seed: int = 0) -> list[Path]:
    """Writes `count` 4000 x 3000 JPEGs (12 megapixels, a phone camera's size) of smooth seeded noise."""
    rng = np.random.default_rng(seed)
    paths = []
    for index in range(count):
        coarse = rng.integers(0, 256, size=(60, 80, 3), dtype=np.uint8)
        path = folder / f"photo-{index:04d}.jpg"
        Image.fromarray(coarse).resize((4000, 3000), Image.Resampling.BICUBIC).save(path, quality=90)
        paths.append(path)
    return paths


def time_photos(paths: list[Path], processor: BlipImageProcessorPil) -> dict[str, Any]:
    """load_rgb + the processor per photo, one core, decoding in full and at the reduced scale `decode_size` allows;
    and the largest difference of their processed pixels."""
    out: dict[str, Any] = {}
    for name, size in (("full_decode", None), ("reduced_scale_decode", decode_size(processor))):
        load_rgb(paths[0], size)
        start = time.perf_counter()
        for path in paths:
            processor(load_rgb(path, size), return_tensors="np")
        out[name] = rate(len(paths), time.perf_counter() - start)
    difference = max(
        float(np.abs(processor(load_rgb(p), return_tensors="np")["pixel_values"]
                     - processor(load_rgb(p, decode_size(processor)), return_tensors="np")["pixel_values"]).max())
        for p in paths
    )  # fmt: skip
    out["max_abs_pixel_difference"] = difference
    out["one_grey_level"] = round(1 / 255 / min(processor.image_std), 4)
    return out


def time_check(paths: list[Path]) -> dict[str, float]:
    records = [Record(p.name, p, ("a caption",), "train") for p in paths]
    start = time.perf_counter()
    checked = check_images(CaptionSet(records), progress=False)
    assert not checked.problems
    return rate(len(paths), time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--output", type=Path, default=None, help=f"default {RESULTS} ({PHOTOS} with --photos)")
    parser.add_argument("--photos", type=int, default=0,
                        help="instead: time N 12-megapixel JPEGs decoded in full and at a reduced scale")  # fmt: skip
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # the processor's tensors are small; one thread per process, as in workers
    load = os.getloadavg()[0]
    if args.photos:
        with tempfile.TemporaryDirectory() as folder:
            print(f"writing {args.photos} 12-megapixel JPEGs ...", file=sys.stderr)
            photos = time_photos(make_photos(Path(folder), args.photos), blip2_processor())
        for name in ("full_decode", "reduced_scale_decode"):
            print(f"{name:22s} {photos[name]['images_per_s']:7.1f} images/s (load_rgb + processor, one core)")
        print(f"largest pixel difference {photos['max_abs_pixel_difference']:.4f} (one grey level: "
              f"{photos['one_grey_level']})")  # fmt: skip
        _write(args.output or PHOTOS, argv, {"what": "12-megapixel JPEGs through load_rgb + BLIP-2's processor, one "
               "core: full decode against libjpeg's reduced-scale decode (load_rgb's min_size)",
               "images": {"count": args.photos, "size": "4000x3000 JPEG q90"}, "results": photos}, load)  # fmt: skip
        return
    with tempfile.TemporaryDirectory() as folder:
        print(f"writing {args.images} JPEGs ...", file=sys.stderr)
        paths = make_images(Path(folder), args.images)
        size_kb = sum(p.stat().st_size for p in paths) / len(paths) / 1024
        processor = blip2_processor()
        results = {
            "decode_one_core": time_single(paths, None),
            "decode_resize_normalise_one_core": time_single(paths, processor),
            **{f"dataloader_{w}_workers": time_loader(paths, processor, w) for w in (0, 1, 2)},
            "data_check_image_pass": time_check(paths),
        }
    for name, value in results.items():
        print(f"{name:34s} {value['images_per_s']:8.1f} images/s ({value['images']} in {value['seconds']} s)")
    _write(args.output or RESULTS, argv, {
        "what": "images/s of captune's image pipeline on the CPU (decode, resize to 224, normalise)",
        "images": {"count": args.images, "size": "500x375 JPEG q90", "mean_kb": round(size_kb, 1)},
        "results": results,
    }, load)  # fmt: skip


def _write(path: Path, argv: list[str] | None, body: dict[str, Any], load: float) -> None:
    """The results with the command, the machine and the date."""
    output = {
        **body,
        "command": shlex.join([".venv/bin/python", "benchmarks/data_pipeline.py", *(argv or sys.argv[1:])]),
        "machine": {
            "nproc": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "platform": platform.platform(),
            "load_average_at_start": round(load, 2),
        },
        "date": datetime.date.today().isoformat(),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(output, indent=2) + "\n")
    print(f"written to {path}")


if __name__ == "__main__":
    main()
