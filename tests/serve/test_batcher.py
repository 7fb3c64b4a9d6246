"""Admission and micro-batching: a full queue gets 503, the batcher groups and splits requests by their options
and captions what is queued before it stops, and concurrent requests share one generate call."""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from captune.config import GenerateConfig
from captune.serve import ApiError, MicroBatcher, ServeSettings, create_app

from .conftest import BLUE, RED, _assert_healthy, _error, _files, _wait_for


def test_a_full_queue_gets_503_with_retry_after(model_dir: Path) -> None:
    # One request of 4 images fills the queue while the worker waits up to 1 s for a batch of 8.
    busy = ServeSettings(device="cpu", max_images=4, max_queue=4, max_batch=8, max_wait_ms=1000, retry_after_s=2)
    with TestClient(create_app(model_dir, busy)) as test_client, ThreadPoolExecutor(1) as pool:
        first = pool.submit(test_client.post, "/v1/captions", files=_files(*[RED] * 4))
        _wait_for(lambda: test_client.get("/health").json()["pending_images"] == 4)
        refused = test_client.post("/v1/captions", files=_files(BLUE))
        assert "at capacity (4 images" in _error(refused, 503, "busy")
        assert refused.headers["retry-after"] == "2"
        assert first.result().status_code == 200
        _assert_healthy(test_client)


def _recording_generate(calls: list[tuple[int, int]]) -> Callable[[list[Image.Image], GenerateConfig], list[str]]:
    """A stand-in for generate_captions: records (images, num_beams) per call; the caption is the image's width."""

    def generate(images: list[Image.Image], options: GenerateConfig) -> list[str]:
        calls.append((len(images), options.num_beams))
        return [f"w{image.width}" for image in images]

    return generate


def _images(*widths: int) -> list[Image.Image]:
    return [Image.new("RGB", (width, 1)) for width in widths]


def test_batcher_captions_requests_with_the_same_options_in_one_call() -> None:
    calls: list[tuple[int, int]] = []
    # The worker waits (up to 10 s) until 6 images are queued, then captions them at once.
    batcher = MicroBatcher(_recording_generate(calls), max_batch=6, max_wait_s=10)
    batcher.start()
    greedy, beam = GenerateConfig(num_beams=1), GenerateConfig(num_beams=2)
    futures = [batcher.submit(_images(1, 2), greedy), batcher.submit(_images(3), beam),
               batcher.submit(_images(4, 5, 6), greedy)]  # fmt: skip
    results = [future.result(timeout=10) for future in futures]
    batcher.close()
    assert sorted(calls) == [(1, 2), (5, 1)]
    assert [r.captions for r in results] == [["w1", "w2"], ["w3"], ["w4", "w5", "w6"]]
    assert [r.batch_images for r in results] == [5, 1, 5]


def test_batcher_splits_a_group_larger_than_max_batch() -> None:
    calls: list[tuple[int, int]] = []
    batcher = MicroBatcher(_recording_generate(calls), max_batch=2, max_wait_s=0)
    batcher.start()
    result = batcher.submit(_images(1, 2, 3, 4, 5), GenerateConfig()).result(timeout=10)
    batcher.close()
    assert calls == [(2, 5), (2, 5), (1, 5)]
    assert result.captions == ["w1", "w2", "w3", "w4", "w5"] and result.batch_images == 2


def test_batcher_captions_what_is_queued_before_it_stops() -> None:
    calls: list[tuple[int, int]] = []
    batcher = MicroBatcher(_recording_generate(calls), max_batch=8, max_wait_s=30)
    batcher.start()
    future = batcher.submit(_images(7), GenerateConfig())
    batcher.close()  # well before the 30 s wait is over
    assert future.result(timeout=0).captions == ["w7"]
    with pytest.raises(ApiError, match="not running"):
        batcher.submit(_images(1), GenerateConfig())


def test_concurrent_requests_are_captioned_in_one_generate_call(model_dir: Path) -> None:
    batching = ServeSettings(device="cpu", max_batch=4, max_wait_ms=5000)
    with TestClient(create_app(model_dir, batching)) as test_client, ThreadPoolExecutor(4) as pool:
        started = time.monotonic()
        responses = list(pool.map(lambda data: test_client.post("/v1/captions", files=_files(data)), [RED, BLUE] * 2))
        # The batch closes when its 4th image comes, not after the 5 s wait.
        assert time.monotonic() - started < 4
    assert [r.status_code for r in responses] == [200] * 4
    assert [r.json()["timing"]["batch_images"] for r in responses] == [4] * 4
    assert responses[0].json()["captions"] == responses[2].json()["captions"]


def test_batcher_answers_questions_in_one_call_apart_from_captions_with_a_prompt_per_image() -> None:
    calls: list[tuple[int, list[str] | None]] = []

    def generate(images: list[Image.Image], options: GenerateConfig, prompts: list[str] | None = None) -> list[str]:
        calls.append((len(images), prompts))
        return [f"w{image.width} {prompt}" if prompts else f"w{image.width}" for image, prompt in
                zip(images, prompts or [None] * len(images), strict=True)]  # fmt: skip

    # max_batch 3 splits the four questions into calls of 3 and 1, each image with its own prompt.
    batcher = MicroBatcher(generate, max_batch=3, max_wait_s=10)
    batcher.start()
    options = GenerateConfig()
    futures = [batcher.submit(_images(1), options, ["Q: a?"]), batcher.submit(_images(2), options),
               batcher.submit(_images(3, 4, 5), options, ["Q: b?", "Q: c?", "Q: d?"])]  # fmt: skip
    results = [future.result(timeout=10) for future in futures]
    batcher.close()
    assert sorted(calls, key=str) == sorted([(3, ["Q: a?", "Q: b?", "Q: c?"]), (1, ["Q: d?"]), (1, None)], key=str)
    assert [r.captions for r in results] == [["w1 Q: a?"], ["w2"], ["w3 Q: b?", "w4 Q: c?", "w5 Q: d?"]]
    with pytest.raises(ValueError, match="2 prompts for 1 images"):
        MicroBatcher(generate, 1, 0).submit(_images(1), options, ["a", "b"])
