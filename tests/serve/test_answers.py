"""POST /v1/answers: one question about one image gets the answer of the plain generation path with the run's
question template, as multipart or JSON; questions batched together (different lengths, beside captions) get the
answers they get alone; a static cache pads questions to a few lengths; the requests it refuses; the model's tasks;
the OpenAPI document."""

from __future__ import annotations

import base64
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from captune.config import GenerateConfig
from captune.data.images import load_rgb
from captune.generation.core import generate_captions
from captune.model_dir import load_model_dir, save_tiny_model_dir
from captune.serve import ServeSettings, create_app
from captune.serve.settings import MAX_QUESTION_CHARS

from .conftest import BLUE, RED, SETTINGS, _assert_healthy, _error, _files

QUESTIONS = ["what colour is the circle?", "is there a square on the left of the picture?", "how big?",
             "which shape is at the top right, and is it large or small?"]  # fmt: skip


def _ask(client: TestClient, image: bytes, question: str, **options: str) -> Any:
    response = client.post("/v1/answers", files=[("image", ("photo.png", image, "image/png"))],
                           data={"question": question, **options})  # fmt: skip
    assert response.status_code == 200, response.text
    return response.json()


def test_an_answer_is_what_generate_captions_gives_with_the_question_template(
    client: TestClient, model_dir: Path, tmp_path: Path
) -> None:
    body = _ask(client, RED, f"  {QUESTIONS[0]} ")
    loaded = load_model_dir(model_dir, device="cpu")
    (tmp_path / "red.png").write_bytes(RED)
    options = GenerateConfig(num_beams=1, min_new_tokens=1, max_new_tokens=5)
    prompt = f"Question: {QUESTIONS[0]} Answer:"  # the run's data.question_template, the default
    expected = generate_captions(loaded.model, loaded.processor, [load_rgb(tmp_path / "red.png")], options, [prompt])
    assert body["answer"] == expected[0]
    assert (body["question"], body["filename"]) == (QUESTIONS[0], "photo.png")
    assert body["options"] == {"num_beams": 1, "min_new_tokens": 1, "max_new_tokens": 5, "repetition_penalty": 1.0}
    assert body["timing"]["batch_images"] == 1 and 0 < body["timing"]["generate_ms"] <= body["timing"]["total_ms"]


def test_a_json_request_gets_the_answer_of_the_upload_and_takes_options(client: TestClient) -> None:
    uploaded = _ask(client, BLUE, QUESTIONS[1], num_beams="3", max_new_tokens="2")
    image = "data:image/png;base64," + base64.b64encode(BLUE).decode()
    response = client.post("/v1/answers", json={"image": image, "question": QUESTIONS[1], "num_beams": 3,
                                                "max_new_tokens": 2})  # fmt: skip
    assert response.status_code == 200, response.text
    assert response.json()["answer"] == uploaded["answer"] and response.json()["filename"] is None
    assert (
        response.json()["options"]
        == uploaded["options"]
        == {"num_beams": 3, "min_new_tokens": 1, "max_new_tokens": 2, "repetition_penalty": 1.0}
    )
    assert len(uploaded["answer"].split()) <= 2


def test_questions_batched_together_get_the_answers_they_get_alone(client: TestClient, model_dir: Path) -> None:
    images = [RED, BLUE, BLUE, RED]
    alone = [_ask(client, image, question)["answer"] for image, question in zip(images, QUESTIONS, strict=True)]
    batching = ServeSettings(device="cpu", max_batch=4, max_wait_ms=5000)
    with TestClient(create_app(model_dir, batching)) as batched, ThreadPoolExecutor(4) as pool:
        bodies = list(pool.map(lambda pair: _ask(batched, *pair), zip(images, QUESTIONS, strict=True)))
    assert [body["timing"]["batch_images"] for body in bodies] == [4] * 4  # one generate call, four questions
    assert [body["answer"] for body in bodies] == alone
    assert [body["question"] for body in bodies] == QUESTIONS


