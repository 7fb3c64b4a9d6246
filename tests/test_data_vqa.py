"""VQA readers (`captune.data.vqa`): VQAv2 / OK-VQA, A-OKVQA and manifests from files the tests write, the problems
each bad entry gets, the summary for `data check`, the image check, and the synthetic questions."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from captune.data.synthetic import drawings, synthetic_questions
from captune.data.vqa import VqaReadOptions, VqaSet, check_vqa_images, read_vqa, vqa_summary
from captune.errors import CaptuneError
from captune.vqa_accuracy import vqa_accuracy

from .conftest import SMALL_SPEC, write_image, write_truncated_jpeg

ANSWERS = ["2", "two", "2", "2", "3", "2", "2", "two", "2", "2"]


def _problems(vs: VqaSet) -> list[str]:
    return [p.problem for p in vs.problems]


def _vqav2_split(root: Path, subtype: str, questions: list[dict], annotations: list[dict] | None, v2: str = "v2_",
                 images: bool = True) -> None:  # fmt: skip
    """One split's official files under Questions/ and Annotations/, and its images under <subtype folder>/."""
    header = {"info": {}, "license": {}, "data_subtype": subtype}
    path = root / "Questions" / f"{v2}OpenEnded_mscoco_{subtype}_questions.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**header, "task_type": "Open-Ended", "data_type": "mscoco", "questions": questions}))
    if annotations is not None:
        (root / "Annotations").mkdir(exist_ok=True)
        (root / "Annotations" / f"{v2}mscoco_{subtype}_annotations.json").write_text(
            json.dumps({**header, "annotations": annotations})
        )
    folder = subtype.replace("test-dev", "test")
    for image_id in {q["image_id"] for q in questions if isinstance(q, dict)} if images else ():
        if isinstance(image_id, int):
            write_image(root / folder / f"COCO_{folder}_{image_id:012d}.jpg", (image_id % 255, 90, 30))


def _question(question_id: int, image_id: int, text: str = "How many dogs?") -> dict:
    return {"question_id": question_id, "image_id": image_id, "question": text}


def _annotation(question_id: int, image_id: int, answers: list[str] = ANSWERS) -> dict:
    listed = [{"answer": a, "answer_confidence": "yes", "answer_id": k + 1} for k, a in enumerate(answers)]
    return {"question_id": question_id, "image_id": image_id, "question_type": "how many", "answer_type": "number",
            "multiple_choice_answer": answers[0], "answers": listed}  # fmt: skip


@pytest.fixture
def vqav2(tmp_path: Path) -> Path:
    """train (2 images, 3 questions), val (1), test and test-dev (one shared question), all files official."""
    _vqav2_split(tmp_path, "train2014", [_question(1, 10), _question(2, 10, "Is it red?"), _question(3, 11)],
                 [_annotation(1, 10), _annotation(2, 10, ["yes"] * 10), _annotation(3, 11)])  # fmt: skip
    _vqav2_split(tmp_path, "val2014", [_question(7, 20)], [_annotation(7, 20)])
    _vqav2_split(tmp_path, "test2015", [_question(30, 30), _question(31, 31)], None)
    _vqav2_split(tmp_path, "test-dev2015", [_question(30, 30)], None)
    return tmp_path


def test_vqav2_reads_every_split_with_answers_types_and_images(vqav2: Path) -> None:
    vs = read_vqa("vqav2", vqav2)
    assert vs.problems == []
    assert [(q.split, q.question_id) for q in vs.questions] == [("train", 1), ("train", 2), ("train", 3),
                                                                ("val", 7), ("test", 30), ("test", 31),
                                                                ("test-dev", 30)]  # fmt: skip
    first = vs.questions[0]
    assert first.question == "How many dogs?" and first.answers == tuple(ANSWERS)
    assert first.answer_counts() == [("2", 7), ("two", 2), ("3", 1)]
    assert (first.answer_type, first.question_type) == ("number", "how many")
    assert first.image_path == vqav2 / "train2014" / "COCO_train2014_000000000010.jpg"
    assert vs.split("test-dev")[0].image_path == vqav2 / "test2015" / "COCO_test2015_000000000030.jpg"
    assert vs.split("test")[0].answers == ()
    assert any("no annotation file (v2_mscoco_test2015_annotations.json)" in n for n in vs.notes)
    assert any("1 unanswered question(s) are listed in two splits" in n for n in vs.notes)


