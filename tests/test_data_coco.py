"""The `coco` reader and Karpathy's `restval` option, on small layouts built in `tmp_path`; one train + eval run."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from captune import metrics
from captune.cli import main
from captune.data import CaptionSet, ReadOptions, read, summary
from captune.errors import CaptuneError
from captune.metrics import METRIC_NAMES

from .conftest import write_image

COCO = dict[str, list[dict[str, Any]]]


def coco_json(names: list[str], captions_per_image: int = 2, first_id: int = 1) -> COCO:
    """A COCO captions file: image `k` of `names` has id `first_id + k` and `captions_per_image` captions."""
    ids = range(first_id, first_id + len(names))
    return {
        "info": {"description": "test"},
        "images": [{"id": i, "file_name": name, "width": 24, "height": 24} for i, name in zip(ids, names, strict=True)],
        "annotations": [
            {"id": 1000 * i + k, "image_id": i, "caption": f"a red circle {k} of image {i}"}
            for i in ids
            for k in range(captions_per_image)
        ],
    }


def write_json(path: Path, value: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=1), encoding="utf-8")
    return path


def make_coco(
    root: Path,
    *,
    year: str = "2017",
    n_train: int = 3,
    n_val: int = 8,
    annotations_dir: str = "annotations",
    images_root: str = ".",
) -> Path:
    """COCO as it unpacks: `annotations/captions_{train,val}<year>.json`, `train<year>/`, `val<year>/`; n_train or
    n_val 0 leaves that file out. Names follow the year's pattern; ids of val images follow those of train."""
    prefix = {"2014": "COCO_{split}2014_", "2017": ""}[year]
    for split, n, first_id in (("train", n_train, 1), ("val", n_val, 1 + n_train)):
        if n == 0:
            continue
        names = [f"{prefix.format(split=split)}{i:012d}.jpg" for i in range(first_id, first_id + n)]
        write_json(root / annotations_dir / f"captions_{split}{year}.json", coco_json(names, first_id=first_id))
        for k, name in enumerate(names):
            write_image(root / images_root / f"{split}{year}" / name, colour=(20 * k, 100, 100), size=8)
    return root


def val_file(root: Path) -> Path:
    return root / "annotations" / "captions_val2017.json"


def edit_val(root: Path, edit: Callable[[COCO], None]) -> Path:
    """Apply `edit` to the val annotation file of a `make_coco` layout."""
    data = json.loads(val_file(root).read_text())
    edit(data)
    return write_json(val_file(root), data)


def splits_of(cs: CaptionSet) -> dict[str, list[str]]:
    return {split: [r.image_id for r in cs.split(split)] for split in ("train", "val", "test")}


# --- finding files and folders --------------------------------------------------------------------------------------


def test_coco_2017_in_annotations_folder(tmp_path: Path) -> None:
    s = summary(read("coco", make_coco(tmp_path)))
    assert (s["images"], s["captions"], s["splits"], s["problems"]) == (11, 22, {"train": 3, "val": 7, "test": 1}, [])


def test_coco_records_use_the_file_name_and_the_split_folder(tmp_path: Path) -> None:
    cs = read("coco", make_coco(tmp_path))
    first = cs.records[0]
    assert (first.image_id, first.split) == ("000000000001.jpg", "train")
    assert first.image_path == tmp_path / "train2017" / "000000000001.jpg"
    assert first.captions == ("a red circle 0 of image 1", "a red circle 1 of image 1")
    assert {r.image_path.parent.name for r in cs.records if r.split != "train"} == {"val2017"}


def test_coco_2014_names_in_the_data_folder(tmp_path: Path) -> None:
    make_coco(tmp_path, year="2014", annotations_dir=".")
    cs = read("coco", tmp_path)
    assert cs.problems == []
    assert splits_of(cs)["train"] == [f"COCO_train2014_{i:012d}.jpg" for i in (1, 2, 3)]
    assert cs.records[-1].image_path.parent == tmp_path / "val2014"


