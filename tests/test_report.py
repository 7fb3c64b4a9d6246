"""The run report: real tiny training runs (captions, and VQA), looked at in headless Chromium, and hand-built run
directories for the parts a run may lack."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from selenium import webdriver

from captune.config import save_config
from captune.config_loading import load_config
from captune.data.vqa import Question, read_vqa
from captune.errors import CaptuneError
from captune.report import write_report
from captune.training.recipe import write_val_questions

from .conftest import write_image
from .training.test_recipe import _config, recipe
from .training.test_vqa import _vqa_config

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,900",
)
# Three val images: a perfect prediction, a wrong one and a half-right one, listed best first so that the gallery
# has to reorder them.
REFERENCES = {
    "red": ["a red circle on the left", "a red circle at the left"],
    "blue": ["a blue square on the right", "a blue square at the right"],
    "green": ["a green triangle on the top", "a green triangle at the top"],
}
PREDICTIONS = {"red": "a red circle on the left", "blue": "zebra zebra zebra", "green": "a green circle on the right"}
# Three val questions, listed best answered first: all ten annotators say "red" and so does the prediction (100%); two
# of ten say "blue" (in each set of nine: one or two matches, so 60%); the prediction "zebra" matches none (0%).
ASKED = {
    "1": ("what colour is the circle?", ("red",) * 10, "red"),
    "2": ("what colour is the square?", ("blue",) * 2 + ("navy",) * 8, "blue"),
    "3": ("which shape is it?", ("triangle",) * 10, "zebra"),
}


@dataclass
class TrainedRun:
    run_dir: Path
    report_after_training: str | None
    """report.html as `captune train` left it, read before any test rewrites it."""


@pytest.fixture(scope="module")
def trained_run(synthetic_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> TrainedRun:
    """Two epochs on the small synthetic set with validation each epoch: 8 optimizer steps an epoch."""
    run_dir = tmp_path_factory.mktemp("report") / "run"
    # min_new_tokens defaults to 8, above this max_new_tokens.
    overrides = ("train.epochs=2", "train.validate=true", "generate.num_beams=1", "generate.max_new_tokens=6",
                 "generate.min_new_tokens=1", "train.log_every=2", "train.batch_size=8")  # fmt: skip
    recipe.train(_config(synthetic_dir, run_dir, *overrides))
    report = run_dir / "report.html"
    return TrainedRun(run_dir, report.read_text() if report.is_file() else None)


@pytest.fixture(scope="module")
def report(trained_run: TrainedRun) -> Path:
    return write_report(trained_run.run_dir)


def start_chromium(profile: Path, performance_log: bool = False) -> webdriver.Chrome:
    """Debian's headless Chromium with a fresh profile in `profile`, driven by Selenium; with `performance_log`, it
    records its network requests (Chrome's performance log). Fails the test, saying what to install, without it."""
    missing = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not path.is_file()]
    if missing:
        pytest.fail(
            f"{' and '.join(missing)} not found: run `make browser` (installs Debian's chromium, chromium-driver)"
        )
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    if performance_log:
        options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    return webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=str(CHROMEDRIVER)))


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[webdriver.Chrome]:
    """Debian's headless Chromium with a fresh profile, driven by Selenium."""
    driver = start_chromium(tmp_path / "chromium-profile")
    try:
        yield driver
    finally:
        driver.quit()


def _hand_built_run(
    root: Path, predictions: dict[str, str] | None = None, results: dict[str, Any] | None = None
) -> Path:
    """A run directory holding config.yaml and, when given, one validation of REFERENCES' images and results.json."""
    run_dir = root / "run"
    run_dir.mkdir(parents=True)
    save_config(load_config(None, []), run_dir / "config.yaml")
    if predictions is not None:
        colours = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (30, 170, 40)}
        images = [{"id": k, "file_name": str(write_image(root / "images" / f"{k}.jpg", c))} for k, c in colours.items()]
        annotations = [{"image_id": k, "caption": c} for k, captions in REFERENCES.items() for c in captions]
        (run_dir / "val").mkdir()
        (run_dir / "val" / "references.json").write_text(json.dumps({"images": images, "annotations": annotations}))
        validation = {"metrics": {"Bleu_4": 0.3, "CIDEr": 1.2}, "predictions": predictions}
        (run_dir / "val" / "step-000004.json").write_text(json.dumps(validation))
    if results is not None:
        (run_dir / "results.json").write_text(json.dumps(results))
    return run_dir


