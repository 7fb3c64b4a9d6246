"""The run report: a real tiny training run, looked at in headless Chromium, and hand-built run directories for the
parts a run may lack."""

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
from captune.errors import CaptuneError
from captune.report import write_report

from .conftest import write_image
from .training.test_recipe import _config, recipe

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


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[webdriver.Chrome]:
    """Debian's headless Chromium with a fresh profile, driven by Selenium."""
    missing = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not path.is_file()]
    if missing:
        pytest.fail(
            f"{' and '.join(missing)} not found: run `make browser` (installs Debian's chromium, chromium-driver)"
        )
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=str(CHROMEDRIVER)))
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


def _gallery_ids(page: str) -> list[str]:
    return re.findall(r'class="card" data-image-id="([^"]*)"', page)


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