def test_coco_2017_is_preferred_when_both_years_are_there(tmp_path: Path) -> None:
    make_coco(tmp_path, year="2014", n_train=1)
    make_coco(tmp_path, year="2017", n_train=2)
    assert len(read("coco", tmp_path).split("train")) == 2


def test_coco_images_under_images_folder(tmp_path: Path) -> None:
    make_coco(tmp_path, images_root="images")
    cs = read("coco", tmp_path)
    assert (len(cs.records), cs.problems) == (11, [])
    assert cs.records[0].image_path.parent == tmp_path / "images" / "train2017"


def test_coco_images_all_in_one_images_folder(tmp_path: Path) -> None:
    make_coco(tmp_path, images_root="images")
    for folder in ("train2017", "val2017"):
        for image in sorted((tmp_path / "images" / folder).iterdir()):
            image.rename(tmp_path / "images" / image.name)
        (tmp_path / "images" / folder).rmdir()
    cs = read("coco", tmp_path)
    assert (len(cs.records), cs.problems) == (11, [])
    assert {r.image_path.parent for r in cs.records} == {tmp_path / "images"}


def test_coco_images_dir_option_names_the_folder_holding_the_split_folders(tmp_path: Path) -> None:
    make_coco(tmp_path / "data", images_root="../pictures")
    cs = read("coco", tmp_path / "data", ReadOptions(images_dir=str(tmp_path / "pictures")))
    assert (len(cs.records), cs.problems) == (11, [])
    assert cs.records[0].image_path.parent == tmp_path / "pictures" / "train2017"


def test_coco_without_image_folder_says_where_it_looked(tmp_path: Path) -> None:
    write_json(tmp_path / "annotations" / "captions_val2017.json", coco_json(["a.jpg"]))
    with pytest.raises(CaptuneError, match=r"looked for val2017, images/val2017, images\. Name it with --images-dir"):
        read("coco", tmp_path)


def test_coco_without_annotation_files_names_where_it_looked(tmp_path: Path) -> None:
    with pytest.raises(CaptuneError) as info:
        read("coco", tmp_path)
    assert str(tmp_path / "captions_train2017.json") in str(info.value)
    assert str(tmp_path / "annotations" / "captions_val2014.json") in str(info.value)


def test_coco_annotations_option_names_the_train_file_and_finds_val_beside_it(tmp_path: Path) -> None:
    make_coco(tmp_path, annotations_dir="labels")
    cs = read("coco", tmp_path, ReadOptions(annotations="labels/captions_train2017.json"))
    assert {k: len(v) for k, v in splits_of(cs).items()} == {"train": 3, "val": 7, "test": 1}


def test_coco_annotations_option_with_a_val_file_reads_it_alone(tmp_path: Path) -> None:
    make_coco(tmp_path)
    cs = read("coco", tmp_path, ReadOptions(annotations="annotations/captions_val2017.json"))
    assert {k: len(v) for k, v in splits_of(cs).items()} == {"train": 0, "val": 7, "test": 1}


def test_coco_train_file_alone_leaves_val_and_test_empty_with_a_note(tmp_path: Path) -> None:
    make_coco(tmp_path, n_val=0)
    cs = read("coco", tmp_path)
    assert {k: len(v) for k, v in splits_of(cs).items()} == {"train": 3, "val": 0, "test": 0}
    assert cs.notes == [f"{tmp_path / 'annotations' / 'captions_train2017.json'}: no captions_val2017.json beside it; "
                        "the val and test splits are empty"]  # fmt: skip


# --- the val -> val/test split --------------------------------------------------------------------------------------