def test_captions_and_questions_queued_together_go_to_separate_calls(client: TestClient, model_dir: Path) -> None:
    caption_alone = client.post("/v1/captions", files=_files(RED)).json()["captions"][0]["caption"]
    answer_alone = _ask(client, RED, QUESTIONS[2])["answer"]
    batching = ServeSettings(device="cpu", max_batch=4, max_wait_ms=5000)
    with TestClient(create_app(model_dir, batching)) as batched, ThreadPoolExecutor(4) as pool:
        captions = [pool.submit(batched.post, "/v1/captions", files=_files(RED)) for _ in range(2)]
        answers = [pool.submit(_ask, batched, RED, QUESTIONS[2]) for _ in range(2)]
        caption_bodies = [future.result().json() for future in captions]
        answer_bodies = [future.result() for future in answers]
    # Four images gathered into one batch, generated as two calls of two: captions with the model's prompt alone.
    assert [body["timing"]["batch_images"] for body in caption_bodies + answer_bodies] == [2] * 4
    assert [body["captions"][0]["caption"] for body in caption_bodies] == [caption_alone] * 2
    assert [body["answer"] for body in answer_bodies] == [answer_alone] * 2


def test_a_static_cache_pads_questions_to_a_multiple_of_16_tokens_and_answers_as_the_dynamic_one(
    tmp_path: Path, client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    import captune.serve.app as serve

    static_dir = save_tiny_model_dir(tmp_path, ["num_beams=1", "min_new_tokens=1", "max_new_tokens=5",
                                                "static_cache=true"])  # fmt: skip
    calls: list[tuple[int, int | None]] = []
    real = serve.generate_from_pixels

    def recording(model: Any, processor: Any, pixels: Any, options: Any, prompts: Any, **kwargs: Any) -> list[str]:
        calls.append((len(prompts), kwargs["prompt_length"]))
        return real(model, processor, pixels, options, prompts, **kwargs)

    monkeypatch.setattr(serve, "generate_from_pixels", recording)
    with TestClient(create_app(static_dir, SETTINGS)) as static_client:
        answers = [_ask(static_client, RED, question)["answer"] for question in QUESTIONS[:2]]
    assert calls == [(1, 16), (1, 16)]  # both questions fit 16 prompt tokens: one cache shape
    assert answers == [_ask(client, RED, question)["answer"] for question in QUESTIONS[:2]]


# --- requests refused ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("files", "data", "status", "code", "named"),
    [
        ([], {"question": "why?"}, 422, "no_images", "0 images: a question is about one image"),
        ([RED, BLUE], {"question": "why?"}, 422, "too_many_images", "2 images: a question is about one image"),
        ([RED], {}, 422, "no_question", "no question: send the field `question`"),
        ([RED], {"question": "   "}, 422, "invalid_question", "question: empty"),
        ([RED], {"question": "x" * (MAX_QUESTION_CHARS + 1)}, 422, "invalid_question",
         f"question: {MAX_QUESTION_CHARS + 1} characters; this server takes at most {MAX_QUESTION_CHARS}"),
        ([RED], {"question": "is it? " * 60}, 422, "question_too_long", "exceed this model's 128 positions"),
        ([RED], {"question": "why?", "num_beams": "4"}, 422, "invalid_options",
         "num_beams: Input should be less than or equal to 3"),
        ([RED], {"question": "why?", "temperature": "1"}, 422, "invalid_options",
         "temperature: Extra inputs are not permitted"),
        ([b"not a picture"], {"question": "why?"}, 415, "not_an_image", "0-photo.png: not an image"),
    ],
)  # fmt: skip
def test_a_bad_multipart_request_gets_an_error_naming_what_to_fix(
    client: TestClient, files: list[bytes], data: dict[str, str], status: int, code: str, named: str
) -> None:
    parts = [("image", (f"{i}-photo.png", image, "image/png")) for i, image in enumerate(files)]
    # httpx sends data alone as a form; a part of another field keeps the body multipart when there is no image.
    response = client.post("/v1/answers", files=parts or [("other", ("x.txt", b"x", "text/plain"))], data=data)
    assert named in _error(response, status, code)
    _assert_healthy(client)


