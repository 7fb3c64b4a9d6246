"""The run report: one self-contained HTML page about a training run directory.

`write_report` reads what `captune train` left in a run directory (config, training log, validation files, results)
and writes `report.html` beside them: a summary, the metric table, plots, a gallery of validation captions with the
worst CIDEr first (a `task: vqa` run: of validation questions with the lowest VQA accuracy first), and the config.
Plots and thumbnails are embedded as base64 data URIs and the CSS is inline, so the one file can be moved, mailed and
viewed offline. Whatever the run did not write is named as absent, never silently left out.
"""

from __future__ import annotations

import base64
import html
import io
import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from captune.data.images import ImageError, load_rgb
from captune.data.vqa import Question
from captune.errors import CaptuneError
from captune.metric_inputs import load_references
from captune.metrics import PerImageRow, per_image_rows, score_captions
from captune.vqa_accuracy import QuestionId, vqa_accuracy

REPORT_NAME = "report.html"
THUMBNAIL_PX = 160
"""Longest side of a gallery thumbnail; larger images are shrunk, smaller ones kept (and scaled up by the CSS)."""

_CSS = """
body { font: 14px/1.45 system-ui, sans-serif; color: #222; margin: 0 auto; max-width: 1240px; padding: 16px 24px; }
h1 { font-size: 22px; margin: 0 0 8px; } h2 { font-size: 18px; margin: 28px 0 8px; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; } th, td { border: 1px solid #ddd; padding: 4px 8px; vertical-align: top; }
th { background: #f4f4f4; text-align: left; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.facts th { width: 170px; } .absent { color: #8a5a00; background: #fff6e0; padding: 6px 10px; border-radius: 4px; }
.plots { display: grid; grid-template-columns: repeat(auto-fill, minmax(520px, 1fr)); gap: 12px; }
.plots img { width: 100%; border: 1px solid #eee; }
.gallery { display: grid; grid-template-columns: repeat(auto-fill, minmax(380px, 1fr)); gap: 10px; }
.card { display: flex; gap: 10px; border: 1px solid #ddd; border-radius: 4px; padding: 8px; font-size: 13px; }
.card ul { margin: 4px 0 0; padding-left: 18px; color: #555; } .card .id { color: #777; font-size: 12px; }
.scores { font-variant-numeric: tabular-nums; color: #444; } .rank { font-weight: 700; margin-right: 6px; }
.thumb { width: 160px; height: auto; flex: none; image-rendering: pixelated; align-self: flex-start; }
.pred { font-weight: 600; margin-top: 2px; } .question { margin-top: 2px; }
.missing-image { width: 160px; flex: none; color: #a00; font-size: 12px; word-break: break-all; }
pre { background: #f7f7f7; padding: 10px; overflow-x: auto; font-size: 12px; }
"""


@dataclass(frozen=True)
class TaskView:
    """What the report names and ranks by for one `data.task`."""

    name: str
    best_key: str
    """The best val score's key in results.json."""
    metric: str
    """The val metric best/ is chosen by (a key of a val/step-*.json file's metrics)."""
    label: str
    unit: str
    """Printed after the best score (VQA accuracy is in percent)."""


TASK_VIEWS = {
    "caption": TaskView("caption", "best_cider", "CIDEr", "CIDEr", ""),
    "vqa": TaskView("vqa", "best_vqa_accuracy", "vqa_accuracy", "VQA accuracy", "%"),
    "retrieval": TaskView("retrieval", "best_r_mean", "r_mean", "mean recall (R@1, 5, 10 both ways)", "%"),
}


@dataclass
class LogPoint:
    """One line of train_log.jsonl."""

    step: int
    epoch: int
    loss: float
    lr: float
    samples_per_s: float


@dataclass
class Validation:
    """One val/step-NNNNNN.json file."""

    step: int
    metrics: dict[str, float]
    predictions: dict[str, str]


@dataclass
class RunFiles:
    """What a run directory holds; None (or empty) where the run did not write a file."""

    run_dir: Path
    config_text: str
    config: dict[str, Any]
    log: list[LogPoint] | None
    validations: list[Validation]
    results: dict[str, Any] | None
    best_metrics: dict[str, float] | None

    @property
    def task(self) -> TaskView:
        """The view of the run's `data.task` (a config without one is a caption run, the default)."""
        task = self.config.get("data", {}).get("task", "caption")
        if task not in TASK_VIEWS:
            raise CaptuneError(
                f"{self.run_dir / 'config.yaml'}: data.task is {task!r}; expected one of {', '.join(TASK_VIEWS)}"
            )
        return TASK_VIEWS[task]