def test_vqav2_summary_counts_questions_per_split_and_answers_per_question(vqav2: Path) -> None:
    summary = vqa_summary(read_vqa("vqav2", vqav2))
    assert summary["questions"] == 7 and summary["images"] == 5 and summary["answers"] == 40
    assert summary["splits"] == {"train": 3, "val": 1, "test": 2, "test-dev": 1}
    assert summary["images_per_split"] == {"train": 2, "val": 1, "test": 2, "test-dev": 1}
    assert summary["answers_per_question"] == {"0": 3, "10": 4}
    assert summary["answer_types"] == {"number": 4}


def test_vqav2_bad_entries_are_problems_naming_file_and_entry(tmp_path: Path) -> None:
    questions = [_question(1, 10), "oops", _question(2, 10, "  "), _question(1, 11), _question(4, 12), _question(5, 13),
                 _question(6, 14)]  # fmt: skip
    annotations = [_annotation(1, 10), _annotation(4, 99), _annotation(77, 12), _annotation(6, 14, ["", "x", 3])]
    _vqav2_split(tmp_path, "val2014", questions, annotations)
    (tmp_path / "val2014" / "COCO_val2014_000000000013.jpg").unlink()
    vs = read_vqa("vqav2", tmp_path)
    assert [q.question_id for q in vs.questions] == [1, 6]
    assert vs.questions[1].answers == ("x",)
    qfile, afile = "v2_OpenEnded_mscoco_val2014_questions.json", "v2_mscoco_val2014_annotations.json"
    expected = [
        rf"{qfile}: questions\[1\]: not an object",
        rf"{qfile}: questions\[2\]: 'question' is '  '",
        rf"{qfile}: questions\[3\]: question_id 1 is .*questions\[0\] already",
        rf"{afile}: annotations\[1\]: image_id 99 differs from 12",
        rf"{afile}: annotations\[2\]: question_id 77 is not a usable question",
        rf"{afile}: annotations\[3\]: answers\[0\] is {{\"answer\": \"\", .*, not an answer; not used",
        rf"{afile}: annotations\[3\]: answers\[2\] is {{\"answer\": 3, ",
        rf"{qfile}: questions\[4\]: question_id 4 has no annotation",
        rf"{qfile}: questions\[5\]: question_id 5 has no annotation",
    ]
    problems = _problems(vs)
    assert len(problems) == len(expected)
    for pattern, problem in zip(expected, problems, strict=True):
        assert re.search(pattern, problem), (pattern, problem)


def test_vqav2_missing_image_is_one_problem_counting_its_questions(tmp_path: Path) -> None:
    _vqav2_split(tmp_path, "train2014", [_question(1, 10), _question(2, 10, "Why?")], [_annotation(1, 10),
                 _annotation(2, 10)])  # fmt: skip
    (tmp_path / "train2014" / "COCO_train2014_000000000010.jpg").unlink()
    vs = read_vqa("vqav2", tmp_path)
    assert vs.questions == []
    assert len(vs.problems) == 1 and "image file missing" in vs.problems[0].problem
    assert "(2 question(s) of this image not used)" in vs.problems[0].problem


def test_vqav2_split_without_image_folder_is_a_problem_and_the_rest_is_read(tmp_path: Path) -> None:
    _vqav2_split(tmp_path, "train2014", [_question(1, 10)], [_annotation(1, 10)])
    _vqav2_split(tmp_path, "test2015", [_question(30, 30)], None, images=False)
    vs = read_vqa("vqav2", tmp_path)
    assert [q.question_id for q in vs.questions] == [1]
    assert len(vs.problems) == 1 and "no image folder test2015" in vs.problems[0].problem
    assert "its 1 questions are not used" in vs.problems[0].problem


