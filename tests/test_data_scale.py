"""An epoch over a 100,000-row manifest keeps memory flat: images are decoded lazily in worker processes, with a
bounded prefetch, and the dataset holds paths and captions in flat arrays (no per-row Python objects for forked
workers to copy). Memory is the unique set size (USS) of the training process and of each worker, summed: the
pages each has to itself. A page a worker copies from the parent, or fills with decoded images, counts; pages they
still share do not (a proportional size would jump whenever a process sharing a page exits).

It takes ~25 s here (writing 100k hard links, one pass of a tiny image through the processor per row).
"""

import os
import statistics

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import contextlib
import gc
import json
import multiprocessing
from pathlib import Path
from typing import Any

import psutil
import pytest
from PIL import Image

from captune.config_loading import load_config
from captune.data import read
from captune.training.batches import CaptionCollator, CaptionPairs, training_loader
from captune.training.sampling import EpochShuffle

ROWS = 100_000
LINKS_PER_FILE = 50_000  # below ext4's 65,000 hard links per file


def _uss_mb() -> dict[int, float]:
    """USS of this process and of its children (the loader's workers), by pid, in MB."""
    me = psutil.Process()
    sizes = {}
    for process in [me, *me.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):  # a worker that just exited
            sizes[process.pid] = process.memory_full_info().uss / 2**20
    return sizes


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """manifest.jsonl of 100k rows, each its own image path (hard links of two 16x16 PNGs)."""
    folder = tmp_path_factory.mktemp("large")
    (folder / "images").mkdir()
    for base in range(ROWS // LINKS_PER_FILE):
        Image.new("RGB", (16, 16), (200, 30, base)).save(folder / f"base{base}.png")
    lines = []
    for row in range(ROWS):
        name = f"images/{row:06d}.png"
        os.link(folder / f"base{row // LINKS_PER_FILE}.png", folder / name)
        lines.append(json.dumps({"image": name, "caption": f"a red square with the number {row} written on it"}))
    (folder / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "manifest.jsonl"


class _CollectingCollator(CaptionCollator):
    """The real collator, plus one full garbage collection in each worker half-way through its batches, as a
    long-running worker eventually does: with the parent's objects in the collector's reach it copies them all."""

    def __call__(self, batch: list[dict[str, Any]]) -> dict[str, Any]:
        _CALLS[os.getpid()] = _CALLS.get(os.getpid(), 0) + 1
        if _CALLS[os.getpid()] == 100:  # of ~195 batches a worker
            gc.collect()
        return super().__call__(batch)


_CALLS: dict[int, int] = {}


def _epoch(manifest: Path, results: Any) -> None:
    """One epoch over the manifest, in a process of its own (spawned: its heap is what it builds here, not a whole
    test session's, whose inherited objects workers touch by chance); puts (rows seen, heap size, USS samples by
    process) on `results`."""
    from captune.model import build_tiny

    tiny = build_tiny(0)
    captions = read("manifest", manifest)
    assert len(captions.records) == ROWS and not captions.problems
    pairs = CaptionPairs(captions.records, tiny.processor)
    del captions
    # The training process's own Python heap, large as in a long training run: what a worker must not copy.
    heap = [[index] for index in range(2_000_000)]
    config = load_config(None, ["data.num_workers=2", "data.prefetch_factor=2", "train.batch_size=256"])
    loader = training_loader(
        pairs,
        EpochShuffle(len(pairs), 0),
        _CollectingCollator.for_model(tiny.model, tiny.processor),
        config,
        256,
        False,
    )
    by_process = []
    seen = 0
    for index, batch in enumerate(loader):
        seen += len(batch["input_ids"])
        if index % 10 == 0:
            by_process.append(_uss_mb())
    results.put((seen, len(heap), by_process))


def test_an_epoch_over_100k_rows_keeps_memory_flat(manifest: Path) -> None:
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    process = context.Process(target=_epoch, args=(manifest, results))
    process.start()
    seen, heap, by_process = results.get(timeout=600)
    process.join()
    assert process.exitcode == 0
    samples = [sum(sizes.values()) for sizes in by_process]
    assert seen == ROWS and heap == 2_000_000
    # The first quarter starts the workers and fills the prefetch queues; after that memory must not climb.
    # A dataset that kept decoded images would add ~1 GB here; workers whose collector reached the inherited heap
    # ~0.2 GB each; one that held per-row Python objects ~20-30 MB.
    # Medians of 5 samples at each end: a leak climbs for good, while a single sample can jump by ~10 MB and fall back
    # (seen in CI at the last batch), which a max would take for growth. Runs here grow by 2-6 MB.
    quarter = len(samples) // 4
    growth = statistics.median(samples[-5:]) - statistics.median(samples[quarter - 2 : quarter + 3])
    assert growth < 10, (
        f"memory grew by {growth:.0f} MB over the last three quarters of the epoch: {samples}; by process "
        f"(pid: MB) at the first quarter {by_process[quarter]} and at the end {by_process[-1]}"
    )
