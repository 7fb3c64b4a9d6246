"""`captune index` and `captune search` end to end on tiny-retrieval: a folder indexed, searched by text and by
image (text and JSON output), a caption index searched by image, and the errors a user can fix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from captune.cli import main
from captune.data.synthetic import SyntheticSpec, generate_synthetic
from captune.retrieval import build_tiny_retrieval, save_retrieval
from tests.cli.conftest import assert_user_error


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """A folder of 8 synthetic images, and their first captions in file order."""
    data = tmp_path_factory.mktemp("synthetic")
    manifest = json.loads(generate_synthetic(data, SyntheticSpec(train=8, val=0, test=0, image_size=32)).read_text())
    by_name = {e["image"]: e["captions"][0] for e in manifest["images"]}
    return data / "images", [by_name[name] for name in sorted(by_name)]


@pytest.fixture(scope="module")
def index(folder: tuple[Path, list[str]], tmp_path_factory: pytest.TempPathFactory) -> Path:
    output = tmp_path_factory.mktemp("index") / "idx"
    assert main(["index", str(folder[0]), "--model-dir", "tiny-retrieval", "--output", str(output),
                 "--workers", "0", "--device", "cpu"]) == 0  # fmt: skip
    return output


def test_index_prints_its_summary(
    folder: tuple[Path, list[str]], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    code = main(["index", str(folder[0]), "--model-dir", "tiny-retrieval", "--output", str(tmp_path / "i"),
                 "--workers", "1", "--batch-size", "3", "--chunk-size", "5", "--device", "cpu"])  # fmt: skip
    assert code == 0
    assert f"indexed 8 image(s); {tmp_path / 'i'}: 8 vectors, flat index" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "i" / "chunks").iterdir()) == [
        "000000.npz", "000000.queries.npy", "000001.npz", "000001.queries.npy"
    ]  # fmt: skip


def test_index_again_resumes_with_nothing_to_do(index: Path, folder: tuple[Path, list[str]], capsys) -> None:
    assert main(["index", str(folder[0]), "--model-dir", "tiny-retrieval", "--output", str(index),
                 "--workers", "0", "--device", "cpu"]) == 0  # fmt: skip
    assert "indexed 0 image(s) (8 already in the index)" in capsys.readouterr().out


def test_search_text_prints_scores_and_paths(index: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["search", str(index), "a red square", "--top", "3", "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3
    scores = [float(line.split("\t")[0]) for line in lines]
    assert scores == sorted(scores, reverse=True)
    assert all(Path(line.split("\t")[1]).is_file() for line in lines)


def test_search_image_json_finds_the_image_itself(
    index: Path, folder: tuple[Path, list[str]], capsys: pytest.CaptureFixture
) -> None:
    query = sorted(folder[0].iterdir())[4]
    assert main(["search", str(index), "--image", str(query), "--top", "2", "--json", "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["kind"], result["image"], len(result["hits"])) == ("images", str(query), 2)
    assert result["hits"][0]["key"] == str(query.resolve())


def test_caption_index_searched_by_image(
    folder: tuple[Path, list[str]], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    captions = tmp_path / "captions.txt"
    captions.write_text("\n".join(folder[1]) + "\n\n")
    assert main(["index", "--captions", str(captions), "--model-dir", "tiny-retrieval", "--output",
                 str(tmp_path / "caps"), "--device", "cpu"]) == 0  # fmt: skip
    captured = capsys.readouterr()
    assert f"indexed {len(folder[1])} caption(s); 1 input(s) skipped" in captured.out
    assert f"captions.txt:{len(folder[1]) + 1}: blank line" in captured.err
    query = sorted(folder[0].iterdir())[0]
    assert main(["search", str(tmp_path / "caps"), "--image", str(query), "--json", "--top", "3"]) == 0
    hits = json.loads(capsys.readouterr().out)["hits"]
    assert [h["caption"] for h in hits] == [folder[1][int(h["key"]) - 1] for h in hits]


def test_corrupt_image_is_reported_and_counted(
    folder: tuple[Path, list[str]], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff not a jpeg")
    code = main(["index", str(sorted(folder[0].iterdir())[0]), str(bad), str(tmp_path / "gone.jpg"), "--model-dir",
                 "tiny-retrieval", "--output", str(tmp_path / "i"), "--workers", "0", "--device", "cpu"])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 1
    assert f"skipped: {bad.resolve()}:" in captured.err
    assert f"error: {tmp_path / 'gone.jpg'}: no such file or folder" in captured.err
    assert "indexed 1 image(s); 2 input(s) skipped (listed in" in captured.out
    listed = [line.split("\t")[0] for line in (tmp_path / "i" / "skipped.tsv").read_text().splitlines()]
    assert listed == [str(tmp_path / "gone.jpg"), str(bad.resolve())]


def test_missing_path_is_named(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = main(["index", str(tmp_path / "nope"), "--model-dir", "tiny-retrieval", "--output", str(tmp_path / "i")])
    err = capsys.readouterr().err
    assert f"{tmp_path / 'nope'}: no such file or folder" in err
    assert_user_error(code, err.splitlines()[-1], "no image files in", "give image files, folders or globs")


def test_another_model_is_refused(index: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    other = tmp_path / "other"
    save_retrieval(build_tiny_retrieval(seed=1), other)
    code = main(["search", str(index), "a red square", "--model-dir", str(other), "--device", "cpu"])
    assert_user_error(code, capsys.readouterr().err, "made with the model 'tiny-retrieval'", "not comparable")


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["a dog", "--image", "q.jpg"], "not both and not neither"),
        ([], "not both and not neither"),
        (["a dog", "--top", "0"], "--top 0: ask for at least one result"),
        (["--image", "missing.jpg"], "missing.jpg: missing: no such file"),
    ],
)
def test_bad_search_options_are_named(
    index: Path, argv: list[str], fragment: str, capsys: pytest.CaptureFixture
) -> None:
    code = main(["search", str(index), *argv, "--device", "cpu"])
    assert_user_error(code, capsys.readouterr().err, fragment)


def test_not_an_index_is_named(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = main(["search", str(tmp_path), "a dog"])
    assert_user_error(code, capsys.readouterr().err, f"{tmp_path}: not a vector index", "captune index")


def test_approximate_index_prints_its_recall_and_rerank_runs(
    folder: tuple[Path, list[str]], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    assert main(["index", str(folder[0]), "--model-dir", "tiny-retrieval", "--output", str(tmp_path / "i"),
                 "--approximate-above", "4", "--approximate", "ivf", "--workers", "0"]) == 0  # fmt: skip
    assert "8 vectors, ivf index, recall@10 against exact 1.000" in capsys.readouterr().out
    assert main(["search", str(tmp_path / "i"), folder[1][0], "--rerank", "3", "--top", "4", "--json"]) == 0
    scores = [h["score"] for h in json.loads(capsys.readouterr().out)["hits"]]
    assert len(scores) == 4 and scores[:3] == sorted(scores[:3], reverse=True)


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["--approximate", "lsh"], "--approximate lsh: choose one of hnsw, ivf"),
        (["--workers", "-1"], "--workers -1: give 0"),
        (["--captions", "caps.txt"], "not both and not neither"),
        (["--chunk-size", "0"], "chunk size 0: give at least 1"),
    ],
)
def test_bad_index_options_are_named(
    folder: tuple[Path, list[str]], tmp_path: Path, argv: list[str], fragment: str, capsys: pytest.CaptureFixture
) -> None:
    code = main(["index", str(folder[0]), "--model-dir", "tiny-retrieval", "--output", str(tmp_path / "i"), *argv])
    assert_user_error(code, capsys.readouterr().err, fragment)


def test_missing_caption_file_is_named(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = main(["index", "--captions", str(tmp_path / "c.txt"), "--model-dir", "tiny-retrieval", "--output",
                 str(tmp_path / "i")])  # fmt: skip
    assert_user_error(code, capsys.readouterr().err, f"--captions {tmp_path / 'c.txt'}: no such file")


def test_a_saved_copy_of_the_model_is_accepted(index: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    copy = tmp_path / "copy"
    save_retrieval(build_tiny_retrieval(seed=0), copy)  # the weights tiny-retrieval builds
    assert main(["search", str(index), "a red square", "--model-dir", str(copy), "--top", "1"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 1