def write_report(run_dir: Path, *, gallery_size: int = 48) -> Path:
    """Writes `run_dir/report.html`, a single self-contained page about a training run.

    Scoring the gallery's captions one image at a time runs the COCO-caption toolkit, so Java is needed (not for a
    `task: vqa` run, whose gallery is scored by `captune.vqa_accuracy`).

    Args:
        run_dir: The `train.output_dir` of a `captune train` run (it holds config.yaml).
        gallery_size: How many validation images (VQA: questions) the gallery shows, the worst scored first.

    Returns:
        The path of the written report.

    Raises:
        CaptuneError: `run_dir` holds no config.yaml, or one of the run's files is not what `captune train` writes.
    """
    run = _load_run(Path(run_dir))
    sections = [
        _summary(run),
        _metric_table(run),
        _plots(run),
        _GALLERIES[run.task.name](run, gallery_size),
        _config(run),
    ]
    page = _page(f"captune run report: {run.run_dir.name}", _header(run), sections)
    path = run.run_dir / REPORT_NAME
    path.write_text(page, encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------------------ reading ---
def _load_run(run_dir: Path) -> RunFiles:
    """Reads every file of a run directory the report uses; raises CaptuneError without config.yaml."""
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        what = "not a captune run directory (no config.yaml)" if run_dir.is_dir() else "no such directory"
        raise CaptuneError(f"{run_dir}: {what}; pass the train.output_dir of a `captune train` run")
    text = config_path.read_text(encoding="utf-8")
    try:
        config = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise CaptuneError(f"{config_path}: not valid YAML ({err}); fix or restore the file") from err
    return RunFiles(
        run_dir=run_dir,
        config_text=text,
        config=config,
        log=_read_train_log(run_dir / "train_log.jsonl"),
        validations=_read_validations(run_dir / "val"),
        results=_read_json(run_dir / "results.json"),
        best_metrics=_read_json(run_dir / "best" / "metrics.json"),
    )


def _read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object a file holds (every JSON file of a run holds one), or None when the file does not exist."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CaptuneError(f"{path}: not valid JSON ({err}); the run wrote it badly or it was edited") from err
    if not isinstance(data, dict):
        raise CaptuneError(f"{path}: expected a JSON object, got {type(data).__name__}; regenerate or delete it")
    return data


def _read_train_log(path: Path) -> list[LogPoint] | None:
    if not path.is_file():
        return None
    points = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        try:
            entry = json.loads(line)
            points.append(LogPoint(**{key: entry[key] for key in ("step", "epoch", "loss", "lr", "samples_per_s")}))
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise CaptuneError(
                f"{path}:{number}: expected a JSON object with step, epoch, loss, lr, samples_per_s ({err!r}); "
                "delete the broken line and run `captune report` again"
            ) from err
    return points


def _read_validations(val_dir: Path) -> list[Validation]:
    validations = []
    for path in sorted(val_dir.glob("step-*.json")):
        data = _read_json(path) or {}
        if "metrics" not in data or "predictions" not in data:
            raise CaptuneError(f"{path}: expected an object with 'metrics' and 'predictions'; delete or regenerate it")
        step = int(path.stem.removeprefix("step-"))
        validations.append(Validation(step, data["metrics"], {str(k): v for k, v in data["predictions"].items()}))
    return validations


def _read_questions(path: Path) -> list[Question]:
    """The val questions of a `task: vqa` run, as `captune train` writes val/questions.json (question id, as the
    val/step-*.json predictions key it -> question, image, annotators' answers, answer and question type)."""
    questions = []
    for question_id, entry in (_read_json(path) or {}).items():
        try:
            questions.append(Question(question_id, entry["question"], entry["image_id"], Path(entry["image_path"]),
                                      tuple(entry["answers"]), "val", entry.get("answer_type"),
                                      entry.get("question_type")))  # fmt: skip
        except (KeyError, TypeError) as err:
            raise CaptuneError(
                f"{path}: question {question_id!r}: expected an object with question, image_id, image_path and "
                f"answers ({err!r}); delete the file and train again to rewrite it"
            ) from err
    return questions


def _best_validation(run: RunFiles) -> Validation | None:
    """The validation of results.json's best_step, else the one with the highest score best/ is chosen by (CIDEr,
    VQA accuracy; the first of equals, as training keeps best/)."""
    best_step = (run.results or {}).get("best_step")
    for validation in run.validations:
        if validation.step == best_step:
            return validation
    if not run.validations:
        return None
    metric = run.task.metric
    return max(run.validations, key=lambda v: (v.metrics.get(metric, float("-inf")), -v.step))


# ----------------------------------------------------------------------------------------------------- sections ---
def _header(run: RunFiles) -> str:
    model, data = run.config.get("model", {}), run.config.get("data", {})
    results_file = run.run_dir / "results.json"
    finished = (
        datetime.fromtimestamp(results_file.stat().st_mtime).strftime("%Y-%m-%d %H:%M")
        if results_file.is_file()
        else "not finished (no results.json)"
    )
    rows = {
        "run directory": str(run.run_dir.resolve()),
        "base model": model.get("name", "?"),
        "task": run.task.name,
        "data": f"{data.get('format', '?')} from {data.get('data_dir', '?')}",
        "run finished": finished,
        "report written": datetime.now().strftime("%Y-%m-%d %H:%M"),
    }
    return _facts(rows)


def _summary(run: RunFiles) -> str:
    if run.results is None:
        return _section("Run summary", _absent("results.json is absent: the run has not finished (or it crashed)."))
    results = run.results
    peak = results.get("peak_gpu_memory_gib")
    best, task = _best_validation(run), run.task
    score = results.get(task.best_key)
    best_text = "no validation" if score is None else f"{score:.4f}{task.unit} at step {best.step if best else '?'}"
    rows = {
        "optimizer steps": str(results.get("total_steps", "?")),
        "training samples": f"{results.get('train_samples', '?')} in {results.get('train_seconds', 0):.1f} s",
        "samples/s": f"{results.get('samples_per_second', 0):.2f}",
        "peak GPU memory": "CPU run" if peak is None else f"{peak:.2f} GiB",
        f"best {task.label}": best_text,
    }
    return _section("Run summary", _facts(rows))


def _metric_table(run: RunFiles) -> str:
    if run.best_metrics is not None:
        source, metrics = "best/metrics.json (the best model, every metric)", run.best_metrics
    elif run.validations:
        last = run.validations[-1]
        source, metrics = f"the last validation, val/step-{last.step:06d}.json (no best/metrics.json)", last.metrics
    else:
        return _section("Final metrics", _absent("No best/metrics.json and no val/ files: validation did not run."))
    head = "".join(f"<th>{html.escape(name)}</th>" for name in metrics)
    cells = "".join(f'<td class="num">{value:.4f}</td>' for value in metrics.values())
    units = {"vqa": " VQA accuracy in percent, overall and per answer type.",
             "retrieval": " Recall@K in percent; itc_*: the contrastive scores before re-ranking."}  # fmt: skip
    unit = units.get(run.task.name, "")
    body = f"<p>From {html.escape(source)}.{unit}</p><table><tr>{head}</tr><tr>{cells}</tr></table>"
    return _section("Final metrics", body)


def _plots(run: RunFiles) -> str:
    images, notes = [], []
    if run.log:
        steps = [p.step for p in run.log]
        images.append(_line_plot("training loss", steps, {"loss": [p.loss for p in run.log]}))
        images.append(_line_plot("learning rate", steps, {"learning rate": [p.lr for p in run.log]}))
    else:
        notes.append(_absent("train_log.jsonl is absent or empty: no loss and learning-rate curves."))
    if run.validations:
        images += _validation_plots(run)
    else:
        notes.append(_absent("No val/step-*.json files: no validation curves (train.validate was off?)."))
    tags = "".join(f'<img class="plot" alt="{html.escape(alt)}" src="{uri}">' for alt, uri in images)
    return _section("Curves", "".join(notes) + f'<div class="plots">{tags}</div>')


def _gallery(run: RunFiles, size: int) -> str:
    title = "Validation captions"
    chosen = _best_validation(run)
    references_path = run.run_dir / "val" / "references.json"
    if chosen is None:
        return _section(title, _absent("No val/step-*.json files: there are no validation captions to show."))
    if not references_path.is_file():
        return _section(title, _absent(f"{references_path} is absent: the references and images are unknown."))
    references, image_files = load_references(references_path), _image_files(references_path)
    predictions_file = run.run_dir / "val" / f"step-{chosen.step:06d}.json"
    result = score_captions(references, chosen.predictions, metrics=("Bleu_4", "CIDEr"), per_image=True,
                            source=str(predictions_file))  # fmt: skip
    rows = per_image_rows(references, chosen.predictions, result)
    intro = (
        f"<p>Step {chosen.step}, worst CIDEr first: {min(size, len(rows))} of {len(rows)} images. "
        "Scores are per image (CIDEr uses the document frequencies of all these images).</p>"
    )
    cards = "".join(
        _gallery_card(rank, row, image_files.get(row["image_id"])) for rank, row in enumerate(rows[:size], 1)
    )
    return _section(title, f'{intro}<div class="gallery">{cards}</div>')


def _vqa_gallery(run: RunFiles, size: int) -> str:
    """The best validation's questions, the lowest VQA accuracy first (ties in val/questions.json's order)."""
    title = "Validation answers"
    chosen = _best_validation(run)
    questions_path = run.run_dir / "val" / "questions.json"
    if chosen is None:
        return _section(title, _absent("No val/step-*.json files: there are no validation answers to show."))
    if not questions_path.is_file():
        return _section(title, _absent(f"{questions_path} is absent: the questions and images are unknown."))
    questions = _read_questions(questions_path)
    predictions_file = run.run_dir / "val" / f"step-{chosen.step:06d}.json"
    # The ids are text on both sides: JSON keys, in the predictions and in questions.json.
    answers: dict[QuestionId, str] = {key: answer for key, answer in chosen.predictions.items()}
    scores = vqa_accuracy(answers, questions, source=str(predictions_file)).per_question
    ranked = sorted(questions, key=lambda q: scores[q.question_id])
    intro = (
        f"<p>Step {chosen.step}, lowest VQA accuracy first: {min(size, len(ranked))} of {len(ranked)} questions. "
        "Accuracy is per question, in percent (the official VQA evaluation's: min(1, matches / 3) over each set of "
        "all annotators but one, averaged).</p>"
    )
    shown = ranked[:size]
    thumbnails = {path: _thumbnail_tag(path) for path in dict.fromkeys(q.image_path for q in shown)}  # once an image
    cards = "".join(
        _answer_card(rank, q, answers[q.question_id], scores[q.question_id], thumbnails[q.image_path])
        for rank, q in enumerate(shown, 1)
    )
    return _section(title, f'{intro}<div class="gallery">{cards}</div>')


def _no_gallery(run: RunFiles, size: int) -> str:
    """A retrieval run generates no text to show: what shows its rankings instead."""
    return _section("Validation examples", _absent(
        "A retrieval run writes no captions: its validation ranks every val caption against every val image "
        "(the recall above). To see rankings, index images with `captune index` and query them with `captune search`."
    ))  # fmt: skip


_GALLERIES = {"caption": _gallery, "vqa": _vqa_gallery, "retrieval": _no_gallery}
"""The report's gallery section, by task."""


def _config(run: RunFiles) -> str:
    return _section("Config (config.yaml)", f"<pre>{html.escape(run.config_text)}</pre>")


# ------------------------------------------------------------------------------------------------------ helpers ---
def _image_files(path: Path) -> dict[str, Path]:
    """Image id -> image file, from the `file_name` entries of a COCO captions file (`captune train` writes absolute
    paths there)."""
    images = (_read_json(path) or {}).get("images", [])
    return {str(image["id"]): Path(image["file_name"]) for image in images if "file_name" in image}


def _gallery_card(rank: int, row: PerImageRow, image: Path | None) -> str:
    refs = "".join(f"<li>{html.escape(caption)}</li>" for caption in row["references"])
    image_id = html.escape(row["image_id"])
    return (
        f'<div class="card" data-image-id="{image_id}">{_thumbnail_tag(image)}<div>'
        f'<div class="scores"><span class="rank">#{rank}</span>CIDEr <b class="cider">{row["CIDEr"]:.3f}</b> · '
        f'BLEU-4 {row["Bleu_4"]:.3f}</div><div class="id">{image_id}</div>'
        f'<div class="pred">{html.escape(row["prediction"])}</div><ul>{refs}</ul></div></div>'
    )


def _answer_card(rank: int, question: Question, answer: str, accuracy: float, thumbnail: str) -> str:
    """A question's card: its image, the question, the predicted answer and each distinct annotator answer with how
    many gave it."""
    given = "".join(f"<li>{html.escape(text)} ×{count}</li>" for text, count in question.answer_counts())
    question_id = html.escape(str(question.question_id))
    kind = f" · {html.escape(question.answer_type)}" if question.answer_type else ""
    return (
        f'<div class="card" data-question-id="{question_id}">{thumbnail}<div>'
        f'<div class="scores"><span class="rank">#{rank}</span>VQA accuracy <b class="accuracy">{accuracy:.1f}%</b>'
        f'{kind}</div><div class="id">{question_id} · {html.escape(question.image_id)}</div>'
        f'<div class="question">{html.escape(question.question)}</div>'
        f'<div class="pred">{html.escape(answer) or "<i>(empty answer)</i>"}</div><ul>{given}</ul></div></div>'
    )


def _thumbnail_tag(image: Path | None) -> str:
    """An embedded JPEG thumbnail, or a visible note saying why there is none."""
    if image is None:
        return '<div class="missing-image">no file_name in references.json</div>'
    try:
        picture = load_rgb(image)
    except ImageError as err:
        return f'<div class="missing-image">{html.escape(str(err))}</div>'
    picture.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
    buffer = io.BytesIO()
    picture.save(buffer, "JPEG", quality=85)
    return f'<img class="thumb" alt="{html.escape(image.name)}" src="{_data_uri("image/jpeg", buffer.getvalue())}">'


def _line_plot(title: str, steps: list[int], series: dict[str, list[float]], ticks: list[str] | None = None,
               percent: bool = False) -> tuple[str, str]:  # fmt: skip
    """(title, PNG data URI) of a plot of one or more curves over optimizer steps; `ticks` labels each step;
    `percent` puts the y axis on 0-100 (a little past, so that points at 0 and 100 show whole)."""
    figure = Figure(figsize=(5.6, 3.2), dpi=110, layout="constrained")
    axes = figure.add_subplot()
    for name, values in series.items():
        axes.plot(steps, values, marker="o" if ticks else ".", label=name)
    axes.set(title=title, xlabel="optimizer step")
    if percent:
        axes.set(ylabel="percent", ylim=(-4, 104))
    if ticks:
        axes.set_xticks(steps, ticks)
    axes.grid(alpha=0.3)
    if len(series) > 1:
        axes.legend(fontsize=8)
    return title, _png(figure)


def _validation_plots(run: RunFiles) -> list[tuple[str, str]]:
    """CIDEr alone (its scale reaches past 1) and the other metrics together, one point per validation; for a VQA
    run the accuracies (overall and per answer type, all in percent) together."""
    epochs = {entry["step"]: entry["epoch"] for entry in (run.results or {}).get("history", [])}
    steps = [v.step for v in run.validations]
    ticks = [f"{step}\n(epoch {epochs[step]})" if step in epochs else str(step) for step in steps]
    # The best step's file holds every metric, the others the fast subset: plot what all of them have.
    names = [name for name in run.validations[0].metrics if all(name in v.metrics for v in run.validations)]
    curves = {name: [v.metrics[name] for v in run.validations] for name in names}
    if run.task.name == "retrieval":  # the recall after re-ranking, both directions (the itc_* numbers left out)
        recalls = {
            name: values for name, values in curves.items() if name[:5] in ("txt_r", "img_r") and "mean" not in name
        }
        return [_line_plot("validation Recall@K", steps, recalls, ticks, percent=True)] if recalls else []
    if run.task.name == "vqa":
        # vqa_accuracy_yes_no -> "yes_no"; the overall number first, as the val files list it.
        named = {name.removeprefix("vqa_accuracy").lstrip("_") or "overall": values for name, values in curves.items()}
        return [_line_plot("validation VQA accuracy", steps, named, ticks, percent=True)] if named else []
    others = {name: values for name, values in curves.items() if name != "CIDEr"}
    plots = [_line_plot("validation CIDEr", steps, {"CIDEr": curves["CIDEr"]}, ticks)] if "CIDEr" in curves else []
    return plots + ([_line_plot("validation BLEU / ROUGE-L", steps, others, ticks)] if others else [])


def _png(figure: Figure) -> str:
    buffer = io.BytesIO()
    FigureCanvasAgg(figure).print_png(buffer, metadata={"Software": None})
    return _data_uri("image/png", buffer.getvalue())


def _data_uri(mime: str, data: bytes) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _facts(rows: dict[str, str]) -> str:
    cells = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows.items())
    return f'<table class="facts">{cells}</table>'


def _absent(text: str) -> str:
    return f'<p class="absent">{html.escape(text)}</p>'


def _section(title: str, body: str) -> str:
    return f"<section><h2>{html.escape(title)}</h2>{body}</section>"


def _page(title: str, header: str, sections: list[str]) -> str:
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head>"
        f"<body><h1>{html.escape(title)}</h1>{header}{''.join(sections)}</body></html>\n"
    )
