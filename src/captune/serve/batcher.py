"""Admission and batching: `Admission` counts the images admitted (503 beyond `max_queue`), and `MicroBatcher`
captions (or answers about) the queued requests from one worker thread, in batches of identical options."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

from PIL import Image

from captune.config import GenerateConfig
from captune.serve.errors import ApiError

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------- admission ---
class Admission:
    """Counts the images admitted (one slot per request before its images are counted); used on the event loop
    thread only, so it needs no lock."""

    def __init__(self, capacity: int, retry_after_s: int) -> None:
        self.capacity, self.retry_after_s, self.pending = capacity, retry_after_s, 0

    @contextmanager
    def slot(self) -> Iterator[Callable[[int], None]]:
        """Takes one slot for the request; yields `take(n)` for n more; gives them all back at the end."""
        taken = 0

        def take(count: int) -> None:
            nonlocal taken
            if self.pending + count > self.capacity:
                raise ApiError(
                    503,
                    "busy",
                    f"the server is at capacity ({self.capacity} images queued or being captioned); retry after "
                    f"{self.retry_after_s} s",
                    {"Retry-After": str(self.retry_after_s)},
                )
            self.pending += count
            taken += count

        take(1)
        try:
            yield take
        finally:
            self.pending -= taken


# ------------------------------------------------------------------------------------------------- the batcher ---
class GenerateFn(Protocol):
    """Generates for one batch: `generate(images, options)` captions with the model's prompt; `generate(images,
    options, prompts)` continues one prompt per image (a question each)."""

    def __call__(
        self, images: list[Image.Image], options: GenerateConfig, prompts: list[str] | None = None
    ) -> list[str]: ...


@dataclass
class JobResult:
    """A request's texts (captions, or answers) and what the batcher measured for it."""

    captions: list[str]
    queue_s: float
    generate_s: float
    batch_images: int


@dataclass
class _Job:
    images: list[Image.Image]
    options: GenerateConfig
    future: Future[JobResult]
    queued_at: float
    prompts: list[str] | None = None
    """One prompt per image (questions), or None: the model's caption prompt."""


_GroupKey = tuple[int, int, int, float, bool]


def _group_key(job: _Job) -> _GroupKey:
    """Jobs of one key share generate calls: the same options, and captions apart from per-row prompts (so that a
    caption is made exactly as without questions in the server)."""
    options = job.options
    return options.num_beams, options.min_new_tokens, options.max_new_tokens, options.repetition_penalty, \
        job.prompts is None  # fmt: skip


class MicroBatcher:
    """One worker thread that captions queued requests in batches.

    The worker takes the first queued request, then more until `max_batch` images are gathered or `max_wait_s` has
    passed since the first; requests with identical options are captioned by one `generate` call (several when they
    hold more than `max_batch` images), and so are questions with identical options, each row with its own prompt
    (captions and questions go to separate calls). Under load the queue refills while a batch runs, so batches fill
    at once. A failed generate call fails only its requests.
    """

    def __init__(self, generate: GenerateFn, max_batch: int, max_wait_s: float) -> None:
        self.generate, self.max_batch, self.max_wait_s = generate, max_batch, max_wait_s
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._accepting = False

    @property
    def alive(self) -> bool:
        return self._accepting and self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="captune-generate", daemon=True)
        self._thread.start()
        self._accepting = True

    def submit(
        self, images: list[Image.Image], options: GenerateConfig, prompts: list[str] | None = None
    ) -> Future[JobResult]:
        """Queues one request's images (with one prompt each, or None for captions); its future gets the texts in
        order."""
        if prompts is not None and len(prompts) != len(images):
            raise ValueError(f"{len(prompts)} prompts for {len(images)} images; give one per image")
        if not self.alive:
            raise ApiError(503, "unavailable", "the generation worker is not running (the server is starting or "
                           "stopping); retry in a moment", {"Retry-After": "1"})  # fmt: skip
        future: Future[JobResult] = Future()
        self._queue.put(_Job(images, options, future, time.monotonic(), prompts))
        return future

    def close(self) -> None:
        """Captions what is queued, then stops the worker."""
        self._accepting = False
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()

    def _run(self) -> None:
        stop = False
        while not stop:
            jobs, stop = self._gather()
            groups: dict[_GroupKey, list[_Job]] = {}
            for job in jobs:
                if job.future.set_running_or_notify_cancel():
                    groups.setdefault(_group_key(job), []).append(job)
            for group in groups.values():
                self._caption(group)

    def _gather(self) -> tuple[list[_Job], bool]:
        """The next batch of jobs, and whether the stop marker came."""
        first = self._queue.get()
        if first is None:
            return [], True
        jobs, count = [first], len(first.images)
        deadline = time.monotonic() + self.max_wait_s
        while count < self.max_batch:
            try:
                job = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if job is None:
                return jobs, True
            jobs.append(job)
            count += len(job.images)
        return jobs, False

    def _caption(self, group: list[_Job]) -> None:
        images = [image for job in group for image in job.images]
        chunks = [images[start : start + self.max_batch] for start in range(0, len(images), self.max_batch)]
        prompts = None if group[0].prompts is None else [prompt for job in group for prompt in job.prompts or ()]
        started = time.monotonic()
        try:
            captions = []
            for k, chunk in enumerate(chunks):
                rows = None if prompts is None else prompts[k * self.max_batch : (k + 1) * self.max_batch]
                captions += self._generate(chunk, group[0].options, rows)
        except Exception as exc:  # a failed batch fails its requests, never the worker
            log.exception("generate failed for %d image(s)", len(images))
            for job in group:
                job.future.set_exception(exc)
            return
        elapsed = time.monotonic() - started
        offset = 0
        for job in group:
            count = len(job.images)
            batch = len(chunks[offset // self.max_batch])
            job.future.set_result(JobResult(captions[offset : offset + count], started - job.queued_at, elapsed, batch))
            offset += count

    def _generate(self, images: list[Image.Image], options: GenerateConfig, prompts: list[str] | None) -> list[str]:
        # Captions keep the two-argument call: the model's own prompt, made as before there were questions.
        return self.generate(images, options) if prompts is None else self.generate(images, options, prompts)