def test_okvqa_files_are_read_by_the_same_reader(tmp_path: Path) -> None:
    _vqav2_split(tmp_path, "val2014", [_question(5, 10, "What sport?")], [_annotation(5, 10, ["tennis"] * 10)], v2="")
    vs = read_vqa("okvqa", tmp_path)
    assert [(q.question, q.answers[0], q.split) for q in vs.questions] == [("What sport?", "tennis", "val")]


def test_vqav2_two_versions_of_one_split_is_an_error_naming_them(tmp_path: Path) -> None:
    _vqav2_split(tmp_path, "val2014", [_question(5, 10)], [_annotation(5, 10)])
    _vqav2_split(tmp_path, "val2014", [_question(5, 10)], [_annotation(5, 10)], v2="")
    with pytest.raises(CaptuneError, match="2 questions files of val2014: .*; name the one to read with --annotations"):
        read_vqa("vqav2", tmp_path)
    one = read_vqa("vqav2", tmp_path, VqaReadOptions(annotations="Questions/OpenEnded_mscoco_val2014_questions.json"))
    assert len(one.questions) == 1


def test_vqav2_an_image_in_two_answered_splits_is_a_problem(tmp_path: Path) -> None:
    _vqav2_split(tmp_path, "train2014", [_question(1, 10)], [_annotation(1, 10)])
    (tmp_path / "val2014").symlink_to(tmp_path / "train2014")
    (tmp_path / "train2014" / "COCO_val2014_000000000010.jpg").symlink_to("COCO_train2014_000000000010.jpg")
    _vqav2_split(tmp_path, "val2014", [_question(2, 10)], [_annotation(2, 10)], images=False)
    vs = read_vqa("vqav2", tmp_path)
    assert [q.question_id for q in vs.questions] == [1]
    assert "which is in train; an image belongs to one split" in vs.problems[0].problem


def _aokvqa(root: Path, split: str, entries: list[object]) -> None:
    (root / f"aokvqa_v1p0_{split}.json").write_text(json.dumps(entries))
    for entry in entries:
        if isinstance(entry, dict) and isinstance(entry.get("image_id"), int):
            write_image(root / "coco" / f"{split}2017" / f"{entry['image_id']:012d}.jpg")


def test_aokvqa_reads_direct_answers_and_a_test_split_without_them(tmp_path: Path) -> None:
    answers = ["pizza"] * 6 + ["cheese pizza"] * 4
    _aokvqa(tmp_path, "train", [{"question_id": "a1", "image_id": 5, "question": "What food?", "choices": ["x"],
                                 "direct_answers": answers}, {"question_id": "a2", "image_id": 6, "question": "Why?",
                                 "direct_answers": "pizza"}])  # fmt: skip
    _aokvqa(tmp_path, "test", [{"question_id": "t1", "image_id": 7, "question": "Where?", "choices": ["y"]}])
    vs = read_vqa("aokvqa", tmp_path)
    assert [(q.question_id, q.split, q.answers) for q in vs.questions] == [("a1", "train", tuple(answers)),
                                                                           ("t1", "test", ())]  # fmt: skip
    assert vs.questions[0].image_path == tmp_path / "coco" / "train2017" / "000000000005.jpg"
    assert _problems(vs) == [f"{tmp_path / 'aokvqa_v1p0_train.json'}: [1]: 'direct_answers' is 'pizza'; expected a "
                             "list of answers; the question is not used"]  # fmt: skip
    assert vs.notes == ["aokvqa_v1p0_test.json: no direct answers (a test split)"]


def _manifest(root: Path, name: str, lines: list[str], images: tuple[str, ...] = ("a.jpg", "b.jpg", "c.jpg")) -> Path:
    for image in images:
        write_image(root / "images" / image)
    (root / name).write_text("\n".join(lines) + "\n")
    return root / name


