"""Dataset readers, the image check and `load_rgb`, on small layouts built in `tmp_path`."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import csv
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageFile

from captune import metrics
from captune.cli import main
from captune.data import FORMATS, ReadOptions, check_images, read, summary
from captune.data.images import ImageError, decode_size, load_rgb
from captune.errors import CaptuneError
from captune.metrics import METRIC_NAMES

STRAY = "2258277193_586949ec62.jpg"


def write_jpeg(path: Path, seed: int = 0, size: int = 32) -> Path:
    """A noise JPEG (noise keeps the entropy-coded data large next to the header, so a cut lands in the pixels)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, "JPEG", quality=95)
    return path


def write_truncated_jpeg(path: Path) -> Path:
    data = write_jpeg(path, size=64).read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def write_lines(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


# Line 14 has a space where the tab should be.
TOKEN_LINES = [
    "a.jpg#0\tA dog runs .",
    "a.jpg#1\tA brown dog runs on the grass .",
    "b.jpg#0\tA child plays .",
    "c.jpg#0\tTwo people walk .",
    "",
    "d.jpg#0\tA cat sleeps .",
    "e.jpg#0\tA bird flies .",
    "trunc.jpg#0\tA picture cut in half .",
    f"{STRAY}.1#0\tA man rides a bike .",
    f"{STRAY}.1#1\tA cyclist on a road .",
    "extra.jpg#0\tAn image in no split file .",
    "missing.jpg#0\tA picture that is not on disk .",
    "",
    "c.jpg#1 A caption after a space instead of a tab .",
]
SPLIT_LINES = {
    "Flickr_8k.trainImages.txt": ["a.jpg", "b.jpg", "c.jpg", "trunc.jpg", STRAY, "missing.jpg"],
    "Flickr_8k.devImages.txt": ["d.jpg"],
    "Flickr_8k.testImages.txt": ["e.jpg", "nocap.jpg"],
}


def make_flickr8k(root: Path, text_dir: str = "Flickr8k_text", images_dir: str = "Flicker8k_Dataset") -> Path:
    """The original layout: 7 usable images (one truncated), one in no split, one missing and one uncaptioned."""
    write_lines(root / text_dir / "Flickr8k.token.txt", TOKEN_LINES)
    for name, lines in SPLIT_LINES.items():
        write_lines(root / text_dir / name, lines)
    for seed, name in enumerate(["a.jpg", "b.jpg", "c.jpg", "d.jpg", "e.jpg", STRAY, "extra.jpg", "nocap.jpg"]):
        write_jpeg(root / images_dir / name, seed)
    write_truncated_jpeg(root / images_dir / "trunc.jpg")
    return root


def make_kaggle(root: Path, rows: list[tuple[str, str]], header: tuple[str, str] = ("image", "caption")) -> Path:
    """The Kaggle layout: `captions.txt` with `rows` and an `Images/` folder holding every named image."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "captions.txt", "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([header, *rows])
    for seed, name in enumerate(sorted({name for name, _ in rows})):
        write_jpeg(root / "Images" / name, seed, size=8)
    return root


def kaggle_rows(n_images: int) -> list[tuple[str, str]]:
    return [(f"img{i:02d}.jpg", f"Caption {k} of image {i} .") for i in range(n_images) for k in range(2)]


def write_karpathy(path: Path, images: list[dict[str, object]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"images": images, "dataset": "flickr8k"}), encoding="utf-8")


def karpathy_entry(name: str, split: str, *captions: str, **extra: str) -> dict[str, object]:
    return {"filename": name, "split": split, "sentences": [{"raw": c, "tokens": c.split()} for c in captions], **extra}


# --- read: registry and errors -------------------------------------------------------------------------------------


def test_formats_registry_has_every_layout() -> None:
    assert list(FORMATS) == ["flickr8k", "flickr8k-kaggle", "karpathy", "coco", "manifest", "hf", "synthetic"]


def test_read_unknown_format_lists_the_valid_names(tmp_path: Path) -> None:
    names = "flickr8k, flickr8k-kaggle, karpathy, coco, manifest, hf, synthetic"
    with pytest.raises(CaptuneError, match=rf"'cocoa'; choose one of: {names}$"):
        read("cocoa", tmp_path)


def test_read_missing_data_dir_names_it(tmp_path: Path) -> None:
    with pytest.raises(CaptuneError, match=re.escape(f"{tmp_path / 'nowhere'} does not exist")):
        read("flickr8k", tmp_path / "nowhere")


def test_read_data_dir_that_is_a_file_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(CaptuneError, match="is not a folder"):
        read("flickr8k", tmp_path / "file.txt")


def test_read_expands_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_kaggle(tmp_path / "kaggle", kaggle_rows(2))
    monkeypatch.setenv("HOME", str(tmp_path))
    assert summary(read("flickr8k-kaggle", "~/kaggle"))["images"] == 2


def test_missing_token_file_names_where_it_looked(tmp_path: Path) -> None:
    with pytest.raises(CaptuneError) as info:
        read("flickr8k", tmp_path)
    assert str(tmp_path / "Flickr8k.token.txt") in str(info.value)
    assert str(tmp_path / "Flickr8k_text" / "Flickr8k.token.txt") in str(info.value)


def test_missing_token_file_suggests_kaggle_format_when_its_csv_is_there(tmp_path: Path) -> None:
    make_kaggle(tmp_path, kaggle_rows(1))
    with pytest.raises(CaptuneError, match="has the files of --format flickr8k-kaggle"):
        read("flickr8k", tmp_path)


def test_missing_csv_suggests_flickr8k_format_when_its_token_file_is_there(tmp_path: Path) -> None:
    make_flickr8k(tmp_path)
    with pytest.raises(CaptuneError, match=r"captions\.txt\. .* has the files of --format flickr8k;"):
        read("flickr8k-kaggle", tmp_path)


def test_missing_split_file_is_named(tmp_path: Path) -> None:
    make_flickr8k(tmp_path)
    (tmp_path / "Flickr8k_text" / "Flickr_8k.devImages.txt").unlink()
    with pytest.raises(CaptuneError, match=re.escape(str(tmp_path / "Flickr8k_text" / "Flickr_8k.devImages.txt"))):
        read("flickr8k", tmp_path)


def test_read_options_reject_fractions_that_leave_no_training_images() -> None:
    with pytest.raises(CaptuneError, match=r"val_fraction \+ test_fraction is 1\.0"):
        ReadOptions(val_fraction=0.5, test_fraction=0.5)


# --- flickr8k (original layout) -----------------------------------------------------------------------------------


def test_flickr8k_counts(tmp_path: Path) -> None:
    s = summary(read("flickr8k", make_flickr8k(tmp_path)))
    assert (s["images"], s["captions"], s["splits"], s["unassigned"]) == (
        7,
        9,
        {"train": 5, "val": 1, "test": 1},
        1,
    )


def test_flickr8k_problems_name_the_images(tmp_path: Path) -> None:
    cs = read("flickr8k", make_flickr8k(tmp_path))
    assert [p.image for p in cs.problems] == ["c.jpg", "missing.jpg", "nocap.jpg"]


def test_flickr8k_malformed_line_names_file_and_line(tmp_path: Path) -> None:
    cs = read("flickr8k", make_flickr8k(tmp_path))
    token = tmp_path / "Flickr8k_text" / "Flickr8k.token.txt"
    assert cs.problems[0].problem == f"{token}:14: no tab between the image key and the caption"


def test_flickr8k_missing_image_names_split_file_line_and_path(tmp_path: Path) -> None:
    cs = read("flickr8k", make_flickr8k(tmp_path))
    train = tmp_path / "Flickr8k_text" / "Flickr_8k.trainImages.txt"
    missing = tmp_path / "Flicker8k_Dataset" / "missing.jpg"
    assert cs.problems[1].problem == f"{train}:6: image file missing: {missing}"


def test_flickr8k_every_usable_image_is_in_exactly_one_split_in_file_order(tmp_path: Path) -> None:
    cs = read("flickr8k", make_flickr8k(tmp_path))
    assert [(r.image_id, r.split) for r in cs.records] == [
        ("a.jpg", "train"),
        ("b.jpg", "train"),
        ("c.jpg", "train"),
        ("trunc.jpg", "train"),
        (STRAY, "train"),
        ("d.jpg", "val"),
        ("e.jpg", "test"),
    ]


def test_flickr8k_record_paths_are_absolute_and_captions_in_file_order(tmp_path: Path) -> None:
    record = read("flickr8k", make_flickr8k(tmp_path)).records[0]
    assert record.image_path == (tmp_path / "Flicker8k_Dataset" / "a.jpg").resolve()
    assert record.captions == ("A dog runs .", "A brown dog runs on the grass .")


def test_flickr8k_stray_jpg_1_key_goes_to_its_image_with_a_note(tmp_path: Path) -> None:
    cs = read("flickr8k", make_flickr8k(tmp_path))
    stray = next(r for r in cs.records if r.image_id == STRAY)
    assert stray.captions == ("A man rides a bike .", "A cyclist on a road .")
    assert len(cs.notes) == 1 and f"'{STRAY}.1'" in cs.notes[0]


def test_flickr8k_stray_key_is_a_problem_when_its_image_has_own_captions(tmp_path: Path) -> None:
    make_flickr8k(tmp_path)
    token = tmp_path / "Flickr8k_text" / "Flickr8k.token.txt"
    write_lines(token, [*TOKEN_LINES, f"{STRAY}#0\tIts own caption ."])
    cs = read("flickr8k", tmp_path)
    assert next(r for r in cs.records if r.image_id == STRAY).captions == ("Its own caption .",)
    assert [p.image for p in cs.problems if p.image.startswith(STRAY)] == [f"{STRAY}.1"]
    assert cs.notes == []


def test_flickr8k_key_without_caption_number_is_a_problem(tmp_path: Path) -> None:
    make_flickr8k(tmp_path)
    token = tmp_path / "Flickr8k_text" / "Flickr8k.token.txt"
    write_lines(token, [*TOKEN_LINES, "b.jpg\tNo caption number ."])
    assert read("flickr8k", tmp_path).problems[1].problem == f"{token}:15: key 'b.jpg' is not `<image>#<k>`"


def test_flickr8k_finds_text_in_data_dir_and_nested_image_folder(tmp_path: Path) -> None:
    make_flickr8k(tmp_path, text_dir=".", images_dir="Flickr8k_Dataset/Flicker8k_Dataset")
    assert summary(read("flickr8k", tmp_path))["images"] == 7


def test_flickr8k_images_dir_option_overrides_the_search(tmp_path: Path) -> None:
    make_flickr8k(tmp_path / "data", images_dir="../pictures")
    options = ReadOptions(images_dir=str(tmp_path / "pictures"))
    assert summary(read("flickr8k", tmp_path / "data", options))["images"] == 7


def test_flickr8k_without_image_folder_says_what_to_pass(tmp_path: Path) -> None:
    make_flickr8k(tmp_path, images_dir="photos")
    with pytest.raises(CaptuneError, match=r"looked for Flicker8k_Dataset, .*\. Name it with --images-dir$"):
        read("flickr8k", tmp_path)


# --- flickr8k-kaggle ------------------------------------------------------------------------------------------------


def test_kaggle_keeps_commas_and_quotes_in_captions(tmp_path: Path) -> None:
    caption = 'A dog, called "Rex", jumps , high .'
    cs = read("flickr8k-kaggle", make_kaggle(tmp_path, [("x.jpg", caption)]))
    assert cs.records[0].captions == (caption,)


def test_kaggle_split_counts_follow_the_fractions(tmp_path: Path) -> None:
    s = summary(read("flickr8k-kaggle", make_kaggle(tmp_path, kaggle_rows(20))))
    # round(20 * 0.125) = 2 (banker's rounding of 2.5) for test and val.
    assert (s["images"], s["captions"], s["splits"]) == (20, 40, {"train": 16, "val": 2, "test": 2})


def test_kaggle_split_is_independent_of_row_order(tmp_path: Path) -> None:
    rows = kaggle_rows(20)
    forward = read("flickr8k-kaggle", make_kaggle(tmp_path / "forward", rows))
    backward = read("flickr8k-kaggle", make_kaggle(tmp_path / "backward", rows[::-1]))
    assert [(r.image_id, r.split) for r in forward.records] == [(r.image_id, r.split) for r in backward.records]


def test_kaggle_split_changes_with_the_seed(tmp_path: Path) -> None:
    make_kaggle(tmp_path, kaggle_rows(20))
    seed0 = read("flickr8k-kaggle", tmp_path, ReadOptions(seed=0)).split("test")
    seed1 = read("flickr8k-kaggle", tmp_path, ReadOptions(seed=1)).split("test")
    assert [r.image_id for r in seed0] != [r.image_id for r in seed1]


def test_kaggle_split_keeps_when_an_image_goes_missing(tmp_path: Path) -> None:
    make_kaggle(tmp_path, kaggle_rows(20))
    before = {r.image_id: r.split for r in read("flickr8k-kaggle", tmp_path).records}
    (tmp_path / "Images" / "img03.jpg").unlink()
    cs = read("flickr8k-kaggle", tmp_path)
    assert {r.image_id: r.split for r in cs.records} == {k: v for k, v in before.items() if k != "img03.jpg"}
    assert [p.image for p in cs.problems] == ["img03.jpg"]


def test_kaggle_wrong_header_says_what_was_found(tmp_path: Path) -> None:
    make_kaggle(tmp_path, kaggle_rows(1), header=("file", "text"))
    with pytest.raises(
        CaptuneError, match=r"captions\.txt:1: expected the header 'image,caption' .* found 'file,text'$"
    ):
        read("flickr8k-kaggle", tmp_path)


def test_kaggle_row_with_three_fields_is_a_problem_with_line(tmp_path: Path) -> None:
    make_kaggle(tmp_path, [("a.jpg", "A cat ."), ("b.jpg", "A dog .")])
    (tmp_path / "captions.txt").write_text("image,caption\na.jpg,A cat .\nb.jpg,A dog, unquoted\nb.jpg,A dog .\n")
    cs = read("flickr8k-kaggle", tmp_path)
    assert [(p.image, p.problem.split(": ")[0]) for p in cs.problems] == [("b.jpg", f"{tmp_path / 'captions.txt'}:3")]
    assert summary(cs)["captions"] == 2


# --- karpathy -------------------------------------------------------------------------------------------------------


def test_karpathy_reads_splits_with_restval_in_train(tmp_path: Path) -> None:
    write_karpathy(
        tmp_path / "dataset_flickr8k.json",
        [
            karpathy_entry("a.jpg", "train", "A dog .", "A brown dog ."),
            karpathy_entry("b.jpg", "restval", "A cat ."),
            karpathy_entry("c.jpg", "val", "A bird ."),
            karpathy_entry("d.jpg", "test", "A fish ."),
        ],
    )
    for seed, name in enumerate("abcd"):
        write_jpeg(tmp_path / "Flicker8k_Dataset" / f"{name}.jpg", seed)
    s = summary(read("karpathy", tmp_path))
    assert (s["images"], s["captions"], s["splits"]) == (4, 5, {"train": 2, "val": 1, "test": 1})
    assert s["notes"] == ["dataset_flickr8k.json: 1 'restval' images joined train"]


def test_karpathy_problems_name_the_images(tmp_path: Path) -> None:
    write_karpathy(
        tmp_path / "dataset_flickr8k.json",
        [
            karpathy_entry("ok.jpg", "train", "Fine ."),
            karpathy_entry("gone.jpg", "train", "Not on disk ."),
            karpathy_entry("odd.jpg", "holdout", "Unknown split ."),
            karpathy_entry("mute.jpg", "test", "  "),
            {"split": "train", "sentences": []},
        ],
    )
    for seed, name in enumerate(["ok.jpg", "odd.jpg", "mute.jpg"]):
        write_jpeg(tmp_path / "images" / name, seed)
    cs = read("karpathy", tmp_path)
    assert [r.image_id for r in cs.records] == ["ok.jpg"]
    assert [p.image for p in cs.problems] == ["odd.jpg", "mute.jpg", "images[4]", "gone.jpg", "mute.jpg"]


def test_karpathy_coco_filepath_is_under_the_data_dir(tmp_path: Path) -> None:
    name = "COCO_val2014_000000000042.jpg"
    write_karpathy(tmp_path / "dataset_coco.json", [karpathy_entry(name, "test", "A plate .", filepath="val2014")])
    write_jpeg(tmp_path / "val2014" / name)
    assert read("karpathy", tmp_path).records[0].image_path == (tmp_path / "val2014" / name).resolve()


def test_karpathy_several_split_files_are_named(tmp_path: Path) -> None:
    write_karpathy(tmp_path / "dataset_flickr8k.json", [])
    write_karpathy(tmp_path / "dataset_coco.json", [])
    with pytest.raises(
        CaptuneError, match=r"\(dataset_coco\.json, dataset_flickr8k\.json\); choose one with --annotations$"
    ):
        read("karpathy", tmp_path)


def test_karpathy_annotations_option_picks_the_file(tmp_path: Path) -> None:
    write_karpathy(tmp_path / "dataset_flickr8k.json", [karpathy_entry("a.jpg", "train", "A dog .")])
    write_karpathy(tmp_path / "dataset_coco.json", [])
    write_jpeg(tmp_path / "a.jpg")
    options = ReadOptions(annotations="dataset_flickr8k.json")
    assert [r.image_id for r in read("karpathy", tmp_path, options).records] == ["a.jpg"]


def test_karpathy_invalid_json_names_line_and_column(tmp_path: Path) -> None:
    (tmp_path / "dataset_flickr8k.json").write_text('{"images": [\n  {"filename": }\n]}')
    with pytest.raises(CaptuneError, match=r"dataset_flickr8k\.json:2:16: not valid JSON"):
        read("karpathy", tmp_path)


# --- check_images and summary ---------------------------------------------------------------------------------------


def test_check_images_moves_the_truncated_jpeg_to_problems(tmp_path: Path) -> None:
    checked = check_images(read("flickr8k", make_flickr8k(tmp_path)), workers=2, progress=False)
    s = summary(checked)
    assert (s["images"], s["splits"]) == (6, {"train": 4, "val": 1, "test": 1})
    assert checked.problems[-1].image == "trunc.jpg"
    assert "truncated" in checked.problems[-1].problem


def test_check_images_leaves_its_input_unchanged(tmp_path: Path) -> None:
    cs = read("flickr8k", make_flickr8k(tmp_path))
    check_images(cs, progress=False)
    assert (len(cs.records), len(cs.problems)) == (7, 3)


def test_check_images_sample_checks_that_many_and_says_so(tmp_path: Path) -> None:
    cs = read("flickr8k-kaggle", make_kaggle(tmp_path, kaggle_rows(10)))
    for name in ["img00.jpg", "img01.jpg", "img02.jpg", "img03.jpg", "img04.jpg"]:
        (tmp_path / "Images" / name).write_bytes(b"not an image")
    checked = check_images(cs, sample=4, progress=False)
    # With seed 0 the sample holds 2 of the 5 broken images; a full check would find all 5.
    assert (len(checked.records), len(checked.problems)) == (8, 2)
    assert (
        checked.notes[-1]
        == "image check: decoded a random sample of 4 of 10 images (seed 0); the other 6 were not checked"
    )


def test_check_images_progress_bar_goes_to_stderr(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    check_images(read("flickr8k-kaggle", make_kaggle(tmp_path, kaggle_rows(2))), workers=1)
    captured = capsys.readouterr()
    assert "checking images" in captured.err and captured.out == ""


def test_summary_keys_in_order(tmp_path: Path) -> None:
    s = summary(read("flickr8k", make_flickr8k(tmp_path)))
    assert list(s) == ["images", "captions", "splits", "problems", "unassigned", "notes"]


def test_summary_problems_are_image_and_text(tmp_path: Path) -> None:
    make_kaggle(tmp_path, kaggle_rows(2))
    (tmp_path / "Images" / "img01.jpg").unlink()
    s = summary(read("flickr8k-kaggle", tmp_path))
    where = f"{tmp_path / 'captions.txt'}:4"
    assert s["problems"] == [
        {"image": "img01.jpg", "problem": f"{where}: image file missing: {tmp_path / 'Images' / 'img01.jpg'}"}
    ]


# --- load_rgb -------------------------------------------------------------------------------------------------------


def _photo(path: Path, size: tuple[int, int], fmt: str = "JPEG") -> Path:
    """A smooth seeded image of `size`, like a photo for the decoder."""
    coarse = np.random.default_rng(0).integers(0, 256, size=(30, 40, 3), dtype=np.uint8)
    options = {"quality": 90} if fmt == "JPEG" else {}
    Image.fromarray(coarse).resize(size, Image.Resampling.BICUBIC).save(path, fmt, **options)
    return path


def test_a_large_jpeg_decodes_at_a_reduced_scale_that_the_processor_cannot_tell_apart(tmp_path: Path) -> None:
    from transformers import BlipImageProcessorPil

    processor = BlipImageProcessorPil(size={"height": 224, "width": 224})
    assert decode_size(processor) == (448, 448)
    photo = _photo(tmp_path / "big.jpg", (2000, 1500))
    small = load_rgb(photo, decode_size(processor))
    assert small.size == (1000, 750) and small.mode == "RGB"  # 1/2 scale: at 1/4, 375 rows would be under 448
    full = load_rgb(photo)
    assert full.size == (2000, 1500)
    difference = (
        processor(small, return_tensors="np")["pixel_values"] - processor(full, return_tensors="np")["pixel_values"]
    )
    assert np.abs(difference).max() < 0.05  # about 3 grey levels at most (one level is ~0.015 after normalising)
    png = _photo(tmp_path / "big.png", (2000, 1500), "PNG")
    assert load_rgb(png, (448, 448)).size == (2000, 1500)  # only JPEG has DCT scaling
    assert load_rgb(_photo(tmp_path / "small.jpg", (600, 450)), (448, 448)).size == (600, 450)


def test_a_truncated_large_jpeg_is_still_refused_at_a_reduced_scale(tmp_path: Path) -> None:
    photo = _photo(tmp_path / "big.jpg", (2000, 1500))
    data = photo.read_bytes()
    photo.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="truncated or corrupt"):
        load_rgb(photo, (448, 448))


def test_load_rgb_converts_a_palette_png(tmp_path: Path) -> None:
    Image.new("RGB", (4, 4), (200, 30, 40)).convert("P", palette=Image.Palette.ADAPTIVE).save(tmp_path / "p.png")
    assert Image.open(tmp_path / "p.png").mode == "P"
    image = load_rgb(tmp_path / "p.png")
    assert (image.mode, image.getpixel((0, 0))) == ("RGB", (200, 30, 40))


def test_load_rgb_composites_rgba_on_white(tmp_path: Path) -> None:
    rgba = Image.new("RGBA", (2, 1), (255, 0, 0, 255))
    rgba.putpixel((1, 0), (0, 0, 255, 0))
    rgba.save(tmp_path / "rgba.png")
    image = load_rgb(tmp_path / "rgba.png")
    assert [image.getpixel((0, 0)), image.getpixel((1, 0))] == [(255, 0, 0), (255, 255, 255)]


def test_load_rgb_scales_16_bit_grey_instead_of_clipping(tmp_path: Path) -> None:
    Image.fromarray(np.full((4, 4), 128 * 257, dtype=np.uint16)).save(tmp_path / "grey16.png")
    assert Image.open(tmp_path / "grey16.png").mode == "I;16"
    assert load_rgb(tmp_path / "grey16.png").getpixel((0, 0)) == (128, 128, 128)


def test_load_rgb_converts_cmyk(tmp_path: Path) -> None:
    Image.new("CMYK", (4, 4), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")
    image = load_rgb(tmp_path / "cmyk.jpg")
    assert image.mode == "RGB" and image.getpixel((0, 0))[0] > 200 > image.getpixel((0, 0))[1]


def test_load_rgb_truncated_jpeg_fails_on_decode(tmp_path: Path) -> None:
    path = write_truncated_jpeg(tmp_path / "cut.jpg")
    Image.open(path).close()  # the header is intact: only decoding the pixels finds the cut
    with pytest.raises(ImageError, match=f"^{re.escape(str(path))}: truncated or corrupt"):
        load_rgb(path)


def test_load_rgb_not_an_image(tmp_path: Path) -> None:
    (tmp_path / "notes.jpg").write_text("hello")
    with pytest.raises(ImageError, match=f"^{re.escape(str(tmp_path / 'notes.jpg'))}: not an image"):
        load_rgb(tmp_path / "notes.jpg")


def test_load_rgb_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match=f"^{re.escape(str(tmp_path / 'gone.jpg'))}: missing"):
        load_rgb(tmp_path / "gone.jpg")


def fail_if_decoded(self: ImageFile.ImageFile) -> None:
    raise AssertionError("pixels decoded before the size check")


def test_load_rgb_refuses_pillows_decompression_bomb_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_jpeg(tmp_path / "big.jpg")  # 32 x 32 = 1024 pixels, over twice the limit: Pillow raises
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)
    with pytest.raises(ImageError, match=f"^{re.escape(str(path))}: decompression bomb"):
        load_rgb(path)


def test_load_rgb_refuses_what_pillow_only_warns_about(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_jpeg(tmp_path / "big.jpg")  # 1024 pixels, between the limit and twice it: Pillow only warns
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    monkeypatch.setattr(ImageFile.ImageFile, "load", fail_if_decoded)
    with pytest.warns(Image.DecompressionBombWarning), pytest.raises(ImageError, match="1024 pixels exceeds"):
        load_rgb(path)


# --- end to end: train and evaluate on the original Flickr8k layout and on a Karpathy Flickr30k file ---------------


def _flickr30k_karpathy(root: Path) -> Path:
    entries = [
        karpathy_entry(f"{i}.jpg", split, f"picture {i} shows a scene .", f"a scene in picture {i} .")
        for i, split in enumerate(["train"] * 4 + ["val"] * 2 + ["test"] * 2)
    ]
    write_karpathy(root / "dataset_flickr30k.json", entries)
    for i in range(len(entries)):
        write_jpeg(root / "flickr30k-images" / f"{i}.jpg", i, size=8)
    return root


@pytest.mark.parametrize(
    ("layout", "make"),
    [("flickr8k", lambda root: make_flickr8k(root)), ("karpathy", _flickr30k_karpathy)],
    ids=["flickr8k", "karpathy-flickr30k"],
)
def test_train_then_eval_end_to_end(
    layout: str, make: Callable[[Path], Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = make(tmp_path / "data")
    run, out = tmp_path / "run", tmp_path / "eval"
    monkeypatch.setattr(metrics, "_SPICE_LIB", tmp_path / "no-spice")  # SPICE would take minutes where it can run
    fast = ["max_steps=2", "train.batch_size=4", "warmup_steps=0", "model.dtype=fp32", "generate.num_beams=1",
            "generate.min_new_tokens=1", "generate.max_new_tokens=4", "skip_bad_images=true"]  # fmt: skip
    assert main(["train", f"data={layout}", f"data_dir={data}", f"output_dir={run}", *fast]) == 0
    assert json.loads((run / "results.json").read_text())["total_steps"] == 2
    args = ["--data", layout, "--data-dir", str(data), "--split", "test", "--output-dir", str(out)]
    assert main(["eval", "--model-dir", str(run / "best"), *args]) == 0
    assert list(json.loads((out / "metrics.json").read_text())) == list(METRIC_NAMES)
    predicted = {p["image_id"] for p in json.loads((out / "predictions.json").read_text())}
    assert predicted == {r.image_id for r in read(layout, data, ReadOptions()).split("test")}


# --- pixels rescaled and normalised on the model's device --------------------------------------------------------


def _pictures() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    colour = Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
    grey = Image.fromarray(rng.integers(0, 256, (30, 20), dtype=np.uint8)).convert("RGB")
    return [colour, grey]


@pytest.mark.parametrize("size", [32, 384])
def test_device_pixels_are_the_image_processors_bit_for_bit(size: int) -> None:
    import torch
    from transformers import BlipImageProcessorPil

    from captune.data import images as image_module

    processor = BlipImageProcessorPil(size={"height": size, "width": size})
    expected = processor(_pictures(), return_tensors="pt")["pixel_values"]
    for _ in range(2):  # the first call checks the device's way against the processor, the second uses it
        got = image_module.device_pixels(processor, _pictures(), torch.device("cpu"))
        assert got.dtype == torch.float32 and torch.equal(got, expected)
    assert image_module._NORMALISED_AS[processor] == "rescaled_in_float64"


def test_device_pixels_fall_back_to_the_processor_when_no_way_matches(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch
    from transformers import BlipImageProcessorPil

    from captune.data import images as image_module

    monkeypatch.setattr(image_module, "NORMALISATIONS", {"off": lambda raw, scale, mean, std: raw.float() * scale})
    calls: list[dict[str, Any]] = []

    class Counted(BlipImageProcessorPil):
        def __call__(self, images: Any, **kwargs: Any) -> Any:
            calls.append(kwargs)
            return super().__call__(images, **kwargs)

    processor = Counted(size={"height": 32, "width": 32})
    expected = processor(_pictures(), return_tensors="pt")["pixel_values"]
    calls.clear()
    for _ in range(2):
        assert torch.equal(image_module.device_pixels(processor, _pictures(), torch.device("cpu")), expected)
    assert image_module._NORMALISED_AS[processor] is None
    # first call: 8-bit resize, then the whole processor to compare; after: the whole processor only
    assert [("do_rescale" in kw) for kw in calls] == [True, False, False]


def test_device_pixels_leave_processors_that_do_not_normalise_to_themselves() -> None:
    import torch
    from transformers import BlipImageProcessorPil

    from captune.data import images as image_module

    processor = BlipImageProcessorPil(size={"height": 32, "width": 32}, do_normalize=False)
    expected = processor(_pictures(), return_tensors="pt")["pixel_values"]
    assert torch.equal(image_module.device_pixels(processor, _pictures(), torch.device("cpu")), expected)
    assert processor not in image_module._NORMALISED_AS


def test_device_pixels_leave_an_unhashable_processor_to_itself() -> None:
    import torch
    from transformers import BlipImageProcessorPil

    from captune.data import images as image_module

    class Unhashable(BlipImageProcessorPil):
        __hash__ = None  # type: ignore[assignment]

    processor = Unhashable(size={"height": 32, "width": 32})
    expected = processor(_pictures(), return_tensors="pt")["pixel_values"]
    assert torch.equal(image_module.device_pixels(processor, _pictures(), torch.device("cpu")), expected)
