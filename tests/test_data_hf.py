"""`--format hf`: Hugging Face datasets built by the tests (save_to_disk folders, imagefolders), read offline."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import io
import json
import re
from pathlib import Path
from typing import Any

import datasets
import pytest
from datasets import Dataset, DatasetDict
from PIL import Image

from captune import metrics
from captune.cli import main
from captune.data import CaptionSet, ReadOptions, check_images, read
from captune.errors import CaptuneError
from captune.metrics import METRIC_NAMES

from .conftest import write_image


@pytest.fixture(autouse=True)
def caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """captune's cache (extracted images) and the datasets cache (imagefolder's arrow files) inside `tmp_path`."""
    monkeypatch.setenv("CAPTUNE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    return tmp_path / "cache"


def image_bytes(seed: int, fmt: str = "PNG") -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (16, 16), (20 * seed % 256, 100, 150)).save(out, fmt)
    return out.getvalue()


def embedded(*seeds: int, path: str | None = None) -> list[dict[str, object]]:
    """Image cells holding PNG bytes, as `save_to_disk` and hub parquet files store them."""
    return [{"bytes": image_bytes(seed), "path": path} for seed in seeds]


def dataset(columns: dict[str, list[object]], image_column: str = "image") -> Dataset:
    """`columns` with `image_column` as an Image feature (its cells: paths, {bytes, path} or None)."""
    features = datasets.Features({image_column: datasets.Image()})
    data = Dataset.from_dict({image_column: columns[image_column]}, features=features)
    for name, values in columns.items():
        if name != image_column:
            data = data.add_column(name, values)
    return data


def save(data: Dataset | DatasetDict, folder: Path) -> Path:
    data.save_to_disk(str(folder))
    return folder


def simple(*seeds: int) -> Dataset:
    """One embedded image per seed, captioned `image <seed>`."""
    return dataset({"image": embedded(*seeds), "caption": [f"image {seed}" for seed in seeds]})


def hf_read(folder: Path | str, **options: Any) -> CaptionSet:
    return read("hf", folder, ReadOptions(**options))


def make_imagefolder(root: Path, metadata: str, text: str) -> Path:
    for name, colour in (("a.jpg", (200, 0, 0)), ("b.jpg", (0, 200, 0)), ("sub/c.jpg", (0, 0, 200))):
        write_image(root / name, colour)
    (root / metadata).write_text(text, encoding="utf-8")
    return root


# --- loading ----------------------------------------------------------------------------------------------------


def test_saved_dataset_extracts_embedded_images_into_the_cache(tmp_path: Path, caches: Path) -> None:
    data = simple(*range(3))
    cs = hf_read(save(data, tmp_path / "saved"))
    assert [r.image_id for r in cs.records] == ["data/0.png", "data/1.png", "data/2.png"]
    assert [r.captions for r in cs.records] == [("image 0",), ("image 1",), ("image 2",)]
    folder = cs.records[0].image_path.parent
    assert folder.parent.parent == caches / "hf-images"
    assert [r.image_path.read_bytes() for r in cs.records] == [image_bytes(seed) for seed in range(3)]
    assert cs.problems == []
    assert (
        cs.notes[-1]
        == f"{tmp_path / 'saved'}: 3 embedded images written to {folder.parent}, 0 found there from an earlier read"
    )


def test_extension_comes_from_the_bytes_not_the_path(tmp_path: Path) -> None:
    data = dataset({"image": [{"bytes": image_bytes(0, "JPEG"), "path": "photo.png"}], "caption": ["a photo"]})
    assert hf_read(save(data, tmp_path / "saved")).records[0].image_id == "data/0.jpeg"


def test_rereading_reuses_the_extracted_files(tmp_path: Path) -> None:
    folder = save(simple(*range(3)), tmp_path / "saved")
    first = hf_read(folder)
    for record in first.records:
        os.utime(record.image_path, (1_000_000, 1_000_000))
    again = hf_read(folder)
    assert again.records == first.records
    assert [r.image_path.stat().st_mtime for r in again.records] == [1_000_000] * 3
    cache = first.records[0].image_path.parent.parent
    assert again.notes[-1] == f"{folder}: 0 embedded images written to {cache}, 3 found there from an earlier read"


def test_image_path_strings_name_files_used_in_place(tmp_path: Path, caches: Path) -> None:
    outside = write_image(tmp_path / "pictures" / "0.jpg")
    data = Dataset.from_dict({"image": [str(outside), "inside/1.jpg"], "caption": ["zero", "one"]})
    folder = save(data, tmp_path / "saved")
    inside = write_image(folder / "inside" / "1.jpg")
    cs = hf_read(folder)
    assert [(r.image_id, r.image_path) for r in cs.records] == [("0.jpg", outside), ("inside/1.jpg", inside)]
    assert not (caches / "hf-images").exists()


def test_relative_image_paths_start_from_images_dir(tmp_path: Path) -> None:
    picture = write_image(tmp_path / "pictures" / "a.jpg")
    folder = save(Dataset.from_dict({"image": ["a.jpg"], "caption": ["x"]}), tmp_path / "saved")
    assert hf_read(folder, images_dir=str(tmp_path / "pictures")).records[0].image_path == picture


def test_one_split_without_a_split_column_is_split_by_image_with_the_seed(tmp_path: Path) -> None:
    cs = hf_read(save(simple(*range(8)), tmp_path / "saved"), seed=3)
    assert [len(cs.split(name)) for name in ("train", "val", "test")] == [6, 1, 1]
    assert cs.notes[0] == (f"{tmp_path / 'saved'} has one split (data) and no 'split' column: split its 8 images with "
                           "seed 3 into train/val/test 6/1/1")  # fmt: skip
    assert hf_read(tmp_path / "saved", seed=3).records == cs.records


def test_a_name_that_is_not_found_offline_is_an_error_that_names_it() -> None:
    with pytest.raises(CaptuneError, match=r"cannot load captune-tests/no-such-dataset: .*HF_HUB_OFFLINE"):
        read("hf", "captune-tests/no-such-dataset")


def test_a_folder_that_holds_no_dataset_is_an_error_that_says_what_belongs_there(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(CaptuneError, match=rf"cannot load {re.escape(str(tmp_path / 'empty'))}: .*save_to_disk"):
        read("hf", tmp_path / "empty")


# --- splits ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("val_name", ["validation", "val", "dev"])
def test_dataset_dict_splits_map_to_train_val_test(tmp_path: Path, val_name: str) -> None:
    data = DatasetDict({"train": simple(0, 1, 2), val_name: simple(3), "test": simple(4, 5)})
    cs = hf_read(save(data, tmp_path / "saved"))
    assert [(r.image_id, r.split) for r in cs.records] == [
        ("train/0.png", "train"), ("train/1.png", "train"), ("train/2.png", "train"),
        (f"{val_name}/0.png", "val"), ("test/0.png", "test"), ("test/1.png", "test"),
    ]  # fmt: skip
    assert cs.unassigned == 0 and len(cs.notes) == 1


def test_other_splits_of_a_dataset_dict_are_counted_not_used(tmp_path: Path) -> None:
    data = DatasetDict({"train": simple(0, 1), "extra": simple(2, 3, 4)})
    cs = hf_read(save(data, tmp_path / "saved"))
    assert [r.split for r in cs.records] == ["train", "train"]
    assert cs.unassigned == 3
    assert "split(s) 'extra' (3 images) not used, counted as unassigned" in cs.notes[0]


def test_a_split_column_decides_each_images_split(tmp_path: Path) -> None:
    splits = ["train", "restval", "val", "Validation", "dev", "test", "extra"]
    data = dataset({"image": embedded(*range(7)), "caption": [f"c{i}" for i in range(7)], "split": splits})
    cs = hf_read(save(DatasetDict({"test": data}), tmp_path / "saved"))  # like nlphuji/flickr30k: one split
    assert [(r.captions[0], r.split) for r in cs.records] == [
        ("c0", "train"), ("c1", "train"), ("c2", "val"), ("c3", "val"), ("c4", "val"), ("c5", "test"),
    ]  # fmt: skip
    assert cs.unassigned == 1 and "'extra' (1 images) not used" in cs.notes[0]


def test_a_custom_split_column_and_a_row_without_a_split(tmp_path: Path) -> None:
    data = dataset({"image": embedded(0, 1), "caption": ["c0", "c1"], "part": ["test", None]})
    cs = hf_read(save(data, tmp_path / "saved"), split_column="part")
    assert [(r.captions, r.split) for r in cs.records] == [(("c0",), "test")]
    assert [p.problem for p in cs.problems] == [
        f"{tmp_path / 'saved'}: data row 1: split is None; expected train, validation or test"
    ]


def test_an_image_put_in_two_splits_stays_in_the_first(tmp_path: Path) -> None:
    picture = str(write_image(tmp_path / "p.jpg"))
    data = Dataset.from_dict({"image": [picture, picture], "caption": ["first", "second"], "split": ["train", "test"]})
    cs = hf_read(save(data, tmp_path / "saved"))
    assert [(r.image_id, r.captions, r.split) for r in cs.records] == [("p.jpg", ("first",), "train")]
    assert cs.problems[0].problem == (f"{tmp_path / 'saved'}: data row 1: the image is in train already "
                                      f"({tmp_path / 'saved'}: data row 0); this row puts it in test: its captions "
                                      "are not used")  # fmt: skip


# --- columns -----------------------------------------------------------------------------------------------------


def test_rows_of_the_same_image_make_one_record_with_every_caption(tmp_path: Path) -> None:
    images = embedded(0, path="x.png") * 2 + embedded(1, path="y.png")  # one row per caption, as on the hub
    data = dataset({"image": images, "caption": ["one x", "two x", "one y"]})
    cs = hf_read(save(data, tmp_path / "saved"))
    assert [(r.image_id, r.captions) for r in cs.records] == [("data/0.png", ("one x", "two x")),
                                                             ("data/2.png", ("one y",))]  # fmt: skip
    assert sorted(p.name for p in cs.records[0].image_path.parent.iterdir()) == ["0.png", "2.png"]


def test_a_caption_list_column_gives_every_caption(tmp_path: Path) -> None:
    data = dataset({"image": embedded(0, 1), "caption": [["a", " b "], ["c"]]})
    assert [r.captions for r in hf_read(save(data, tmp_path / "saved")).records] == [("a", "b"), ("c",)]


def test_custom_column_names(tmp_path: Path) -> None:
    data = dataset({"picture": embedded(0), "text": ["a red square"]}, image_column="picture")
    cs = hf_read(save(data, tmp_path / "saved"), image_column="picture", caption_column="text")
    assert cs.records[0].captions == ("a red square",)


@pytest.mark.parametrize(("option", "key"), [("image_column", "data.image_column"),
                                             ("caption_column", "data.caption_column")])  # fmt: skip
def test_a_missing_column_names_the_dataset_its_columns_and_the_option(tmp_path: Path, option: str, key: str) -> None:
    folder = save(simple(0), tmp_path / "saved")
    message = f"{folder} (split data) has no column 'wanted'; its columns are image, caption. Name the "
    with pytest.raises(CaptuneError, match=re.escape(message) + rf"\w+ column with {re.escape(key)}=COLUMN$"):
        hf_read(folder, **{option: "wanted"})


def test_bad_rows_are_problems_naming_split_and_row(tmp_path: Path) -> None:
    data = dataset({
        "image": [*embedded(0, 1, 2, 3, 4), None],
        "caption": [["fine"], [], ["", "kept"], None, ["  "], ["no image"]],
    })  # fmt: skip
    folder = save(DatasetDict({"train": data}), tmp_path / "saved")
    cs = hf_read(folder, seed=0, val_fraction=0, test_fraction=0)
    assert [r.captions for r in cs.records] == [("fine",), ("kept",)]
    assert [(p.image, p.problem.removeprefix(f"{folder}: ")) for p in cs.problems] == [
        ("train/1", "train row 1: no caption (an empty list)"),
        ("train/2", "train row 2: caption [0] is ''; expected text"),
        ("train/3", "train row 3: no caption"),
        ("train/4", "train row 4: caption [0] is '  '; expected text"),
        ("train/5", "train row 5: no image"),
    ]


def test_a_missing_image_file_is_a_problem_naming_where_it_was_looked_for(tmp_path: Path) -> None:
    folder = save(Dataset.from_dict({"image": ["gone.jpg"], "caption": ["x"]}), tmp_path / "saved")
    cs = hf_read(folder)
    assert [(p.image, p.problem) for p in cs.problems] == [
        ("data/0", f"{folder}: data row 0: image file missing: {folder / 'gone.jpg'}")
    ]


def test_a_caption_of_the_wrong_type_is_a_problem(tmp_path: Path) -> None:
    data = dataset({"image": embedded(0), "caption": [7]})
    cs = hf_read(save(data, tmp_path / "saved"))
    assert cs.records == []
    assert cs.problems[0].problem.endswith("data row 0: caption is int 7; expected a string or a list of strings")


def test_an_image_column_of_the_wrong_type_is_a_problem(tmp_path: Path) -> None:
    save(Dataset.from_dict({"image": [3], "caption": ["x"]}), tmp_path / "saved")
    problem = hf_read(tmp_path / "saved").problems[0].problem
    assert problem.endswith("data row 0: image is int 3; expected an Image feature or a path string")


def test_undecodable_bytes_are_extracted_and_left_to_the_image_check(tmp_path: Path) -> None:
    data = dataset({"image": [{"bytes": b"not an image", "path": None}, *embedded(1)], "caption": ["bad", "good"]})
    cs = hf_read(save(data, tmp_path / "saved"))
    assert [r.image_id for r in cs.records] == ["data/0.bin", "data/1.png"] and cs.problems == []
    checked = check_images(cs, workers=1, progress=False)
    assert [r.image_id for r in checked.records] == ["data/1.png"]
    assert [p.image for p in checked.problems] == ["data/0.bin"]


# --- imagefolder -------------------------------------------------------------------------------------------------


def test_imagefolder_with_metadata_csv_uses_the_files_in_place(tmp_path: Path, caches: Path) -> None:
    text = "file_name,caption\na.jpg,a red one\nb.jpg,a green one\nsub/c.jpg,a blue one\na.jpg,red again\n"
    folder = make_imagefolder(tmp_path / "folder", "metadata.csv", text)
    cs = hf_read(folder, val_fraction=0, test_fraction=0)
    assert [(r.image_id, r.image_path, r.captions) for r in cs.records] == [
        ("a.jpg", folder / "a.jpg", ("a red one", "red again")),
        ("b.jpg", folder / "b.jpg", ("a green one",)),
        ("sub/c.jpg", folder / "sub" / "c.jpg", ("a blue one",)),
    ]
    assert not (caches / "hf-images").exists()


def test_imagefolder_with_metadata_jsonl_and_a_caption_list(tmp_path: Path) -> None:
    rows = [{"file_name": "a.jpg", "texts": ["red", "a red one"]}, {"file_name": "b.jpg", "texts": ["green"]},
            {"file_name": "sub/c.jpg", "texts": ["blue"]}]  # fmt: skip
    text = "".join(json.dumps(row) + "\n" for row in rows)
    folder = make_imagefolder(tmp_path / "folder", "metadata.jsonl", text)
    cs = hf_read(folder, caption_column="texts", val_fraction=0, test_fraction=0)
    assert [(r.image_id, r.captions) for r in cs.records] == [("a.jpg", ("red", "a red one")), ("b.jpg", ("green",)),
                                                             ("sub/c.jpg", ("blue",))]  # fmt: skip


# --- end to end --------------------------------------------------------------------------------------------------


def test_train_then_eval_on_a_saved_dataset(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                            monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    captions = ["a red square", "a green square", "a blue square", "a grey square"]
    data = DatasetDict({split: dataset({"image": embedded(*range(4)), "caption": captions})
                        for split in ("train", "validation", "test")})  # fmt: skip
    folder = save(data, tmp_path / "saved")
    run = tmp_path / "run"
    args = ["train", "data.format=hf", f"data.data_dir={folder}", f"train.output_dir={run}", "train.max_steps=2",
            "train.batch_size=2", "train.grad_accum=1", "train.validate=false", "train.warmup_steps=0",
            "model.dtype=fp32"]  # fmt: skip
    assert main(args) == 0
    assert json.loads((run / "results.json").read_text())["total_steps"] == 2
    # SPICE would run for minutes where its CoreNLP jars exist; an empty lib folder skips it on every machine.
    monkeypatch.setattr(metrics, "_SPICE_LIB", tmp_path / "no-spice")
    generation = ["--num-beams", "1", "--min-new-tokens", "1", "--max-new-tokens", "4"]
    code = main(["eval", "--model-dir", str(run / "final"), "--data", "hf", "--data-dir", str(folder), *generation,
                 "--output-dir", str(tmp_path / "eval")])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    assert list(json.loads((tmp_path / "eval" / "metrics.json").read_text())) == list(METRIC_NAMES)


def test_the_same_caption_twice_for_an_image_is_used_once_and_counted(tmp_path: Path) -> None:
    folder = save(dataset({"image": embedded(1, 1, path="a.png"), "caption": ["A cat .", "A cat ."]}), tmp_path / "d")
    cs = hf_read(folder)
    assert [r.captions for r in cs.records] == [("A cat .",)]
    assert [note for note in cs.notes if "repeat" in note] == [
        f"1 caption(s) repeat an earlier caption of the same image and are used once; the first: {folder}: data row "
        "0: data/0.png: 'A cat .'"
    ]