def _row(image: str, question: str, split: str | None = "train", **cells: object) -> str:
    row: dict[str, object] = {"image": f"images/{image}", "question": question, **cells}
    return json.dumps(row | ({"split": split} if split else {}))


def test_jsonl_manifest_answers_as_lists_strings_and_rows_per_answer(tmp_path: Path) -> None:
    path = _manifest(tmp_path, "questions.jsonl", [
        _row("a.jpg", "What is it?", answers=["a cup", "cup", "mug"], answer_type="other", question_id=11),
        _row("a.jpg", "What colour?", answers="red|dark red"),
        _row("b.jpg", "How many?", "val", answer="2"),
        _row("b.jpg", "How many?", "val", answer="two"),
        _row("c.jpg", "Is it blue?", "test"),
    ])  # fmt: skip
    vs = read_vqa("manifest", path)
    assert vs.problems == []
    assert [(q.question_id, q.image_id, q.answers, q.split) for q in vs.questions] == [
        (11, "images/a.jpg", ("a cup", "cup", "mug"), "train"), (2, "images/a.jpg", ("red", "dark red"), "train"),
        (3, "images/b.jpg", ("2", "two"), "val"), (5, "images/c.jpg", (), "test")]  # fmt: skip
    assert vs.questions[0].answer_type == "other"
    assert any("1 row(s) add answers to the question of an earlier row" in n for n in vs.notes)
    assert (
        "questions.jsonl: no question of split(s) test has an answer: they are read as splits without answers "
        "(as a test split)" in vs.notes
    )


def test_csv_manifest_separated_answers_and_a_seeded_split(tmp_path: Path) -> None:
    lines = ["image,question,answers", "images/a.jpg,What is it?,cup|mug", "images/b.jpg,What is it?,dog",
             "images/c.jpg,\"Where, then?\",\"left, top\""]  # fmt: skip
    vs = read_vqa(
        "manifest", _manifest(tmp_path, "questions.csv", lines), VqaReadOptions(val_fraction=0.34, test_fraction=0.34)
    )
    assert [q.answers for q in vs.questions] == [("cup", "mug"), ("dog",), ("left, top",)]
    assert sorted(q.split for q in vs.questions) == ["test", "train", "val"]
    assert any(
        "questions.csv gives no 'split': split its 3 images with seed 0 into train/val/test" in n for n in vs.notes
    )
    assert read_vqa("manifest", tmp_path / "questions.csv", VqaReadOptions(answer_separator="")).questions[0].answers \
        == ("cup|mug",)  # fmt: skip


def test_manifest_bad_rows_are_problems_at_their_line(tmp_path: Path) -> None:
    path = _manifest(tmp_path, "questions.jsonl", [
        _row("a.jpg", "Fine?", answers=["yes"]),
        '{"image": "images/a.jpg", "question": ',
        _row("a.jpg", "", answers=["yes"]),
        _row("b.jpg", "Two columns?", answers=["x"], answer="y"),
        _row("b.jpg", "No answer?"),
        _row("c.jpg", "Unsplit?", None, answers=["z"]),
        _row("a.jpg", "Other split?", "test", answers=["w"]),
        _row("missing.jpg", "Where?", answers=["v"]),
        _row("b.jpg", "Bad list?", answers=["ok", 7]),
    ])  # fmt: skip
    vs = read_vqa("manifest", path)
    assert [q.question for q in vs.questions] == ["Fine?", "Two columns?", "Bad list?"]
    expected = [
        f"{path}:2: not valid JSON", f"{path}:3: no question in 'question'",
        f"{path}:4: gives both 'answers' and 'answer'", f"{path}:9: answers[1] is 7, not an answer",
        f"{path}:5: no answer in 'answers' or 'answer'", f"{path}:6: no split, though {path}:1 gives one",
        f"{path}:7: ", f"{path}:8: image file missing",
    ]  # fmt: skip
    problems = _problems(vs)
    assert len(problems) == len(expected)
    assert all(problem.startswith(prefix) for prefix, problem in zip(expected, problems, strict=True)), problems
    assert "an image belongs to one split" in problems[6]


