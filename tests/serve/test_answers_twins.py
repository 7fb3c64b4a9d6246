"""POST /v1/answers on VQA runs of the twins of blip2-opt-2.7b and blip2-flan-t5-xl: a question alone, and four
questions of different lengths about two images in one generate call, and questions padded to a multiple of 16
tokens by a static-cache server, get plain transformers' answer to each question alone, without the end token's
text; the model says it answers with the run's template."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from transformers import Blip2Processor

from captune.serve import ServeSettings, create_app

from .. import vqa_twins
from ..vqa_twins import MAX_NEW_TOKENS, QUESTIONS, TEMPLATE, TwinRun, assert_no_end_text, save_twin_vqa_run
from .conftest import SETTINGS

twin_run = vqa_twins.twin_run

ASKED = [("red.png", QUESTIONS[0]), ("blue.png", QUESTIONS[1]), ("red.png", QUESTIONS[2]), ("blue.png", QUESTIONS[3])]
"""Answers of both twins that stop at the end token and answers that run to max_new_tokens."""


@pytest.fixture(scope="module")
def client(twin_run: TwinRun) -> Iterator[TestClient]:
    with TestClient(create_app(twin_run.model_dir, SETTINGS)) as test_client:
        yield test_client


def _ask(client: TestClient, run: TwinRun, image: str, question: str) -> Any:
    upload = ("image", (image, (run.folder / image).read_bytes(), "image/png"))
    response = client.post("/v1/answers", files=[upload], data={"question": question})
    assert response.status_code == 200, response.text
    return response.json()


def test_an_answer_is_what_transformers_gives_the_question_alone(client: TestClient, twin_run: TwinRun) -> None:
    bodies = [_ask(client, twin_run, image, question) for image, question in ASKED]
    answers = [body["answer"] for body in bodies]
    assert answers == [twin_run.expected[pair] for pair in ASKED]
    assert_no_end_text(twin_run.name, answers)
    assert bodies[0]["options"] == {"num_beams": 1, "min_new_tokens": 1, "max_new_tokens": MAX_NEW_TOKENS,
                                    "repetition_penalty": 1.0}  # fmt: skip
    info = client.get("/v1/model").json()
    assert (info["tasks"], info["question_template"]) == (["caption", "vqa"], TEMPLATE)


def test_questions_of_different_lengths_in_one_generate_call_get_their_answers_alone(twin_run: TwinRun) -> None:
    batching = ServeSettings(device="cpu", max_batch=4, max_wait_ms=5000)
    with TestClient(create_app(twin_run.model_dir, batching)) as batched, ThreadPoolExecutor(4) as pool:
        bodies = list(pool.map(lambda pair: _ask(batched, twin_run, *pair), ASKED))
    assert [body["timing"]["batch_images"] for body in bodies] == [4] * 4
    answers = [body["answer"] for body in bodies]
    assert answers == [twin_run.expected[pair] for pair in ASKED]
    assert_no_end_text(twin_run.name, answers)


def test_a_static_cache_server_pads_questions_to_a_multiple_of_16_tokens_and_answers_as_transformers(
    twin_run: TwinRun, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import captune.serve.app as serve

    static_dir = save_twin_vqa_run(tmp_path, twin_run.name, ["static_cache=true"])  # the same seed: the same weights
    lengths: list[int | None] = []
    real = serve.generate_from_pixels

    def recording(model: Any, processor: Any, pixels: Any, options: Any, prompts: Any, **kwargs: Any) -> list[str]:
        lengths.append(kwargs["prompt_length"])
        return real(model, processor, pixels, options, prompts, **kwargs)

    monkeypatch.setattr(serve, "generate_from_pixels", recording)
    with TestClient(create_app(static_dir, replace(SETTINGS, max_batch=1))) as static_client:
        answers = [_ask(static_client, twin_run, image, question)["answer"] for image, question in ASKED]
    tokenizer = Blip2Processor.from_pretrained(static_dir).tokenizer
    tokens = [len(tokenizer(TEMPLATE.format(question)).input_ids) for _, question in ASKED]
    assert max(tokens) > 16 and min(tokens) < 16  # two cache shapes
    assert lengths[-len(ASKED) :] == [16 * -(-n // 16) for n in tokens]  # (the server's warm-up call first)
    assert answers == [twin_run.expected[pair] for pair in ASKED]
    assert_no_end_text(twin_run.name, answers)
