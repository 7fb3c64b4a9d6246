"""The `manifest` reader and writer, `captune data convert`, and a train + eval run on a manifest."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest

from captune import metrics
from captune.cli import main
from captune.data import CaptionSet, ReadOptions, Record, read, summary
from captune.data import manifest as manifest_module
from captune.data.lines import OPEN_QUOTE
from captune.data.manifest import read_manifest, write_manifest
from captune.data.synthetic import SyntheticSpec, generate_synthetic
from captune.errors import CaptuneError
from captune.metrics import METRIC_NAMES

from .conftest import write_image
from .test_data import kaggle_rows, karpathy_entry, make_flickr8k, make_kaggle, write_jpeg, write_karpathy


def write_jsonl(path: Path, rows: list[object]) -> Path:
    """One JSON value per line; a `str` row is written as it is (for malformed lines)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [row if isinstance(row, str) else json.dumps(row) for row in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_csv(path: Path, rows: list[list[str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(rows)
    return path


def images(folder: Path, *names: str) -> None:
    for seed, name in enumerate(names):
        write_image(folder / name, (40 * seed % 256, 100, 150), size=8)


def records(cs: CaptionSet) -> list[tuple[str, tuple[str, ...], str]]:
    return [(r.image_id, r.captions, r.split) for r in cs.records]


def problems(cs: CaptionSet) -> list[str]:
    return [p.problem for p in cs.problems]


# --- reading: layouts, paths, captions --------------------------------------------------------------------------


def test_jsonl_collects_captions_of_an_image_in_file_order(tmp_path: Path) -> None:
    images(tmp_path / "images", "a.jpg", "b.jpg")
    write_jsonl(tmp_path / "manifest.jsonl", [
        {"image": "images/a.jpg", "caption": ["A dog .", " A brown dog . "], "split": "train"},
        {"image": "images/b.jpg", "caption": "A cat .", "split": "test"},
        {"image": "images/a.jpg", "caption": "A dog runs .", "split": "train"},
    ])  # fmt: skip
    cs = read("manifest", tmp_path)
    assert records(cs) == [
        ("images/a.jpg", ("A dog .", "A brown dog .", "A dog runs ."), "train"),
        ("images/b.jpg", ("A cat .",), "test"),
    ]
    assert (cs.problems, cs.notes, cs.unassigned) == ([], [], 0)


def test_csv_has_a_row_per_caption_and_keeps_quoted_commas(tmp_path: Path) -> None:
    images(tmp_path / "images", "a.jpg")
    write_csv(tmp_path / "manifest.csv", [
        ["split", "image", "caption"],
        ["val", "images/a.jpg", 'A dog, called "Rex" .'],
        ["val", "images/a.jpg", "A dog ."],
    ])  # fmt: skip
    assert records(read("manifest", tmp_path)) == [("images/a.jpg", ('A dog, called "Rex" .', "A dog ."), "val")]


def test_image_paths_are_relative_to_the_manifest_folder(tmp_path: Path) -> None:
    images(tmp_path / "data" / "pics", "a.jpg")
    write_jsonl(tmp_path / "data" / "lists" / "m.jsonl", [{"image": "../pics/a.jpg", "caption": "A.", "split": "val"}])
    cs = read("manifest", tmp_path / "data", ReadOptions(annotations="lists/m.jsonl"))
    assert cs.records[0].image_path == tmp_path.resolve() / "data" / "lists" / ".." / "pics" / "a.jpg"
    assert cs.records[0].image_path.is_file()


def test_absolute_image_paths_are_used_as_they_are(tmp_path: Path) -> None:
    image = tmp_path / "elsewhere" / "a.jpg"
    images(image.parent, "a.jpg")
    write_csv(tmp_path / "data" / "manifest.csv", [["image", "caption", "split"], [str(image), "A.", "test"]])
    cs = read("manifest", tmp_path / "data")
    assert [(r.image_id, r.image_path) for r in cs.records] == [(str(image), image)]


def test_images_dir_is_where_relative_paths_start(tmp_path: Path) -> None:
    images(tmp_path / "photos", "a.jpg")
    write_csv(tmp_path / "data" / "manifest.csv", [["image", "caption", "split"], ["a.jpg", "A.", "train"]])
    for images_dir in ("../photos", str(tmp_path / "photos")):
        cs = read("manifest", tmp_path / "data", ReadOptions(images_dir=images_dir))
        assert [r.image_path.resolve() for r in cs.records] == [(tmp_path / "photos" / "a.jpg").resolve()]


def test_images_dir_that_does_not_exist_is_an_error(tmp_path: Path) -> None:
    write_csv(tmp_path / "manifest.csv", [["image", "caption"], ["a.jpg", "A."]])
    with pytest.raises(CaptuneError, match=re.escape(f"image folder {tmp_path / 'nowhere'} (from --images-dir)")):
        read("manifest", tmp_path, ReadOptions(images_dir="nowhere"))


def test_column_names_are_options(tmp_path: Path) -> None:
    images(tmp_path, "a.jpg")
    write_csv(tmp_path / "manifest.csv", [["file", "text", "part"], ["a.jpg", "A.", "dev"]])
    options = ReadOptions(image_column="file", caption_column="text", split_column="part")
    assert records(read("manifest", tmp_path, options)) == [("a.jpg", ("A.",), "val")]


def test_utf8_bom_and_non_ascii_captions(tmp_path: Path) -> None:
    images(tmp_path, "é.jpg")
    (tmp_path / "manifest.csv").write_text("image,caption,split\né.jpg,Un café .,test\n", encoding="utf-8-sig")
    assert records(read("manifest", tmp_path)) == [("é.jpg", ("Un café .",), "test")]


def test_text_that_is_not_utf8_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "manifest.csv").write_bytes("image,caption\na.jpg,Un café .\n".encode("latin-1"))
    with pytest.raises(CaptuneError, match=r"manifest\.csv: not UTF-8 text .*; save it as UTF-8$"):
        read("manifest", tmp_path)


# --- reading: which file --------------------------------------------------------------------------------------


def test_manifest_jsonl_is_preferred_to_manifest_csv(tmp_path: Path) -> None:
    images(tmp_path, "a.jpg", "b.jpg")
    write_jsonl(tmp_path / "manifest.jsonl", [{"image": "a.jpg", "caption": "A.", "split": "train"}])
    write_csv(tmp_path / "manifest.csv", [["image", "caption", "split"], ["b.jpg", "B.", "train"]])
    assert [r.image_id for r in read("manifest", tmp_path).records] == ["a.jpg"]
    assert [r.image_id for r in read("manifest", tmp_path, ReadOptions(annotations="manifest.csv")).records] == [
        "b.jpg"
    ]


def test_the_manifest_file_itself_as_the_data(tmp_path: Path) -> None:
    images(tmp_path / "set", "a.jpg")
    manifest = write_jsonl(tmp_path / "set" / "captions.json", [{"image": "a.jpg", "caption": "A.", "split": "val"}])
    cs = read("manifest", manifest)
    assert records(cs) == [("a.jpg", ("A.",), "val")]
    assert cs.records[0].image_path == (tmp_path / "set" / "a.jpg").resolve()


def test_no_manifest_names_where_it_looked(tmp_path: Path) -> None:
    with pytest.raises(CaptuneError) as info:
        read("manifest", tmp_path)
    assert f"looked for {tmp_path / 'manifest.jsonl'}, {tmp_path / 'manifest.csv'}." in str(info.value)


@pytest.mark.parametrize("name", ["manifest.txt", "manifest.tsv"])
def test_an_unknown_suffix_is_an_error_naming_the_ones_that_work(tmp_path: Path, name: str) -> None:
    (tmp_path / name).write_text("image,caption\n")
    with pytest.raises(CaptuneError, match=re.escape(f"{tmp_path / name}: a manifest is CSV or JSON lines; name it "
                                                     "with one of .csv, .jsonl, .json")):  # fmt: skip
        read("manifest", tmp_path / name)


def test_a_json_array_is_an_error_not_a_problem_per_line(tmp_path: Path) -> None:
    (tmp_path / "m.json").write_text(json.dumps([{"image": "a.jpg", "caption": "A."}], indent=2))
    with pytest.raises(CaptuneError, match=r"m\.json: holds a JSON array; a manifest has one JSON object per line"):
        read("manifest", tmp_path / "m.json")


# --- reading: missing columns ---------------------------------------------------------------------------------


def test_csv_without_the_caption_column_names_the_columns_and_the_option(tmp_path: Path) -> None:
    write_csv(tmp_path / "manifest.csv", [["image", "text"], ["a.jpg", "A."]])
    with pytest.raises(CaptuneError) as info:
        read("manifest", tmp_path)
    assert str(info.value) == (f"{tmp_path / 'manifest.csv'}:1: no column 'caption' in the header; it has 'image', "
                               "'text'. Name the column with data.caption_column / --caption-column")  # fmt: skip


def test_csv_without_the_image_column_names_the_option(tmp_path: Path) -> None:
    write_csv(tmp_path / "manifest.csv", [["file", "caption"], ["a.jpg", "A."]])
    with pytest.raises(
        CaptuneError, match=r"no column 'image' in the header; it has 'file', 'caption'\. .* / --image-column$"
    ):
        read("manifest", tmp_path)


def test_empty_csv_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "manifest.csv").write_text("")
    with pytest.raises(CaptuneError, match=r"manifest\.csv:1: no column 'image' in the header; it has nothing\. "):
        read("manifest", tmp_path)


def test_jsonl_whose_rows_all_lack_a_column_is_an_error(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "manifest.jsonl", [{"image": "a.jpg", "text": "A."}, {"image": "b.jpg", "text": "B."}])
    with pytest.raises(CaptuneError) as info:
        read("manifest", tmp_path)
    assert str(info.value) == (
        f"{tmp_path / 'manifest.jsonl'}: no column 'caption' in any row; the first row has 'image', 'text'. "
        "Name the column with data.caption_column / --caption-column"
    )


# --- reading: splits ------------------------------------------------------------------------------------------


def test_every_split_spelling_in_any_case(tmp_path: Path) -> None:
    spellings = ["train", "TRAIN", "val", "Validation", "dev", "test", "Test", "restval", " val "]
    names = [f"{i}.jpg" for i in range(len(spellings))]
    images(tmp_path, *names)
    write_jsonl(tmp_path / "manifest.jsonl",
                [{"image": n, "caption": "A.", "split": s} for n, s in zip(names, spellings, strict=True)])  # fmt: skip
    cs = read("manifest", tmp_path)
    assert [r.split for r in cs.records] == ["train", "train", "val", "val", "val", "test", "test", "train", "val"]
    assert cs.notes == ["manifest.jsonl: 1 'restval' images joined train"]


def test_restval_none_leaves_restval_images_out_and_counts_them(tmp_path: Path) -> None:
    images(tmp_path, "a.jpg", "b.jpg")
    write_csv(tmp_path / "manifest.csv", [["image", "caption", "split"], ["a.jpg", "A.", "restval"],
                                          ["b.jpg", "B.", "train"]])  # fmt: skip
    cs = read("manifest", tmp_path, ReadOptions(restval="none"))
    assert (records(cs), cs.unassigned, cs.problems) == ([("b.jpg", ("B.",), "train")], 1, [])
    assert cs.notes == ["manifest.csv: 1 'restval' images left out (restval: none)"]


def _unsplit(root: Path, n_images: int, split_cell: bool = False) -> Path:
    """A CSV manifest of `n_images` images with 2 captions each and no split (or an empty split column)."""
    rows = [["image", "caption", "split"] if split_cell else ["image", "caption"]]
    for i in range(n_images):
        rows += [[f"img{i:02d}.jpg", f"Caption {k} of image {i} .", *([""] if split_cell else [])] for k in range(2)]
    images(root, *(f"img{i:02d}.jpg" for i in range(n_images)))
    return write_csv(root / "manifest.csv", rows)


def test_without_a_split_column_images_are_split_by_the_seed_with_a_note(tmp_path: Path) -> None:
    cs = read("manifest", _unsplit(tmp_path, 20))
    assert summary(cs)["splits"] == {"train": 16, "val": 2, "test": 2}
    assert {len(r.captions) for r in cs.records} == {2}  # by image: both captions of an image in one split
    assert cs.notes == ["manifest.csv gives no 'split': split its 20 images with seed 0 into train/val/test 16/2/2"]
    # Pinned under seed 0, and the same split flickr8k-kaggle makes of the same names.
    assert [r.image_id for r in cs.split("test")] == ["img10.jpg", "img18.jpg"]
    kaggle = read("flickr8k-kaggle", make_kaggle(tmp_path / "kaggle", kaggle_rows(20)))
    assert {r.image_id: r.split for r in kaggle.records} == {r.image_id: r.split for r in cs.records}


def test_an_empty_split_column_is_no_split(tmp_path: Path) -> None:
    by_column = read("manifest", _unsplit(tmp_path / "column", 20, split_cell=True))
    no_column = read("manifest", _unsplit(tmp_path / "none", 20))
    assert records(by_column) == records(no_column)
    assert by_column.problems == []


def test_the_seeded_split_changes_with_the_seed_only(tmp_path: Path) -> None:
    manifest = _unsplit(tmp_path, 20)
    seed0, again, seed1 = (read("manifest", manifest, ReadOptions(seed=s)) for s in (0, 0, 1))
    assert records(seed0) == records(again)
    assert [r.image_id for r in seed0.split("test")] != [r.image_id for r in seed1.split("test")]


def test_rows_without_a_split_when_others_have_one_are_each_a_problem(tmp_path: Path) -> None:
    images(tmp_path, "a.jpg", "b.jpg")
    manifest = write_csv(tmp_path / "manifest.csv", [
        ["image", "caption", "split"],
        ["a.jpg", "A.", ""],
        ["a.jpg", "A again.", "train"],
        ["b.jpg", "B.", " "],
        ["b.jpg", "B again.", ""],
    ])  # fmt: skip
    cs = read("manifest", tmp_path)
    assert records(cs) == [("a.jpg", ("A again.",), "train")]
    why = "no split, though line 3 gives one; give every row a split, or none to split by the seed"
    assert problems(cs) == [f"{manifest}:2: {why}", f"{manifest}:4: {why}", f"{manifest}:5: {why}"]
    assert [p.image for p in cs.problems] == ["a.jpg", "b.jpg", "b.jpg"]
    assert cs.notes == []


def test_an_image_given_two_splits_is_a_problem_and_stays_in_the_first(tmp_path: Path) -> None:
    images(tmp_path, "a.jpg")
    manifest = write_jsonl(tmp_path / "manifest.jsonl", [
        {"image": "a.jpg", "caption": "A.", "split": "train"},
        {"image": "a.jpg", "caption": "A test caption.", "split": "TEST"},
        {"image": "a.jpg", "caption": "A again.", "split": "train"},
    ])  # fmt: skip
    cs = read("manifest", tmp_path)
    assert records(cs) == [("a.jpg", ("A.", "A again."), "train")]
    assert problems(cs) == [f"{manifest}:2: split 'TEST' differs from 'train' given at line 1; an image belongs to one "
                            "split, so this row is not used"]  # fmt: skip


# --- reading: bad rows ----------------------------------------------------------------------------------------


BAD_JSONL_ROWS: list[tuple[object, str]] = [
    ('{"image": "a.jpg", "caption": ', "not valid JSON: Expecting value (column 31)"),
    ('["a.jpg", "A."]', 'expected a JSON object, found ["a.jpg", "A."]'),
    ({"caption": "A.", "split": "train"}, "no image path in 'image'"),
    ({"image": " ", "caption": "A.", "split": "train"}, "no image path in 'image'"),
    ({"image": 7, "caption": "A.", "split": "train"}, "'image' is 7, not an image path"),
    ({"image": "a.jpg", "split": "train"}, "no caption in 'caption'"),
    ({"image": "a.jpg", "caption": [], "split": "train"}, "no caption in 'caption'"),
    ({"image": "a.jpg", "caption": "  ", "split": "train"}, "empty caption"),
    ({"image": "a.jpg", "caption": 42, "split": "train"}, "'caption' is 42, not a string or a list of strings"),
    ({"image": "a.jpg", "caption": ["A.", 3], "split": "train"}, "caption[1] is 3, not a string"),
    ({"image": "a.jpg", "caption": ["A.", ""], "split": "train"}, "caption[1] is an empty caption"),
    ({"image": "a.jpg", "caption": "A.", "split": "holdout"},
     "split 'holdout' is not one of train, val, validation, dev, test, restval (in any case)"),
    ({"image": "a.jpg", "caption": "A.", "split": 1},
     "split 1 is not one of train, val, validation, dev, test, restval (in any case)"),
    ({"image": "gone.jpg", "caption": "A.", "split": "train"}, "image file missing: {root}/gone.jpg"),
]  # fmt: skip


@pytest.mark.parametrize(("row", "why"), BAD_JSONL_ROWS, ids=[why.split(" (")[0] for _, why in BAD_JSONL_ROWS])
def test_a_bad_jsonl_row_is_a_problem_naming_file_and_line(tmp_path: Path, row: object, why: str) -> None:
    images(tmp_path, "a.jpg", "b.jpg")
    good, again = ({"image": "b.jpg", "caption": caption, "split": "train"} for caption in ("B.", "B again."))
    manifest = write_jsonl(tmp_path / "manifest.jsonl", [good, "", row, again])
    cs = read("manifest", tmp_path)
    assert problems(cs) == [f"{manifest}:3: {why.format(root=tmp_path)}"]
    assert ("b.jpg", ("B.", "B again."), "train") in records(cs)  # the rows around it are used


def test_good_captions_of_a_list_are_kept_beside_a_bad_one(tmp_path: Path) -> None:
    images(tmp_path, "a.jpg")
    write_jsonl(tmp_path / "manifest.jsonl", [{"image": "a.jpg", "caption": ["A.", None, "B."], "split": "val"}])
    cs = read("manifest", tmp_path)
    assert (records(cs), len(cs.problems)) == ([("a.jpg", ("A.", "B."), "val")], 1)


def test_a_problem_without_an_image_is_named_by_file_and_line(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "manifest.jsonl", ["{oops", {"image": "a.jpg", "caption": "A."}])
    images(tmp_path, "a.jpg")
    assert [p.image for p in read("manifest", tmp_path).problems] == ["manifest.jsonl:1"]


def test_bad_csv_rows_name_the_physical_line_of_the_record(tmp_path: Path) -> None:
    images(tmp_path, "a.jpg")
    # Lines 2 and 3 hold a caption over two lines: a problem on each; a record is one line.
    (tmp_path / "manifest.csv").write_text(
        'image,caption,split\na.jpg,"A dog\nrunning .",train\na.jpg,,train\n\na.jpg,A, unquoted,train\n'
        "gone.jpg,G.,train\nb.jpg,B.,holdout\n,C.,test\na.jpg,A dog .,train\n"
    )
    cs = read("manifest", tmp_path)
    manifest = tmp_path / "manifest.csv"
    assert records(cs) == [("a.jpg", ("A dog .",), "train")]
    assert problems(cs) == [
        f"{manifest}:2: {OPEN_QUOTE}",
        f"{manifest}:3: {OPEN_QUOTE}",
        f"{manifest}:4: empty caption",
        f"{manifest}:6: expected 3 fields (image,caption,split), found 4; quote captions that hold commas",
        f"{manifest}:8: split 'holdout' is not one of train, val, validation, dev, test, restval (in any case)",
        f"{manifest}:9: no image path in 'image'",
        f"{manifest}:7: image file missing: {tmp_path / 'gone.jpg'}",
    ]
    assert [p.image for p in cs.problems] == ["a.jpg", "running .\"", "a.jpg", "a.jpg", "b.jpg", "manifest.csv:9",
                                              "gone.jpg"]  # fmt: skip


def test_an_image_with_a_missing_file_is_named_at_its_first_row(tmp_path: Path) -> None:
    rows = [{"image": "x.jpg", "caption": c, "split": "val"} for c in ("1", "2")]
    manifest = write_jsonl(tmp_path / "manifest.jsonl", rows)
    assert problems(read("manifest", tmp_path)) == [f"{manifest}:1: image file missing: {tmp_path / 'x.jpg'}"]


# --- write_manifest -------------------------------------------------------------------------------------------


def _synthetic(root: Path) -> Path:
    generate_synthetic(root, SyntheticSpec(train=4, val=2, test=2, seed=3, image_size=16))
    return root


def _flickr8k(root: Path) -> Path:
    return make_flickr8k(root)


def _kaggle(root: Path) -> Path:
    return make_kaggle(root, kaggle_rows(8))


def _karpathy(root: Path) -> Path:
    write_karpathy(root / "dataset_flickr8k.json", [karpathy_entry("a.jpg", "restval", "A dog .", "A brown dog ."),
                                                    karpathy_entry("b.jpg", "val", "A cat ."),
                                                    karpathy_entry("c.jpg", "test", "A bird .")])  # fmt: skip
    for seed, name in enumerate("abc"):
        write_jpeg(root / "images" / f"{name}.jpg", seed, size=8)
    return root


SOURCES = {"synthetic": _synthetic, "flickr8k": _flickr8k, "flickr8k-kaggle": _kaggle, "karpathy": _karpathy}


def _same(cs: CaptionSet) -> list[tuple[Path, tuple[str, ...], str]]:
    """What a manifest keeps of a record: the file, the captions and the split (the id becomes the written path)."""
    return [(r.image_path, r.captions, r.split) for r in cs.records]


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
@pytest.mark.parametrize("source", list(SOURCES))
def test_write_manifest_reads_back_to_the_same_records(tmp_path: Path, source: str, suffix: str) -> None:
    data = SOURCES[source](tmp_path / "data")
    original = read(source, data)
    assert len(original.records) >= 3
    path = data / f"manifest{suffix}"
    rows = write_manifest(original, path)
    assert rows == (len(original.records) if suffix == ".jsonl" else summary(original)["captions"])
    again = read("manifest", path)
    assert _same(again) == _same(original)
    assert (again.problems, again.notes) == ([], [])


def test_write_manifest_jsonl_is_the_canonical_form(tmp_path: Path) -> None:
    images(tmp_path / "images", "a.jpg")
    image = (tmp_path / "images" / "a.jpg").resolve()
    outside = tmp_path.resolve().parent / "b.jpg"
    cs = CaptionSet([Record("a.jpg", image, ("A.", "Ä b."), "train"), Record("b.jpg", outside, ("B.",), "test")])
    assert write_manifest(cs, tmp_path / "manifest.jsonl") == 2
    assert (tmp_path / "manifest.jsonl").read_text(encoding="utf-8").splitlines() == [
        '{"image": "images/a.jpg", "caption": ["A.", "Ä b."], "split": "train"}',
        f'{{"image": "{outside}", "caption": ["B."], "split": "test"}}',
    ]


def test_write_manifest_csv_has_a_row_per_caption(tmp_path: Path) -> None:
    image = tmp_path.resolve() / "a.jpg"
    cs = CaptionSet([Record("a.jpg", image, ("A, quoted.", "B."), "val")])
    assert write_manifest(cs, tmp_path / "out" / "m.csv") == 2
    assert (tmp_path / "out" / "m.csv").read_text() == (
        f'image,caption,split\n{image},"A, quoted.",val\n{image},B.,val\n'
    )


def test_write_manifest_relative_to_another_folder_reads_back_with_images_dir(tmp_path: Path) -> None:
    data = _synthetic(tmp_path / "data")
    original = read("synthetic", data)
    write_manifest(original, tmp_path / "lists" / "m.jsonl", relative_to=data / "images")
    first = json.loads((tmp_path / "lists" / "m.jsonl").read_text().splitlines()[0])
    assert first["image"] == "train-00000.png"
    again = read("manifest", tmp_path / "lists" / "m.jsonl", ReadOptions(images_dir=str(data / "images")))
    assert records(again) == records(original) and _same(again) == _same(original)


def test_write_manifest_replaces_atomically_and_leaves_no_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "manifest.jsonl"
    path.write_text("old\n")
    cs = CaptionSet([Record("a.jpg", tmp_path / "a.jpg", ("A.",), "train")])

    def fails(*args: object) -> int:
        raise OSError("disk full")

    monkeypatch.setattr(manifest_module, "_write_rows", fails)
    with pytest.raises(OSError, match="disk full"):
        write_manifest(cs, path)
    assert (path.read_text(), sorted(p.name for p in tmp_path.iterdir())) == ("old\n", ["manifest.jsonl"])
    monkeypatch.undo()
    write_manifest(cs, path)
    assert json.loads(path.read_text())["image"] == "a.jpg"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.jsonl"]


def test_write_manifest_refuses_a_suffix_the_reader_would_refuse(tmp_path: Path) -> None:
    with pytest.raises(CaptuneError, match=r"out\.txt: a manifest is CSV or JSON lines"):
        write_manifest(CaptionSet([]), tmp_path / "out.txt")
    assert list(tmp_path.iterdir()) == []


def test_read_manifest_is_the_registered_reader(tmp_path: Path) -> None:
    manifest = _unsplit(tmp_path, 4)
    assert records(read_manifest(tmp_path, ReadOptions())) == records(read("manifest", manifest))


# --- captune data convert / data check ------------------------------------------------------------------------


def test_data_convert_writes_the_manifest_and_lists_the_problems(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = make_kaggle(tmp_path / "kaggle", kaggle_rows(8))
    (data / "Images" / "img03.jpg").unlink()
    output = tmp_path / "out" / "manifest.csv"
    code = main(["data", "convert", "--format", "flickr8k-kaggle", "--data-dir", str(data), "--to", "manifest",
                 "--output", str(output)])  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 1
    assert out == f"14 rows (7 images; train/val/test 5/1/1) written to {output}\n"
    assert f"problem: {data / 'captions.txt'}:8: image file missing: {data / 'Images' / 'img03.jpg'}\n" in err
    assert "note: captions.txt comes without split files: split its 8 images with seed 0" in err
    assert err.endswith("1 problem(s): what they name is not in the manifest (listed above)\n")
    assert summary(read("manifest", output))["splits"] == {"train": 5, "val": 1, "test": 1}


def test_data_convert_without_problems_exits_0(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = _synthetic(tmp_path / "synthetic")
    code = main(["data", "convert", "--format", "synthetic", "--data-dir", str(data), "--output",
                 str(data / "manifest.jsonl")])  # fmt: skip
    assert (code, capsys.readouterr().err) == (0, "")
    assert summary(read("manifest", data))["splits"] == {"train": 4, "val": 2, "test": 2}


def test_data_convert_to_a_bad_suffix_is_a_user_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = _synthetic(tmp_path / "synthetic")
    code = main(["data", "convert", "--format", "synthetic", "--data-dir", str(data), "--output",
                 str(tmp_path / "m.txt")])  # fmt: skip
    err = capsys.readouterr().err
    assert (code, err.startswith("error: "), "a manifest is CSV or JSON lines" in err) == (2, True, True)
    assert not (tmp_path / "m.txt").exists()


def test_data_check_takes_the_column_and_restval_flags(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    images(tmp_path, "a.jpg", "b.jpg")
    write_csv(tmp_path / "m.csv", [["file", "text", "part"], ["a.jpg", "A.", "restval"], ["b.jpg", "B.", "val"]])
    code = main(["data", "check", "--format", "manifest", "--data-dir", str(tmp_path / "m.csv"), "--image-column",
                 "file", "--caption-column", "text", "--split-column", "part", "--restval", "none"])  # fmt: skip
    result = json.loads(capsys.readouterr().out)
    assert (code, result["splits"], result["unassigned"]) == (0, {"train": 0, "val": 1, "test": 0}, 1)


# --- end to end: train and eval on a manifest -----------------------------------------------------------------


def test_train_and_eval_on_a_manifest_made_from_the_synthetic_data(
    synthetic_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    manifest = tmp_path / "data" / "manifest.csv"
    assert main(["data", "convert", "--format", "synthetic", "--data-dir", str(synthetic_dir), "--output",
                 str(manifest)]) == 0  # fmt: skip
    run = tmp_path / "run"
    assert main(["train", "data=manifest", f"data_dir={manifest}", f"output_dir={run}", "max_steps=2",
                 "train.validate=false", "warmup_steps=0", "train.batch_size=4", "model.dtype=fp32"]) == 0  # fmt: skip
    assert "done: 2 steps" in capsys.readouterr().out
    assert json.loads((run / "results.json").read_text())["total_steps"] == 2

    # SPICE would run for minutes where its CoreNLP jars exist; an empty lib folder skips it on every machine.
    monkeypatch.setattr(metrics, "_SPICE_LIB", tmp_path / "no-spice")
    code = main(["eval", "--model-dir", str(run / "final"), "--data", "manifest", "--data-dir", str(manifest),
                 "--split", "test", "--max-images", "3", "--num-beams", "1", "--min-new-tokens", "1",
                 "--max-new-tokens", "5",
                 "--output-dir", str(tmp_path / "eval")])  # fmt: skip
    assert code == 0
    scores = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert list(scores) == list(METRIC_NAMES)
    predictions = json.loads((tmp_path / "eval" / "predictions.json").read_text())
    assert [p["image_id"] for p in predictions] == [str(synthetic_dir.resolve() / "images" / f"test-{i:05d}.png")
                                                    for i in range(3)]  # fmt: skip
