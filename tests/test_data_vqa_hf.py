"""VQA from Hugging Face datasets (`captune.data.vqa.hf`): datasets built by the tests in code, read offline."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from pathlib import Path

import pytest
from datasets import DatasetDict

from captune.data.vqa import VqaReadOptions, read_vqa, vqa_summary
from captune.errors import CaptuneError

from .conftest import write_image
from .test_data_hf import caches, dataset, embedded, save

__all__ = ["caches"]  # the autouse fixture that keeps both caches inside tmp_path


def _answers(*texts: str) -> list[dict[str, object]]:
    """Answers as VQAv2 on the hub has them."""
    return [{"answer": text, "answer_confidence": "yes", "answer_id": k + 1} for k, text in enumerate(texts)]


def test_saved_dataset_dict_with_embedded_images_and_answer_objects(tmp_path: Path, caches: Path) -> None:
    train = dataset({"image": embedded(1, path="x.png") + embedded(1, path="x.png") + embedded(2, path="y.png"),
                     "question": ["What colour?", "Is it red?", "How many?"],
                     "answers": [_answers("red", "red", "dark red"), _answers("yes"), _answers("2", "two")],
                     "question_id": [101, 102, 103], "answer_type": ["other", "yes/no", "number"]})  # fmt: skip
    validation = dataset({"image": embedded(3), "question": ["Why?"], "answers": [_answers("because")],
                          "question_id": [201], "answer_type": ["other"]})  # fmt: skip
    test = dataset({"image": embedded(4), "question": ["Where?"], "answers": [None], "question_id": [301],
                    "answer_type": [None]})  # fmt: skip
    folder = save(DatasetDict({"train": train, "validation": validation, "test": test}), tmp_path / "vqa")
    vs = read_vqa("hf", folder)
    assert vs.problems == []
    assert [(q.question_id, q.split, q.answers) for q in vs.questions] == [
        (101, "train", ("red", "red", "dark red")), (102, "train", ("yes",)), (103, "train", ("2", "two")),
        (201, "val", ("because",)), (301, "test", ())]  # fmt: skip
    assert vs.questions[0].image_path == vs.questions[1].image_path != vs.questions[2].image_path
    assert vs.questions[0].image_path.is_relative_to(caches / "hf-images")
    assert vs.questions[2].answer_type == "number"
    summary = vqa_summary(vs)
    assert summary["splits"] == {"train": 3, "val": 1, "test": 1} and summary["images"] == 4
    assert any("no question of split(s) test has an answer" in note for note in vs.notes)
    assert any("4 embedded images written to" in note for note in vs.notes)


def test_configurable_columns_separated_answers_and_a_seeded_split(tmp_path: Path) -> None:
    paths = [str(write_image(tmp_path / "images" / f"{k}.jpg", (40 * k, 9, 9))) for k in range(4)]
    data = dataset({"img": paths, "q": ["What?", "Who?", "When?", "Which?"], "ans": ["a|b", "c", "d|d", "e"]},
                   image_column="img")  # fmt: skip
    options = VqaReadOptions(image_column="img", question_column="q", answers_column="ans", val_fraction=0.25,
                             test_fraction=0.25)  # fmt: skip
    vs = read_vqa("hf", save(data, tmp_path / "custom"), options)
    assert [q.answers for q in vs.questions] == [("a", "b"), ("c",), ("d", "d"), ("e",)]
    assert sorted(q.split for q in vs.questions) == ["test", "train", "train", "val"]
    assert [q.question_id for q in vs.questions] == ["data/0", "data/1", "data/2", "data/3"]
    assert any("split its 4 images with seed 0 into train/val/test 2/1/1" in note for note in vs.notes)


def test_bad_rows_are_problems_naming_split_and_row(tmp_path: Path) -> None:
    answers = [["yes"], ["no"], ["ok", ""], ["1"]]
    data = dataset({"image": embedded(1, 2, 3, 4), "question": ["Fine?", " ", "List?", "Number?"], "answers": answers,
                    "split": ["train", "train", "train", "dev"]})  # fmt: skip
    folder = save(data, tmp_path / "bad")
    vs = read_vqa("hf", folder)
    assert [(q.question, q.answers, q.split) for q in vs.questions] == [("Fine?", ("yes",), "train"),
                                                                       ("List?", ("ok",), "train"),
                                                                       ("Number?", ("1",), "val")]  # fmt: skip
    assert [p.problem for p in vs.problems] == [f"{folder}: data row 1: no question in 'question': \" \"",
                                                f"{folder}: data row 2: answers[1] is \"\", not an answer"]  # fmt: skip


def test_missing_question_column_lists_the_columns(tmp_path: Path) -> None:
    folder = save(dataset({"image": embedded(1), "text": ["Why?"], "answers": [["x"]]}), tmp_path / "d")
    with pytest.raises(CaptuneError, match=r"has no column 'question'; its columns are image, text, answers\. Name it "
                       r"with data.question_column=COLUMN"):  # fmt: skip
        read_vqa("hf", folder)