def _hand_built_vqa_run(
    root: Path, validations: dict[int, dict[str, Any]] | None = None, results: dict[str, Any] | None = None
) -> Path:
    """A `task: vqa` run directory: config.yaml, val/questions.json of ASKED (written by the recipe's own writer), a
    val/step-NNNNNN.json for each step of `validations` ({"metrics", "predictions"}; default: step 4 with ASKED's
    predictions) and, when given, results.json."""
    run_dir = root / "run"
    run_dir.mkdir(parents=True)
    save_config(load_config(None, ["task=vqa"]), run_dir / "config.yaml")
    image = write_image(root / "images" / "shapes.jpg")
    questions = [Question(qid, text, image.name, image, answers, "val", "other") for qid, (text, answers, _) in
                 ASKED.items()]  # fmt: skip
    write_val_questions(run_dir / "val" / "questions.json", questions)
    predictions = {qid: predicted for qid, (_, _, predicted) in ASKED.items()}
    validations = validations or {4: {"metrics": {"vqa_accuracy": 53.3}, "predictions": predictions}}
    for step, validation in validations.items():
        (run_dir / "val" / f"step-{step:06d}.json").write_text(json.dumps(validation))
    if results is not None:
        (run_dir / "results.json").write_text(json.dumps(results))
    return run_dir


def _gallery_ids(page: str) -> list[str]:
    return re.findall(r'class="card" data-image-id="([^"]*)"', page)


def _question_ids(page: str) -> list[str]:
    return re.findall(r'class="card" data-question-id="([^"]*)"', page)


def _plot_titles(page: str) -> list[str]:
    return re.findall(r'<img class="plot" alt="([^"]*)"', page)


def test_training_writes_the_report_without_being_asked(trained_run: TrainedRun) -> None:
    assert trained_run.report_after_training is not None
    assert 'class="card"' in trained_run.report_after_training


def test_report_is_one_file_with_every_image_embedded_and_no_external_url(
    trained_run: TrainedRun, report: Path
) -> None:
    assert report == trained_run.run_dir / "report.html"
    page = report.read_text()
    sources = re.findall(r'src="([^"]*)"', page)
    assert len(sources) >= 3 + 6  # at least three plots, six val thumbnails
    assert all(source.startswith(("data:image/png;base64,", "data:image/jpeg;base64,")) for source in sources)
    without_data = re.sub(r"data:[a-z/]+;base64,[A-Za-z0-9+/=]+", "", page)
    assert "http" not in without_data and "<link" not in without_data and "<script" not in without_data


def test_report_renders_in_headless_chromium(report: Path, trained_run: TrainedRun, browser: webdriver.Chrome,
                                             tmp_path: Path) -> None:  # fmt: skip
    browser.get(report.as_uri())  # returns after the load event: every embedded image has been decoded or failed
    images = browser.execute_script(
        "return Array.from(document.images, i => ({cls: i.className, complete: i.complete, "
        "width: i.naturalWidth, height: i.naturalHeight, shown: i.getBoundingClientRect().width}))"
    )
    assert images and all(i["complete"] and i["width"] > 0 and i["height"] > 0 and i["shown"] > 0 for i in images)
    assert sum(i["cls"] == "plot" for i in images) >= 3
    val_ids = {
        str(image["id"]) for image in json.loads((trained_run.run_dir / "val/references.json").read_text())["images"]
    }
    shown_ids = browser.execute_script(
        "return Array.from(document.querySelectorAll('.gallery .card'), r => r.dataset.imageId)"
    )
    assert sorted(shown_ids) == sorted(val_ids) and sum(i["cls"] == "thumb" for i in images) == len(val_ids)
    browser.set_window_size(1280, browser.execute_script("return document.documentElement.scrollHeight"))
    screenshot = tmp_path / "report.png"
    assert browser.save_screenshot(str(screenshot))
    assert Image.open(screenshot).size[0] > 1000


def test_a_directory_without_config_yaml_is_refused(tmp_path: Path) -> None:
    with pytest.raises(CaptuneError, match=rf"{re.escape(str(tmp_path))}: not a captune run directory \(no config"):
        write_report(tmp_path)


