"""`captune evaluate`, called in-process (METEOR's JVM starts once for the module): the metrics written and
printed, and a missing file."""

from __future__ import annotations

import contextlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from captune import metrics
from captune.cli import main
from captune.metrics import METRIC_NAMES

from .conftest import assert_user_error


@dataclass
class Evaluated:
    code: int
    out: str
    metrics_file: Path


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory: pytest.TempPathFactory) -> Evaluated:
    folder = tmp_path_factory.mktemp("evaluate")
    references = {
        "images": [{"id": "1.jpg"}, {"id": "2.jpg"}],
        "annotations": [
            {"image_id": "1.jpg", "caption": "a red circle on the left"},
            {"image_id": "1.jpg", "caption": "a small red circle at the left"},
            {"image_id": "2.jpg", "caption": "a blue square at the top"},
            {"image_id": "2.jpg", "caption": "there is a large blue square on the top"},
        ],
    }
    predictions = [{"image_id": "1.jpg", "caption": "a red circle on the left"},
                   {"image_id": "2.jpg", "caption": "a green triangle, bottom"}]  # fmt: skip
    (folder / "refs.json").write_text(json.dumps(references))
    (folder / "preds.json").write_text(json.dumps(predictions))
    output = folder / "out" / "metrics.json"
    stdout = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(stdout):
        # SPICE would run for minutes where its CoreNLP jars exist; an empty lib folder skips it on every machine.
        patch.setattr(metrics, "_SPICE_LIB", folder / "no-spice")
        code = main(["evaluate", "--predictions", str(folder / "preds.json"), "--references",
                     str(folder / "refs.json"), "--output", str(output)])  # fmt: skip
    return Evaluated(code, stdout.getvalue(), output)


def test_evaluate_succeeds(evaluated: Evaluated) -> None:
    assert evaluated.code == 0


def test_evaluate_writes_flat_metrics_with_exactly_the_coco_keys(evaluated: Evaluated) -> None:
    scores = json.loads(evaluated.metrics_file.read_text())
    assert list(scores) == ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr"]
    assert all(isinstance(v, float) and v > 0 for v in scores.values())


def test_evaluate_prints_each_metric_and_why_spice_was_skipped(evaluated: Evaluated) -> None:
    lines = evaluated.out.splitlines()
    assert [line.split()[0] for line in lines] == [*METRIC_NAMES, "SPICE"]
    assert lines[-1].startswith("SPICE    skipped: Stanford CoreNLP jars not found")


def test_evaluate_with_a_missing_predictions_file_is_a_user_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    references = tmp_path / "refs.json"
    references.write_text(json.dumps({"annotations": [{"image_id": 1, "caption": "a red circle"}]}))
    code = main(["evaluate", "--predictions", str(tmp_path / "preds.json"), "--references", str(references)])
    assert_user_error(code, capsys.readouterr().err, str(tmp_path / "preds.json"))