@pytest.mark.parametrize(
    ("payload", "code", "named"),
    [
        ({"image": base64.b64encode(RED).decode()}, "invalid_request", "question: Field required"),
        ({"question": "why?"}, "invalid_request", "image: Field required"),
        ({"image": [base64.b64encode(RED).decode()], "question": "why?"}, "invalid_request", "image: Input should be "
         "a valid string"),
        ({"image": "https://example.com/a.png", "question": "why?"}, "url_not_fetched", "image: this server never "
         "fetches URLs"),
        ({"image": "%%%", "question": "why?"}, "invalid_base64", "image: not valid base64"),
        ({"image": base64.b64encode(RED).decode(), "question": "x" * (MAX_QUESTION_CHARS + 1)}, "invalid_request",
         f"question: String should have at most {MAX_QUESTION_CHARS} characters"),
    ],
)  # fmt: skip
def test_a_bad_json_request_gets_422_naming_the_field(
    client: TestClient, payload: dict[str, Any], code: str, named: str
) -> None:
    assert named in _error(client.post("/v1/answers", json=payload), 422, code)


def test_a_failed_generate_call_gets_500_and_the_server_lives_on(model_dir: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    import captune.serve.app as serve

    def fail(*args: Any, **kwargs: Any) -> list[str]:
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(serve, "generate_from_pixels", fail)
    with TestClient(create_app(model_dir, SETTINGS)) as test_client:
        response = test_client.post("/v1/answers", files=[("image", ("a.png", RED, "image/png"))],
                                    data={"question": "why?"})  # fmt: skip
        message = _error(response, 500, "generation_failed")
        assert message.startswith("answering failed (RuntimeError)") and "CUDA" not in message
        _assert_healthy(test_client)


# --- the model's tasks, the OpenAPI document -----------------------------------------------------------------------


def test_a_caption_run_says_it_was_trained_for_captions(client: TestClient) -> None:
    info = client.get("/v1/model").json()
    assert (info["tasks"], info["fine_tuned"]) == (["caption"], True)
    assert info["question_template"] == "Question: {} Answer:"


def test_a_vqa_run_says_caption_and_vqa_with_its_template(tmp_path: Path) -> None:
    run = save_tiny_model_dir(
        tmp_path, ["task=vqa", "data.question_template=Question: {} Short answer:", "num_beams=1", "max_new_tokens=5"]
    )
    with TestClient(create_app(run, SETTINGS)) as test_client:
        info = test_client.get("/v1/model").json()
        answered = _ask(test_client, RED, "why?")
    assert (info["tasks"], info["fine_tuned"]) == (["caption", "vqa"], True)
    assert info["question_template"] == "Question: {} Short answer:"
    assert answered["question"] == "why?"


def test_a_plain_blip2_is_zero_shot_for_both_tasks(model_dir: Path, tmp_path: Path) -> None:
    plain = shutil.copytree(model_dir.parent / "base-model", tmp_path / "plain")
    # A plain BLIP-2 generates with captune's defaults (beams and lengths over SETTINGS' small limits).
    with TestClient(create_app(plain, replace(SETTINGS, max_num_beams=10, max_new_tokens=100))) as test_client:
        info = test_client.get("/v1/model").json()
    assert (info["tasks"], info["fine_tuned"], info["adapter"]) == (["caption", "vqa"], False, None)


def test_openapi_document_describes_the_answers_request_and_response(client: TestClient) -> None:
    document = client.get("/openapi.json").json()
    post = document["paths"]["/v1/answers"]["post"]
    content = post["requestBody"]["content"]
    multipart = content["multipart/form-data"]["schema"]
    assert multipart["required"] == ["image", "question"] and multipart["properties"]["image"]["format"] == "binary"
    assert multipart["properties"]["question"]["maxLength"] == MAX_QUESTION_CHARS
    assert {"num_beams", "max_new_tokens"} <= set(multipart["properties"])
    json_schema = content["application/json"]["schema"]
    assert set(json_schema["required"]) == {"image", "question"}
    assert json_schema["properties"]["num_beams"]["anyOf"][0]["maximum"] == SETTINGS.max_num_beams
    assert {"200", "413", "415", "422", "503"} <= set(post["responses"])
    response = post["responses"]["200"]["content"]["application/json"]["schema"]["$ref"]
    assert set(document["components"]["schemas"][response.split("/")[-1]]["properties"]) == {
        "answer", "question", "filename", "options", "timing"}  # fmt: skip