def test_coco_val_split_counts_follow_test_fraction_and_a_note_says_how(tmp_path: Path) -> None:
    make_coco(tmp_path, n_val=16)
    cs = read("coco", tmp_path, ReadOptions(seed=3, test_fraction=0.25))
    assert {k: len(v) for k, v in splits_of(cs).items()} == {"train": 3, "val": 12, "test": 4}
    assert cs.notes == ["captions_val2017.json: COCO has no public test captions; split its 16 images with seed 3 "
                        "into val/test 12/4 (test_fraction 0.25)"]  # fmt: skip


def test_coco_val_split_is_fixed_by_the_seed(tmp_path: Path) -> None:
    make_coco(tmp_path, n_val=16)
    test = splits_of(read("coco", tmp_path, ReadOptions(seed=0)))["test"]
    assert test == ["000000000014.jpg", "000000000018.jpg"]  # pinned: the split must not move between versions
    assert splits_of(read("coco", tmp_path, ReadOptions(seed=0)))["test"] == test
    assert splits_of(read("coco", tmp_path, ReadOptions(seed=1)))["test"] != test


def test_coco_val_split_is_independent_of_the_file_order(tmp_path: Path) -> None:
    make_coco(tmp_path, n_val=16)
    before = splits_of(read("coco", tmp_path))
    edit_val(tmp_path, lambda data: (data["images"].reverse(), data["annotations"].reverse()))
    after = splits_of(read("coco", tmp_path))
    assert {k: sorted(v) for k, v in after.items()} == {k: sorted(v) for k, v in before.items()}


def test_coco_every_image_is_in_one_split_with_all_its_captions(tmp_path: Path) -> None:
    make_coco(tmp_path, n_val=16)
    # All first captions, then all second ones: an image's annotations need not be next to each other.
    edit_val(tmp_path, lambda data: data["annotations"].sort(key=lambda a: a["id"] % 1000))
    cs = read("coco", tmp_path, ReadOptions(test_fraction=0.5))
    assert sorted(r.image_id for r in cs.records) == [f"{i:012d}.jpg" for i in range(1, 20)]
    assert {r.split for r in cs.records[3:]} == {"val", "test"}
    numbers = [int(r.image_id.removesuffix(".jpg")) for r in cs.records]
    assert [r.captions for r in cs.records] == [(f"a red circle 0 of image {i}", f"a red circle 1 of image {i}")
                                                for i in numbers]  # fmt: skip


def test_coco_image_in_both_files_stays_in_train_only(tmp_path: Path) -> None:
    make_coco(tmp_path, n_val=4)
    edit_val(tmp_path, lambda data: data["images"][0].__setitem__("file_name", "000000000001.jpg"))
    cs = read("coco", tmp_path)
    assert [r.split for r in cs.records if r.image_id == "000000000001.jpg"] == ["train"]
    train_file = tmp_path / "annotations" / "captions_train2017.json"
    assert [(p.image, p.problem) for p in cs.problems] == [
        ("000000000001.jpg", f"{val_file(tmp_path)}: images[0]: '000000000001.jpg' is already listed at "
                             f"{train_file}: images[0]; its 2 captions are not used")
    ]  # fmt: skip


def test_coco_val_file_alone_gives_val_and_test_and_an_empty_train_split(tmp_path: Path) -> None:
    make_coco(tmp_path, n_train=0, n_val=8)
    cs = read("coco", tmp_path)
    assert {k: len(v) for k, v in splits_of(cs).items()} == {"train": 0, "val": 7, "test": 1}
    assert cs.notes[-1] == f"{val_file(tmp_path)}: no train annotation file beside it; the train split is empty"


# --- bad input: each a problem naming the file and index ------------------------------------------------------------


def _set(key: str, index: int, field: str, value: object) -> Callable[[COCO], None]:
    return lambda data: data[key][index].__setitem__(field, value)


def _drop(key: str, index: int, field: str) -> Callable[[COCO], None]:
    return lambda data: data[key][index].pop(field)