def test_what_the_run_did_not_write_is_named(tmp_path: Path) -> None:
    page = write_report(_hand_built_run(tmp_path)).read_text()
    for absent in ("results.json is absent", "train_log.jsonl is absent", "No val/step-*.json files"):
        assert absent in page
    assert "<img" not in page


@pytest.mark.parametrize(("peak", "shown"), [(None, "CPU run"), (12.25, "12.25 GiB")])
def test_summary_shows_speed_and_peak_memory(tmp_path: Path, peak: float | None, shown: str) -> None:
    results = {"total_steps": 16, "train_samples": 256, "train_seconds": 8.0, "samples_per_second": 32.0,
               "peak_gpu_memory_gib": peak, "best_cider": None, "best_step": None, "history": []}  # fmt: skip
    page = write_report(_hand_built_run(tmp_path, results=results)).read_text()
    assert "<th>samples/s</th><td>32.00</td>" in page
    assert f"<th>peak GPU memory</th><td>{shown}</td>" in page


def test_captions_are_html_escaped(tmp_path: Path) -> None:
    page = write_report(_hand_built_run(tmp_path, PREDICTIONS | {"blue": "<script>alert(1)</script>"})).read_text()
    assert "<script" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page


def test_gallery_shows_the_worst_cider_first(tmp_path: Path) -> None:
    page = write_report(_hand_built_run(tmp_path, PREDICTIONS)).read_text()
    assert _gallery_ids(page) == ["blue", "green", "red"]


def test_gallery_size_limits_the_images_shown(tmp_path: Path) -> None:
    page = write_report(_hand_built_run(tmp_path, PREDICTIONS), gallery_size=1).read_text()
    assert _gallery_ids(page) == ["blue"]
    assert "1 of 3 images" in page


# --- VQA runs ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vqa_run(synthetic_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four steps of `task: vqa` on the small synthetic set's questions, validated at the end (30 val questions)."""
    run_dir = tmp_path_factory.mktemp("report-vqa") / "run"
    recipe.train(_vqa_config(synthetic_dir, run_dir, "train.max_steps=4", "train.validate=true", "train.log_every=1"))
    return run_dir


def test_vqa_training_writes_the_val_questions_the_gallery_needs(vqa_run: Path, synthetic_dir: Path) -> None:
    written = json.loads((vqa_run / "val" / "questions.json").read_text())
    val = {str(q.question_id): q for q in read_vqa("synthetic", synthetic_dir).split("val")}
    assert len(written) == len(val) == 30
    predicted = json.loads((vqa_run / "val" / "step-000004.json").read_text())["predictions"]
    assert written.keys() == val.keys() == predicted.keys()  # keyed as the predictions are
    for question_id, entry in written.items():
        question = val[question_id]
        assert entry == {"question": question.question, "image_id": question.image_id,
                         "image_path": str(question.image_path), "answers": list(question.answers),
                         "answer_type": question.answer_type, "question_type": question.question_type}  # fmt: skip


def test_vqa_report_shows_the_best_vqa_accuracy_curves_and_every_question(vqa_run: Path) -> None:
    page = (vqa_run / "report.html").read_text()  # as `captune train` wrote it
    results = json.loads((vqa_run / "results.json").read_text())
    best = f"{results['best_vqa_accuracy']:.4f}% at step {results['best_step']}"
    assert f"<th>best VQA accuracy</th><td>{best}</td>" in page
    assert "no validation" not in page and "best CIDEr" not in page
    assert _plot_titles(page) == ["training loss", "learning rate", "validation VQA accuracy"]
    shown = _question_ids(page)
    assert sorted(shown) == sorted(json.loads((vqa_run / "val" / "questions.json").read_text()))
    assert page.count('class="thumb"') == 30 and 'class="missing-image"' not in page
    assert "<th>vqa_accuracy</th>" in page and "VQA accuracy in percent" in page


