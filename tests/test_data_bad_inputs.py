"""Bad inputs of every text format the readers take: broken quotes and rows, one image under several spellings,
repeated rows, keys and captions. Each is a problem or a note naming the file and line; the rest of the file is read.

docs/data.md ("Bad inputs tried") lists these inputs with what each gets.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from captune.cli import main
from captune.data import CaptionSet, read, summary

from .test_data import karpathy_entry, make_flickr8k, write_jpeg, write_karpathy, write_lines
from .test_data_coco import coco_json, make_coco, write_json
from .test_data_manifest import images, records, write_jsonl


def problems(cs: CaptionSet) -> list[str]:
    return [p.problem for p in cs.problems]


def kaggle(root: Path, lines: list[str], names: list[str]) -> Path:
    """A Kaggle layout whose `captions.txt` holds `lines` as they are (after the header)."""
    write_lines(root / "captions.txt", ["image,caption", *lines])
    for seed, name in enumerate(names):
        write_jpeg(root / "Images" / name, seed, size=8)
    return root / "captions.txt"


def manifest_csv(root: Path, lines: list[str], names: list[str]) -> Path:
    """A CSV manifest holding `lines` as they are (after the header), its images beside it."""
    write_lines(root / "manifest.csv", ["image,caption,split", *lines])
    images(root, *names)
    return root / "manifest.csv"


# --- CSV: quotes and fields, one record per line -------------------------------------------------------------------


def test_kaggle_unterminated_quote_is_a_problem_and_the_rows_after_it_are_read(tmp_path: Path) -> None:
    names = [f"good{i}.jpg" for i in range(20)]
    lines = [f"{name},Caption {k} of {name} ." for name in names for k in range(2)]
    lines[8] = 'good4.jpg,"A dog runs , on the grass .'  # the quote is never closed: csv would swallow every later row
    path = kaggle(tmp_path, lines, names)
    cs = read("flickr8k-kaggle", tmp_path)
    assert problems(cs) == [
        f"{path}:10: a quoted field is not closed on this line (the line has an odd number of double quotes); "
        'a record is one line: close the quote, or write a quote inside a caption as "" in a quoted caption'
    ]
    assert [p.image for p in cs.problems] == ["good4.jpg"]
    assert (len(cs.records), summary(cs)["captions"]) == (20, 39)


def test_manifest_csv_unterminated_quote_makes_data_check_fail_and_reads_the_rest(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    names = [f"m{i}.jpg" for i in range(6)]
    lines = [f"{name},Caption of {name} .,train" for name in names]
    lines[1] = 'm1.jpg,"A caption that never ends .,train'
    path = manifest_csv(tmp_path, lines, names)
    assert main(["data", "check", "--format", "manifest", "--data-dir", str(path), "--workers", "1"]) == 1
    result = json.loads(capsys.readouterr().out)
    assert result["images"] == 5
    assert [p["problem"].split(": ")[0] for p in result["problems"]] == [f"{path}:3"]


BAD_CSV_LINES = [
    ('{image},"A caption over two', "a quoted field is not closed on this line"),
    ('{image},lines ." ', "a quoted field is not closed on this line"),
    ('{image},A 5" tall man .', "a quoted field is not closed on this line"),
    ('{image},"A dog" runs .', "not one CSV record (',' expected after '\"'); quote the whole field and write"),
    ("{image}", "expected {n} fields ({header}), found 1"),
    ("{image},A dog, unquoted", "expected {n} fields ({header}), found {more}; quote captions that hold commas"),
]


@pytest.mark.parametrize(
    ("line", "why"), BAD_CSV_LINES, ids=[f"{i}-{why[:24]}" for i, (_, why) in enumerate(BAD_CSV_LINES)]
)
@pytest.mark.parametrize("reader", ["flickr8k-kaggle", "manifest"])
def test_a_bad_csv_line_is_a_problem_naming_file_and_line_and_the_lines_around_it_are_read(
    tmp_path: Path, reader: str, line: str, why: str
) -> None:
    if reader == "manifest":
        good, n, header = "b.jpg,B .,train", 3, "image,caption,split"
        bad = line.format(image="a.jpg") + (",train" if "{image}," in line and "over two" not in line else "")
        path = manifest_csv(tmp_path, [good, bad, good.replace("B .", "B again .")], ["a.jpg", "b.jpg"])
    else:
        good, n, header = "b.jpg,B .", 2, "image,caption"
        path = kaggle(tmp_path, [good, line.format(image="a.jpg"), "b.jpg,B again ."], ["a.jpg", "b.jpg"])
    cs = read(reader, tmp_path)
    more = 4 if reader == "manifest" else 3
    expected = why.format(n=n, header=header, more=more)
    assert [p.split(": ")[0] for p in problems(cs)] == [f"{path}:3"]
    assert expected in problems(cs)[0]
    assert [r.captions for r in cs.records if r.image_id == "b.jpg"] == [("B .", "B again .")]


def test_a_caption_holding_further_rows_is_a_problem_on_each_of_its_lines(tmp_path: Path) -> None:
    names = ["a.jpg", "b.jpg", "c.jpg"]
    path = manifest_csv(tmp_path, ['a.jpg,"A dog .,train', "b.jpg,A cat .,train", 'c.jpg,A bird .",train',
                                   "c.jpg,A bird flies .,train"], names)  # fmt: skip
    cs = read("manifest", tmp_path)
    assert [p.split(": ")[0] for p in problems(cs)] == [f"{path}:2", f"{path}:4"]
    assert records(cs) == [("b.jpg", ("A cat .",), "train"), ("c.jpg", ("A bird flies .",), "train")]


def test_a_csv_written_by_write_manifest_with_a_line_break_in_a_caption_is_refused(tmp_path: Path) -> None:
    from captune.data import Record
    from captune.data.manifest import write_manifest
    from captune.errors import CaptuneError

    image = write_jpeg(tmp_path / "a.jpg")
    cs = CaptionSet([Record("a.jpg", image, ("A dog\nruns .",), "train")])
    with pytest.raises(CaptuneError, match=r"a\.jpg: caption 'A dog\\nruns \.' holds a line break.*\.jsonl"):
        write_manifest(cs, tmp_path / "out.csv")


# --- token file -------------------------------------------------------------------------------------------------------


def test_a_token_line_holding_two_captions_is_a_problem(tmp_path: Path) -> None:
    root = make_flickr8k(tmp_path)
    token = root / "Flickr8k_text" / "Flickr8k.token.txt"
    token.write_text(token.read_text() + "b.jpg#1\tA child plays .d.jpg#1\tA cat naps .\n")
    cs = read("flickr8k", root)
    line = len(token.read_text().splitlines())
    assert f"{token}:{line}: 3 tab-separated fields; a line is <image>#<k><TAB><caption>, one caption a line" in (
        problems(cs)
    )


def test_a_repeated_token_key_is_counted_in_a_note_and_its_caption_kept(tmp_path: Path) -> None:
    root = make_flickr8k(tmp_path)
    token = root / "Flickr8k_text" / "Flickr8k.token.txt"
    token.write_text(token.read_text() + "a.jpg#0\tA dog jumps .\n")
    cs = read("flickr8k", root)
    line = len(token.read_text().splitlines())
    assert f"{token}: 1 key(s) repeat an earlier key; the first: line {line} 'a.jpg#0' (first at line 1); their " \
           "captions are used" in cs.notes  # fmt: skip
    assert next(r for r in cs.records if r.image_id == "a.jpg").captions[-1] == "A dog jumps ."


# --- duplicates: the same caption twice, a repeated row --------------------------------------------------------


def test_a_repeated_manifest_row_is_used_once_and_counted(tmp_path: Path) -> None:
    path = manifest_csv(tmp_path, ["a.jpg,A dog .,train", "a.jpg,A dog .,train", "a.jpg,A dog runs .,train"], ["a.jpg"])
    cs = read("manifest", tmp_path)
    assert records(cs) == [("a.jpg", ("A dog .", "A dog runs ."), "train")]
    assert cs.notes == [f"1 caption(s) repeat an earlier caption of the same image and are used once; the first: "
                        f"{path}:2: a.jpg: 'A dog .'"]  # fmt: skip


def test_the_same_caption_twice_in_coco_is_counted(tmp_path: Path) -> None:
    root = make_coco(tmp_path, n_val=0)
    train = root / "annotations" / "captions_train2017.json"
    data = coco_json(["000000000001.jpg", "000000000002.jpg", "000000000003.jpg"])
    data["annotations"][1]["caption"] = data["annotations"][0]["caption"] + " "
    write_json(train, data)
    cs = read("coco", root)
    assert [len(r.captions) for r in cs.records] == [1, 2, 2]
    assert any(note.startswith("1 caption(s) repeat an earlier caption") for note in cs.notes)


# --- one image under several spellings ----------------------------------------------------------------------------


def test_manifest_spellings_of_one_image_in_three_splits_are_problems(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    images(tmp_path / "images", "a.jpg", "b.jpg")
    os.symlink(tmp_path / "images" / "a.jpg", tmp_path / "link.jpg")
    path = write_jsonl(tmp_path / "manifest.jsonl", [
        {"image": "images/a.jpg", "caption": "A train caption .", "split": "train"},
        {"image": str(tmp_path / "images" / "a.jpg"), "caption": "A val caption .", "split": "val"},
        {"image": "./images/a.jpg", "caption": "A test caption .", "split": "test"},
        {"image": "link.jpg", "caption": "A linked caption .", "split": "test"},
        {"image": "images/b.jpg", "caption": "B .", "split": "train"},
    ])  # fmt: skip
    assert main(["data", "check", "--format", "manifest", "--data-dir", str(tmp_path), "--workers", "1"]) == 1
    result = json.loads(capsys.readouterr().out)
    assert (result["images"], result["splits"]) == (2, {"train": 2, "val": 0, "test": 0})
    found = [p["problem"] for p in result["problems"]]
    assert found == [
        f"{path}:{line}: split {split!r} differs from 'train' given at line 1 (as 'images/a.jpg', the same file); "
        "an image belongs to one split, so this row is not used"
        for line, split in ((2, "val"), (3, "test"), (4, "test"))
    ]


def test_manifest_spellings_of_one_image_in_one_split_make_one_image_and_a_note(tmp_path: Path) -> None:
    images(tmp_path / "images", "a.jpg")
    path = write_jsonl(tmp_path / "manifest.jsonl", [
        {"image": "images/a.jpg", "caption": "A .", "split": "train"},
        {"image": "./images/../images/a.jpg", "caption": "A again .", "split": "train"},
    ])  # fmt: skip
    cs = read("manifest", tmp_path)
    assert (records(cs), cs.problems) == ([("images/a.jpg", ("A .", "A again ."), "train")], [])
    assert cs.notes == [f"{path}: 1 row(s) name an image under another spelling than its first row; the first: line 2 "
                        "'./images/../images/a.jpg' is 'images/a.jpg' of line 1"]  # fmt: skip


def test_kaggle_spellings_of_one_image_are_one_image(tmp_path: Path) -> None:
    kaggle(tmp_path, ["a.jpg,A .", "./a.jpg,A again .", "b.jpg,B ."], ["a.jpg", "b.jpg"])
    cs = read("flickr8k-kaggle", tmp_path)
    assert sorted((r.image_id, r.captions) for r in cs.records) == [
        ("a.jpg", ("A .", "A again .")),
        ("b.jpg", ("B .",)),
    ]
    assert cs.problems == []


def test_flickr8k_a_symlink_to_an_image_of_another_split_is_a_problem(tmp_path: Path) -> None:
    root = make_flickr8k(tmp_path)
    os.symlink(root / "Flicker8k_Dataset" / "a.jpg", root / "Flicker8k_Dataset" / "alias.jpg")
    write_lines(root / "Flickr8k_text" / "Flickr_8k.testImages.txt", ["e.jpg", "nocap.jpg", "alias.jpg"])
    token = root / "Flickr8k_text" / "Flickr8k.token.txt"
    token.write_text(token.read_text() + "alias.jpg#0\tA dog runs again .\n")
    cs = read("flickr8k", root)
    split_file = root / "Flickr8k_text" / "Flickr_8k.testImages.txt"
    assert "alias.jpg" not in [r.image_id for r in cs.records]
    assert [p for p in problems(cs) if "alias.jpg" in p] == [
        f"{split_file}:3: {root / 'Flicker8k_Dataset' / 'alias.jpg'} is the file of 'a.jpg' "
        f"({root / 'Flickr8k_text' / 'Flickr_8k.trainImages.txt'}:1), which is in train; an image belongs to one "
        "split: list it once"
    ]


def test_karpathy_a_symlink_to_an_image_of_another_split_is_a_problem(tmp_path: Path) -> None:
    path = tmp_path / "dataset_flickr8k.json"
    write_karpathy(path, [karpathy_entry("a.jpg", "train", "A ."), karpathy_entry("b.jpg", "test", "B .")])
    write_jpeg(tmp_path / "images" / "a.jpg")
    os.symlink(tmp_path / "images" / "a.jpg", tmp_path / "images" / "b.jpg")
    cs = read("karpathy", tmp_path)
    assert [r.image_id for r in cs.records] == ["a.jpg"]
    assert [p.split(" is the file")[0] for p in problems(cs)] == [f"{path}: images[1]: {tmp_path / 'images' / 'b.jpg'}"]


# --- hf: an imagefolder's metadata.csv, which `datasets` reads with pandas ------------------------------------------


def test_hf_imagefolder_metadata_csv_with_a_caption_over_two_lines_is_an_error_naming_the_line(tmp_path: Path) -> None:
    from captune.errors import CaptuneError

    names = [f"m{i}.png" for i in range(6)]
    images(tmp_path, *names)
    lines = [f"{name},Caption of {name} ." for name in names]
    lines[1:3] = ['m1.png,"A dog', 'm2.png,A cat"']  # pandas reads m2's row into m1's caption, silently
    write_lines(tmp_path / "metadata.csv", ["file_name,caption", *lines])
    with pytest.raises(CaptuneError, match=rf"^{tmp_path / 'metadata.csv'}:3: a quoted field is not closed"):
        read("hf", tmp_path)