BAD_INPUT = {
    "no caption": (_drop("annotations", 3, "caption"), "annotations[3]: no 'caption'"),
    "caption not text": (_set("annotations", 3, "caption", 7), "annotations[3]: 'caption' is a number, not text"),
    "empty caption": (_set("annotations", 3, "caption", "  "), "annotations[3]: empty caption"),
    "unknown image id": (_set("annotations", 3, "image_id", 999), "annotations[3]: image_id 999 is not an id in"),
    "annotation not an object": (lambda data: data["annotations"].insert(0, "x"), "annotations[0]: not an object"),
    "image without file_name": (_drop("images", 1, "file_name"), "images[1]: no 'file_name'"),
    "image without id": (_drop("images", 1, "id"), "images[1]: no 'id'"),
    "duplicate image id": (_set("images", 2, "id", 4), "images[2]: id 4 is already the id of images[0]"),
    "image without annotations": (
        lambda data: data.__setitem__("annotations", data["annotations"][2:]),
        "images[0]: no captions for this image",
    ),
    "file name listed twice": (
        _set("images", 2, "file_name", "000000000004.jpg"),
        "images[2]: '000000000004.jpg' is already listed at",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_coco_bad_input_is_a_problem_naming_file_and_index(tmp_path: Path, case: str) -> None:
    edit, expected = BAD_INPUT[case]
    edit_val(make_coco(tmp_path, n_val=4), edit)
    problems = [p.problem for p in read("coco", tmp_path).problems]
    assert [p for p in problems if p.startswith(f"{val_file(tmp_path)}: {expected}")] != [], problems


def test_coco_problems_account_for_every_unused_image_and_caption(tmp_path: Path) -> None:
    make_coco(tmp_path, n_val=4)
    edit_val(tmp_path, lambda data: (data["annotations"][5].pop("caption"), data["images"][1].pop("id")))
    (tmp_path / "val2017" / "000000000007.jpg").unlink()
    cs = read("coco", tmp_path)
    assert [(r.image_id, len(r.captions)) for r in cs.records if r.split != "train"] == [
        ("000000000004.jpg", 2),
        ("000000000006.jpg", 1),
    ]
    assert [(p.image, p.problem.removeprefix(f"{val_file(tmp_path)}: ")) for p in cs.problems] == [
        ("000000000005.jpg", "images[1]: no 'id' (an integer); its captions cannot be matched"),
        (
            "captions_val2017.json: annotations[2]",
            "annotations[2]: image_id 5 is not an id in 'images'; caption not used",
        ),
        (
            "captions_val2017.json: annotations[3]",
            "annotations[3]: image_id 5 is not an id in 'images'; caption not used",
        ),
        ("000000000006.jpg", "annotations[5]: no 'caption'"),
        ("000000000007.jpg", f"images[3]: image file missing: {tmp_path / 'val2017' / '000000000007.jpg'}"),
    ]


def test_coco_missing_image_file_names_the_entry_and_the_path(tmp_path: Path) -> None:
    make_coco(tmp_path, n_val=4)
    (tmp_path / "val2017" / "000000000006.jpg").unlink()
    problems = read("coco", tmp_path).problems
    assert [(p.image, p.problem) for p in problems] == [
        ("000000000006.jpg", f"{val_file(tmp_path)}: images[2]: image file missing: "
                             f"{tmp_path / 'val2017' / '000000000006.jpg'}")
    ]  # fmt: skip


def test_coco_invalid_json_names_file_line_and_column(tmp_path: Path) -> None:
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "captions_val2017.json").write_text('{"images": [\n  {"id": 1, "file_name": }\n]}')
    (tmp_path / "val2017").mkdir()
    with pytest.raises(CaptuneError, match=r"annotations/captions_val2017\.json:2:26: not valid JSON"):
        read("coco", tmp_path)


@pytest.mark.parametrize(
    ("content", "found"),
    [
        ([], r"the top level is an array; expected an object with 'images' and 'annotations' lists"),
        ({"images": []}, r"'annotations' is missing; expected a list"),
        ({"images": {}, "annotations": []}, r"'images' is an object; expected a list"),
    ],
)
def test_coco_wrong_top_level_shape_names_the_file(tmp_path: Path, content: object, found: str) -> None:
    write_json(tmp_path / "captions_val2017.json", content)
    (tmp_path / "val2017").mkdir()
    with pytest.raises(CaptuneError, match=re.escape(f"{tmp_path / 'captions_val2017.json'}: ") + found):
        read("coco", tmp_path)


# --- karpathy: restval ----------------------------------------------------------------------------------------------


def make_karpathy_coco(root: Path) -> Path:
    """`dataset_coco.json` with one image of each split, the images in the `filepath` folders COCO 2014 uses."""
    entries = []
    for split, folder in (("train", "train2014"), ("restval", "val2014"), ("restval", "val2014"), ("val", "val2014"),
                          ("test", "val2014")):  # fmt: skip
        name = f"COCO_{folder}_{len(entries):012d}.jpg"
        entries.append({"filepath": folder, "filename": name, "split": split, "sentences": [{"raw": "A plate ."}]})
        write_image(root / folder / name, size=8)
    write_json(root / "dataset_coco.json", {"images": entries, "dataset": "coco"})
    return root


def test_karpathy_restval_train_joins_train(tmp_path: Path) -> None:
    cs = read("karpathy", make_karpathy_coco(tmp_path), ReadOptions(restval="train"))
    assert (summary(cs)["splits"], cs.unassigned) == ({"train": 3, "val": 1, "test": 1}, 0)
    assert cs.split("train")[1].image_path == tmp_path / "val2014" / "COCO_val2014_000000000001.jpg"
    assert cs.notes == ["dataset_coco.json: 2 'restval' images joined train"]


def test_karpathy_restval_none_leaves_them_out_and_counts_them(tmp_path: Path) -> None:
    cs = read("karpathy", make_karpathy_coco(tmp_path), ReadOptions(restval="none"))
    assert (summary(cs)["splits"], cs.unassigned, cs.problems) == ({"train": 1, "val": 1, "test": 1}, 2, [])
    assert cs.notes == ["dataset_coco.json: 2 'restval' images left out (restval: none); counted in unassigned"]


def test_restval_must_be_train_or_none() -> None:
    with pytest.raises(CaptuneError, match="restval is 'val'; choose 'train' or 'none'"):
        ReadOptions(restval="val")


# --- end to end: train on a COCO folder, evaluate its test split ----------------------------------------------------


def test_train_then_eval_on_a_coco_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = make_coco(tmp_path / "coco", n_train=6, n_val=16)
    run, out = tmp_path / "run", tmp_path / "eval"
    # SPICE would run for minutes where its CoreNLP jars exist; an empty lib folder skips it on every machine.
    monkeypatch.setattr(metrics, "_SPICE_LIB", tmp_path / "no-spice")
    fast = ["max_steps=2", "train.batch_size=4", "warmup_steps=0", "model.dtype=fp32", "generate.num_beams=1",
            "generate.min_new_tokens=1", "generate.max_new_tokens=4"]  # fmt: skip
    assert main(["train", "data=coco", f"data_dir={data}", f"output_dir={run}", *fast]) == 0
    history = json.loads((run / "results.json").read_text())["history"]
    assert [list(h["metrics"]) for h in history] == [list(METRIC_NAMES)]  # validated once, on the 14 val images
    args = ["--data", "coco", "--data-dir", str(data), "--split", "test", "--output-dir", str(out)]
    assert main(["eval", "--model-dir", str(run / "best"), *args]) == 0
    assert list(json.loads((out / "metrics.json").read_text())) == list(METRIC_NAMES)
    predicted = [p["image_id"] for p in json.loads((out / "predictions.json").read_text())]
    assert (
        predicted == [r.image_id for r in read("coco", data).split("test")] == ["000000000017.jpg", "000000000021.jpg"]
    )