def test_vqa_report_renders_in_headless_chromium(vqa_run: Path, browser: webdriver.Chrome) -> None:
    browser.get(write_report(vqa_run).as_uri())
    images = browser.execute_script(
        "return Array.from(document.images, i => ({cls: i.className, ok: i.complete && i.naturalWidth > 0}))"
    )
    assert [i["cls"] for i in images].count("thumb") == 30 and all(i["ok"] for i in images)
    shown = browser.execute_script(
        "return Array.from(document.querySelectorAll('.gallery .card'), c => [c.dataset.questionId, "
        "c.querySelector('.question').textContent])"
    )
    written = json.loads((vqa_run / "val" / "questions.json").read_text())
    assert sorted(shown) == sorted([question_id, entry["question"]] for question_id, entry in written.items())


def test_vqa_gallery_shows_the_lowest_accuracy_first_with_question_answer_and_annotators(tmp_path: Path) -> None:
    page = write_report(_hand_built_vqa_run(tmp_path)).read_text()
    assert _question_ids(page) == ["3", "2", "1"]
    assert re.findall(r'class="accuracy">([^<]*)<', page) == ["0.0%", "60.0%", "100.0%"]
    worst = page[page.index('data-question-id="3"') : page.index('data-question-id="2"')]
    assert '<div class="question">which shape is it?</div>' in worst
    assert '<div class="pred">zebra</div>' in worst and "<li>triangle ×10</li>" in worst
    assert "<li>navy ×8</li><li>blue ×2</li>" in page
    assert "3 of 3 questions" in page and "references.json" not in page


def test_vqa_gallery_size_limits_the_questions_shown(tmp_path: Path) -> None:
    page = write_report(_hand_built_vqa_run(tmp_path), gallery_size=1).read_text()
    assert _question_ids(page) == ["3"] and "1 of 3 questions" in page


def test_vqa_summary_reads_best_vqa_accuracy_from_results(tmp_path: Path) -> None:
    results = {"total_steps": 8, "train_samples": 80, "train_seconds": 2.0, "samples_per_second": 40.0,
               "peak_gpu_memory_gib": None, "best_vqa_accuracy": 42.5, "best_step": 4, "history": []}  # fmt: skip
    page = write_report(_hand_built_vqa_run(tmp_path, results=results)).read_text()
    assert "<th>best VQA accuracy</th><td>42.5000% at step 4</td>" in page


def test_vqa_best_validation_without_results_is_the_highest_vqa_accuracy(tmp_path: Path) -> None:
    # Without results.json the best step is the one with the highest vqa_accuracy: step 8 here, not the first.
    right = {qid: answers[0] for qid, (_, answers, _) in ASKED.items()}
    wrong = {qid: "zebra" for qid in ASKED}
    validations = {4: {"metrics": {"vqa_accuracy": 0.0}, "predictions": wrong},
                   8: {"metrics": {"vqa_accuracy": 86.7}, "predictions": right}}  # fmt: skip
    page = write_report(_hand_built_vqa_run(tmp_path, validations)).read_text()
    assert "Step 8, lowest VQA accuracy first" in page
    assert "zebra" not in page


def test_vqa_curves_plot_the_accuracies_together_in_percent(tmp_path: Path) -> None:
    metrics = {"vqa_accuracy": 20.0, "vqa_accuracy_other": 10.0, "vqa_accuracy_yes_no": 50.0}
    predictions = {qid: "zebra" for qid in ASKED}
    validations = {step: {"metrics": metrics, "predictions": predictions} for step in (4, 8)}
    assert _plot_titles(write_report(_hand_built_vqa_run(tmp_path, validations)).read_text()) == [
        "validation VQA accuracy"
    ]


def test_vqa_run_without_questions_json_names_it_as_absent(tmp_path: Path) -> None:
    run_dir = _hand_built_vqa_run(tmp_path)
    (run_dir / "val" / "questions.json").unlink()
    page = write_report(run_dir).read_text()
    assert f"{run_dir / 'val' / 'questions.json'} is absent" in page and 'class="card"' not in page


def test_questions_and_answers_are_html_escaped(tmp_path: Path) -> None:
    run_dir = _hand_built_vqa_run(tmp_path)
    predictions = {"1": "<b>red</b>", "2": "blue", "3": "<script>alert(1)</script>"}
    (run_dir / "val" / "step-000004.json").write_text(json.dumps({"metrics": {}, "predictions": predictions}))
    page = write_report(run_dir).read_text()
    assert "<script" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "&lt;b&gt;red" in page