def test_manifest_without_a_question_column_is_an_error(tmp_path: Path) -> None:
    path = _manifest(tmp_path, "questions.csv", ["image,text,answer", "images/a.jpg,Why?,because"])
    with pytest.raises(CaptuneError, match=r"questions.csv:1: no column 'question' in the header"):
        read_vqa("manifest", path)
    assert read_vqa("manifest", path, VqaReadOptions(question_column="text")).questions[0].answers == ("because",)


def test_image_check_moves_the_questions_of_a_bad_image_to_one_problem(tmp_path: Path) -> None:
    path = _manifest(tmp_path, "questions.jsonl", [_row("a.jpg", "One?", answers=["1"]),
                     _row("a.jpg", "Two?", answers=["2"]), _row("b.jpg", "Three?", answers=["3"])])  # fmt: skip
    write_truncated_jpeg(tmp_path / "images" / "a.jpg")
    checked = check_vqa_images(read_vqa("manifest", path), workers=1, progress=False)
    assert [q.question for q in checked.questions] == ["Three?"]
    assert len(checked.problems) == 1 and checked.problems[0].image == "images/a.jpg"
    assert "truncated or corrupt" in checked.problems[0].problem
    assert "(2 question(s) of this image not used)" in checked.problems[0].problem


def test_unknown_vqa_format_names_the_choices() -> None:
    with pytest.raises(CaptuneError, match="unknown VQA data format 'gqa'; choose one of: vqav2, okvqa, aokvqa"):
        read_vqa("gqa", ".")


def test_synthetic_questions_follow_the_caption_images_and_hold_out_test(synthetic_dir: Path) -> None:
    vs = read_vqa("synthetic", synthetic_dir)
    captions = {e["image"]: e for e in json.loads((synthetic_dir / "synthetic.json").read_text())["images"]}
    assert vqa_summary(vs)["splits"] == {"train": 120, "val": 30, "test": 30}
    assert vs.problems == []
    for q in vs.questions:
        entry = captions[q.image_id]
        assert q.split == entry["split"] and len(q.answers) == 10
        if q.answer_type == "other":
            assert q.answers[0] in entry["captions"][0].split()  # "a {size} {colour} {shape} on the {position}"
    test_images = {q.image_id for q in vs.split("test")}
    assert test_images and test_images.isdisjoint(q.image_id for q in vs.split("train"))
    yes_no = [q.answers[0] for q in vs.questions if q.answer_type == "yes/no"]
    assert yes_no.count("yes") == yes_no.count("no") == 18
    # A model that answers every question with its reference answers scores 100 with the official accuracy.
    assert vqa_accuracy({q.question_id: q.answers[0] for q in vs.questions}, vs.questions).overall == 100.0


def test_synthetic_questions_are_pinned_under_the_seed() -> None:
    name, split, drawing = next(iter(drawings(SMALL_SPEC)))
    assert (name, split) == ("train-00000.png", "train")
    assert synthetic_questions(drawing, 0) == [
        (0, "what colour is the shape?", drawing.colour, "other", "what color is the"),
        (1, "which shape is it?", drawing.shape, "other", "which"),
        (2, f"where is the {drawing.shape}?", drawing.position, "other", "where is the"),
        (3, f"how big is the {drawing.shape}?", drawing.size, "other", "how"),
        (4, f"is there a {drawing.shape}?", "yes", "yes/no", "is there a"),
    ]
    assert [q[2] for q in synthetic_questions(drawing, 0)] == ["green", "triangle", "top", "small", "yes"]
    assert synthetic_questions(drawing, 1)[4] == (14, "is there a circle?", "no", "yes/no", "is there a")
