"""The embedded default, on a reduced setting: fewer images, no per-epoch validation, the same code path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from captune.cli import main
from captune.data.synthetic import SyntheticSpec
from captune.demo import run_demo


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    output = tmp_path_factory.mktemp("demo")
    run_demo(output, SyntheticSpec(train=400, val=8, test=30), ["train.epochs=24", "train.validate=false"])
    return output


def test_demo_learns_to_caption_held_out_images(demo_dir: Path) -> None:
    metrics = json.loads((demo_dir / "metrics.json").read_text())
    keys = {"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr"}
    attributes = {"colour_right", "shape_right", "size_right", "position_right", "size_named"}
    assert set(metrics) == {"before", "after"} and set(metrics["before"]) == set(metrics["after"]) == keys | attributes
    before, after = metrics["before"], metrics["after"]
    assert before["CIDEr"] < 0.2
    assert after["CIDEr"] >= 3.0  # 400 train images, 24 epochs (~35 s): measured 0.000 -> 4.632
    # What the held-out captions say, against each image's drawing (measured: colour 0% -> 100%, position 0% -> 100%,
    # chance 25%, shape 0% -> 50%, chance 33%; the full demo, 1,200 images and 32 epochs: 100%, 100% and 94%).
    assert before["colour_right"] < 0.5 and before["position_right"] < 0.3
    assert after["colour_right"] >= 0.9 and after["position_right"] >= 0.9 and after["shape_right"] >= 0.4


def test_demo_model_is_loadable_by_the_caption_command(demo_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    images = sorted((demo_dir / "data" / "images").glob("test-*.png"))[:3]
    code = main(["caption", *map(str, images), "--model-dir", str(demo_dir / "model"), "--format", "jsonl"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert code == 0 and [r["image"] for r in rows] == list(map(str, images))
    assert all(r["caption"].split() for r in rows)


@pytest.fixture(scope="module")
def vqa_demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    output = tmp_path_factory.mktemp("demo-vqa")
    run_demo(output, SyntheticSpec(train=200, val=8, test=30), ["train.epochs=24", "train.validate=false"], "vqa")
    return output


def test_vqa_demo_learns_to_answer_questions_about_held_out_images(vqa_demo_dir: Path) -> None:
    metrics = json.loads((vqa_demo_dir / "metrics.json").read_text())
    assert set(metrics) == {"before", "after"} and {"vqa_accuracy", "vqa_accuracy_yes_no"} <= set(metrics["after"])
    assert metrics["before"]["vqa_accuracy"] < 10.0  # a random model's answers are not words of the answer set
    # 200 train images, 24 epochs (~25 s): measured 0.0% -> 61.3% (colour 100%; the full demo: 95.8%)
    assert metrics["after"]["vqa_accuracy"] >= 50.0
    answers = [
        json.loads(line) for line in (vqa_demo_dir / "eval-after" / "per_question.jsonl").read_text().splitlines()
    ]
    assert len(answers) == 150  # five questions of each of the 30 test images
    # The open questions are answered with a word, the yes/no questions with yes or no (`tiny-vqa`'s tokenizer has
    # them: captune.tiny.VQA_WORDS); every colour question right.
    assert all(a["answer"] for a in answers if a["answer_type"] == "other")
    assert {a["answer"] for a in answers if a["answer_type"] == "yes/no"} <= {"yes", "no"}
    colour = [a["accuracy"] for a in answers if a["question"].startswith("what colour")]
    assert len(colour) == 30 and sum(colour) / len(colour) >= 90.0


@pytest.fixture(scope="module")
def retrieval_demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    output = tmp_path_factory.mktemp("demo-retrieval")
    run_demo(output, SyntheticSpec(train=200, val=8, test=30), ["train.epochs=4", "train.validate=false"], "retrieval")
    return output


def test_retrieval_demo_ranks_held_out_images_better_after_fine_tuning(retrieval_demo_dir: Path) -> None:
    metrics = json.loads((retrieval_demo_dir / "metrics.json").read_text())
    before, after = metrics["before"], metrics["after"]
    # 200 train images, 4 epochs: r_mean 17.9 -> 23.0 (text->image 18.0 -> 23.8, image->text 17.8 -> 22.2); R@1
    # stays near chance (1 in 30) in so short a run, so it is not asserted here (the full demo: 49% text->image).
    assert after["r_mean"] > before["r_mean"] + 5
    assert after["img_r_mean"] > before["img_r_mean"] and after["txt_r_mean"] > before["txt_r_mean"]
    assert json.loads((retrieval_demo_dir / "eval-after" / "metrics.json").read_text()) == after


def test_retrieval_demo_holds_out_distinct_images(retrieval_demo_dir: Path) -> None:
    manifest = json.loads((retrieval_demo_dir / "data" / "synthetic.json").read_text())
    test = [entry["captions"][0] for entry in manifest["images"] if entry["split"] == "test"]
    assert len(test) == 30 and len(set(test)) == 30  # each held-out image its own colour, shape, size and position
