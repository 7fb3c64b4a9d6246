"""`captune eval --task retrieval`: a saved retrieval model directory scored on a split, metrics.json equal to the
library's evaluation of the same images, the contrastive-only run, and clear refusals (a captioning model, a negative
--k-test)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from captune.cli import main
from captune.data import read
from captune.errors import CaptuneError
from captune.model_dir import save_tiny_model_dir
from captune.retrieval import build_tiny_retrieval, evaluate_retrieval, load_retrieval, save_retrieval


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("retrieval") / "model"
    save_retrieval(build_tiny_retrieval(3), path)
    return path


def _eval(model_dir: Path, data_dir: Path, out: Path, *extra: str) -> dict:
    code = main(["eval", "--task", "retrieval", "--model-dir", str(model_dir), "--data", "synthetic", "--data-dir",
                 str(data_dir), "--split", "test", "--output-dir", str(out), "--device", "cpu", *extra])  # fmt: skip
    assert code == 0
    return json.loads((out / "metrics.json").read_text())


def test_a_saved_model_scores_as_the_library_does(model_dir: Path, synthetic_dir: Path, tmp_path: Path) -> None:
    metrics = _eval(model_dir, synthetic_dir, tmp_path / "eval", "--k-test", "3")
    records = read("synthetic", synthetic_dir).split("test")
    expected = evaluate_retrieval(load_retrieval(str(model_dir)), records, k_test=3)
    assert metrics["images"] == 6 and metrics["texts"] == 30 and metrics["k_test"] == 3
    assert expected.reranked is not None
    assert metrics["contrastive"] == pytest.approx(expected.contrastive.as_dict())
    assert metrics["reranked"] == pytest.approx(expected.reranked.as_dict())
    # The saved directory is the model it was saved from: the same scores as the one built in memory.
    built = evaluate_retrieval(build_tiny_retrieval(3), records, k_test=None)
    assert (built.scores - expected.scores).abs().max() < 1e-6
    assert set(metrics["contrastive"]) >= {"txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10", "r_mean"}


def test_k_test_0_scores_the_contrastive_similarity_alone(model_dir: Path, synthetic_dir: Path, tmp_path: Path) -> None:
    metrics = _eval(model_dir, synthetic_dir, tmp_path / "eval", "--k-test", "0")
    assert metrics["reranked"] is None and metrics["k_test"] == 0 and "txt_r1" in metrics["contrastive"]


def test_a_captioning_model_and_a_negative_k_test_are_refused(
    model_dir: Path, synthetic_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    captioner = save_tiny_model_dir(tmp_path / "captioner")
    with pytest.raises(CaptuneError, match="not an image-text retrieval BLIP-2"):
        load_retrieval(str(captioner / "base") if (captioner / "base").is_dir() else str(captioner))
    code = main(["eval", "--task", "retrieval", "--model-dir", str(model_dir), "--data", "synthetic", "--data-dir",
                 str(synthetic_dir), "--output-dir", str(tmp_path / "eval"), "--k-test", "-1"])  # fmt: skip
    assert code != 0 and "--k-test -1: give the candidates to re-rank" in capsys.readouterr().err
    assert not (tmp_path / "eval" / "metrics.json").exists()
