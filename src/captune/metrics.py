"""COCO-caption metrics (BLEU 1-4, METEOR, ROUGE-L, CIDEr-D, SPICE when it can run), pure functions on pycocoevalcap.

The numbers are the official COCO-caption toolkit's: references and predictions go through the Stanford
PTBTokenizer, then through pycocoevalcap's own scorers, with nothing re-implemented here. This module only runs
the scorers quietly on inputs that captune.metric_inputs loads and checks, and says which metric was skipped and
why.

It runs them faster than COCOEvalCap.evaluate, with the same numbers: METEOR (captune.meteor) loads only the part
of its paraphrase table the captions can use, so its JVM starts in 0.3 s instead of ~6 s, and it scores while BLEU,
ROUGE-L and CIDEr-D run in Python. Each scorer gets the same tokenized input and computes alone, so the order they
run in cannot change a number. BLEU, ROUGE-L and CIDEr-D score the corpus in chunks, in worker processes
(captune.scorers), so memory does not grow with their n-gram counts, and the tokenizer runs on chunks too.
`benchmarks/scoring.py` measures the gain (see benchmarks/README.md).
"""

import contextlib
import io
import json
import shutil
import subprocess
import sys
from collections.abc import Hashable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypedDict, TypeVar

from pycocoevalcap.spice import get_stanford_models as stanford_models
from pycocoevalcap.spice.spice import Spice
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from captune.errors import CaptuneError
from captune.files import progress_bar, write_atomically
from captune.meteor import meteor_score
from captune.metric_inputs import checked_predictions, checked_references, load_predictions, load_references, some_ids
from captune.scorers import corpus_scores, usable_cpus

METRIC_NAMES: tuple[str, ...] = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr")

# The metrics computed in Python alone: no METEOR JVM to start, for cheap validation during training.
FAST_METRICS: tuple[str, ...] = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "ROUGE_L", "CIDEr")

# SPICE parses captions with Stanford CoreNLP 3.6.0; pycocoevalcap downloads these jars on first use,
# so their absence is checked up front instead (no internet here, and a 400 MB surprise download elsewhere).
_SPICE_LIB = Path(stanford_models.SPICEDIR) / stanford_models.SPICELIB
_SPICE_JARS = (f"{stanford_models.JAR}.jar", f"{stanford_models.JAR}-models.jar")

# PTBTokenizer replaces "\n" in captions, but Java's line reader also ends a line at these characters, and then
# every later caption is scored against the wrong image. Mapping them to a space is what the toolkit does for "\n".
_LINE_BREAKS = str.maketrans(dict.fromkeys("\r\x0b\x0c\u2028\u2029", " "))

_K = TypeVar("_K", bound=Hashable)

# Images per run of the PTB tokenizer's JVM (~0.4 s to start).
_TOKENIZE_IMAGES = 20_000


@dataclass
class EvalResult:
    """Corpus-level caption metrics for one set of predictions."""

    metrics: dict[str, float]
    """The asked metrics (all of `METRIC_NAMES` by default) in `METRIC_NAMES` order, plus "SPICE" when it ran."""
    skipped: dict[str, str]
    """Metric name -> why it was not computed, e.g. {"SPICE": "... jars not found ..."}."""
    num_images: int
    """Images scored."""
    missing: list[str]
    """Image ids with references but no prediction, left out of scoring (only with allow_missing)."""
    per_image: dict[str, dict[str, float]] = field(default_factory=dict)
    """Image id -> its own score in each metric of `metrics` but SPICE; filled only with per_image=True.

    Bleu_n here is the sentence-level BLEU-n of that image's caption from the same scorer, and METEOR its segment
    score: the corpus BLEU and METEOR are computed from n-gram and match counts summed over all images, so they are
    not the mean of these. Corpus ROUGE-L and CIDEr-D are the means of their per-image scores."""


class PerImageRow(TypedDict):
    """One scored image for error analysis: a line of `--per-image` output and a card of the report's gallery."""

    image_id: str
    prediction: str
    references: list[str]
    Bleu_4: float
    CIDEr: float


def score_captions(
    references: Mapping[str, Sequence[str]],
    predictions: Mapping[str, str],
    *,
    allow_missing: bool = False,
    source: str = "predictions",
    metrics: Sequence[str] = METRIC_NAMES,
    per_image: bool = False,
    workers: int | None = None,
    progress: bool = False,
) -> EvalResult:
    """Scores predicted captions against reference captions with the COCO-caption toolkit.

    Image ids may be ints (COCO) or strings (Flickr file names); both are compared as strings. All inputs are
    checked before any Java scorer starts. Captions are not pre-processed: the PTB tokenizer lowercases them and
    drops punctuation, exactly as in the official pipeline. The one exception is that line-break characters other
    than "\\n" (which the toolkit itself turns into a space) also become spaces, since Java would otherwise split the
    caption into two lines and shift every later caption onto the wrong image.

    An empty prediction (or one of punctuation only) is legal and needs no special handling: it tokenizes to "",
    which every pycocoevalcap scorer accepts, and the numbers equal COCOEvalCap.evaluate's on the same files. That
    image scores 0 in METEOR, ROUGE-L and CIDEr; corpus BLEU adds nothing to the hypothesis n-gram counts but the
    image's references to the reference length, so the brevity penalty grows (BLEU-3/4 may still rise).

    CIDEr-D weights n-grams by their document frequency over the scored images, so it is always 0 for a single
    image and unreliable for a handful; it is allowed but meaningful only for a real evaluation split.

    SPICE is tried only when every metric of `METRIC_NAMES` is asked for; METEOR's JVM starts only when "METEOR" is.
    BLEU-1..4 come from one scorer, so asking for one of them costs as much as asking for all four.

    Args:
        references: Image id -> its reference captions (at least one each).
        predictions: Image id -> the one predicted caption.
        allow_missing: Score only the images that have a prediction, listing the others in `missing`, instead of
            refusing when some referenced images have no prediction.
        source: Where the predictions came from (a file name), used in error messages.
        metrics: The metrics to compute, any of `METRIC_NAMES` (e.g. `FAST_METRICS` during training); the result
            lists them in `METRIC_NAMES` order.
        per_image: Also keep each image's own scores in `EvalResult.per_image` (for `per_image_rows`).
        workers: Processes for BLEU, ROUGE-L and CIDEr-D on a corpus of more than `scorers.CHUNK_IMAGES` images
            (see `captune.scorers`), and METEOR JVMs (one more per 4,000 images); None: one per usable CPU (at most
            16); 1: the Python scorers in this process and one METEOR JVM.
        progress: Show progress bars on stderr (tokenizing, then the Python scorers) and say when METEOR is awaited.

    Returns:
        The metrics, the skipped ones with reasons, the number of images scored, the missing ids and, with
        per_image, each image's scores.

    Raises:
        CaptuneError: `metrics` is empty or names an unknown metric, a prediction has no references, a referenced
            image has no prediction (unless allow_missing), nothing is left to score, an id appears twice, a caption
            is not a string, or Java is not installed.
    """
    names = _checked_metric_names(metrics)
    refs = checked_references(references)
    preds = checked_predictions(predictions, source)
    unknown = [image_id for image_id in preds if image_id not in refs]
    if unknown:
        raise CaptuneError(
            f"{source}: {len(unknown)} predictions are for images with no references: {some_ids(unknown)}; "
            "check that the predictions and the references come from the same split"
        )
    missing = [image_id for image_id in refs if image_id not in preds]
    if missing and not allow_missing:
        raise CaptuneError(
            f"{source}: {len(missing)} of {len(refs)} referenced images have no prediction: {some_ids(missing)}; "
            "caption them, or pass --allow-missing (allow_missing=True) to score only the predicted images"
        )
    if not preds:
        raise CaptuneError(f"{source}: there are no predictions to score; caption at least one referenced image")
    _require_java()
    scores = _coco_metrics(
        {image_id: refs[image_id] for image_id in preds},
        preds,
        names,
        per_image=per_image,
        workers=workers,
        progress=progress,
    )
    return EvalResult(
        metrics=scores.corpus,
        skipped=scores.skipped,
        num_images=len(preds),
        missing=missing,
        per_image=scores.per_image,
    )


def evaluate_files(predictions: Path | str, references: Path | str, *, allow_missing: bool = False) -> EvalResult:
    """Scores a COCO results file against a COCO captions annotation file.

    Args:
        predictions: The results JSON, `[{"image_id": ..., "caption": ...}, ...]`.
        references: The annotation JSON, `{"images": [...], "annotations": [...]}`.
        allow_missing: Score only the referenced images that have a prediction; see `score_captions`.

    Returns:
        The scores, as from `score_captions`.

    Raises:
        CaptuneError: Either file is malformed, or the two do not cover the same images.
    """
    return score_captions(
        load_references(Path(references)),
        load_predictions(Path(predictions)),
        allow_missing=allow_missing,
        source=str(predictions),
    )


def write_metrics(path: Path, result: EvalResult) -> None:
    """Writes `result.metrics` as a flat JSON object (indent 2), atomically.

    The file is written beside `path` and renamed over it, so a reader never sees half a file.

    Args:
        path: The JSON file to write; its directory is created if needed.
        result: The scores to write.
    """
    write_atomically(path, json.dumps(result.metrics, indent=2) + "\n")


def per_image_rows(
    references: Mapping[str, Sequence[str]], predictions: Mapping[str, str], result: EvalResult
) -> list[PerImageRow]:
    """Lists every scored image with its captions, BLEU-4 and CIDEr-D, worst CIDEr-D first, for error analysis.

    BLEU-4 is the sentence-level score of the one caption (see `EvalResult.per_image`).

    Args:
        references: Image id -> reference captions, as given to `score_captions`.
        predictions: Image id -> predicted caption, as given to `score_captions`.
        result: What `score_captions(references, predictions, per_image=True)` returned, with Bleu_4 and CIDEr
            among its metrics.

    Returns:
        One row per scored image, sorted by CIDEr-D ascending; images with equal CIDEr-D keep their scoring order.

    Raises:
        CaptuneError: `result` has no per-image scores, or lacks Bleu_4 or CIDEr, or scores an image that is not
            in `references` and `predictions`.
    """
    if not result.per_image:
        raise CaptuneError("the result has no per-image scores; score with score_captions(..., per_image=True)")
    absent = [name for name in ("Bleu_4", "CIDEr") if name not in result.metrics]
    if absent:
        raise CaptuneError(
            f"per-image rows need Bleu_4 and CIDEr, but the result was scored without {' and '.join(absent)}; "
            "include them in score_captions(metrics=...)"
        )
    refs = {str(image_id): list(captions) for image_id, captions in references.items()}
    preds = {str(image_id): caption for image_id, caption in predictions.items()}
    unknown = [image_id for image_id in result.per_image if image_id not in refs or image_id not in preds]
    if unknown:
        raise CaptuneError(
            f"{len(unknown)} scored images are not in the references and predictions given: {some_ids(unknown)}; "
            "pass the same references and predictions that were scored"
        )
    rows = [
        PerImageRow(
            image_id=image_id,
            prediction=preds[image_id],
            references=refs[image_id],
            Bleu_4=scores["Bleu_4"],
            CIDEr=scores["CIDEr"],
        )
        for image_id, scores in result.per_image.items()
    ]
    return sorted(rows, key=lambda row: row["CIDEr"])


def write_per_image(path: Path, rows: Sequence[PerImageRow]) -> None:
    """Writes per-image rows as JSON lines (UTF-8, one object per image, in the given order), atomically.

    Args:
        path: The .jsonl file to write; its directory is created if needed.
        rows: The rows, as from `per_image_rows`.
    """
    write_atomically(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


@dataclass
class _Scores:
    """What the scorers computed for the asked metrics."""

    corpus: dict[str, float]
    per_image: dict[str, dict[str, float]]
    skipped: dict[str, str]


def _coco_metrics(
    references: dict[str, list[str]],
    predictions: dict[str, str],
    names: tuple[str, ...],
    *,
    per_image: bool,
    workers: int | None,
    progress: bool,
) -> _Scores:
    """Tokenizes and scores as COCOEvalCap.evaluate does, METEOR alongside the Python scorers."""
    gts, res = _tokenized(references, predictions, progress)
    processes = workers or usable_cpus()
    # A thread runs METEOR (its JVMs work while the thread waits on pipes, without the GIL) while BLEU, ROUGE-L and
    # CIDEr-D run in worker processes.
    with ThreadPoolExecutor(max_workers=1) as pool:
        meteor_run = (
            pool.submit(meteor_score, gts, res, jvms=processes, progress=progress) if "METEOR" in names else None
        )
        results = corpus_scores(gts, res, names, workers=processes, progress=progress)
        if meteor_run is not None:
            if progress and not meteor_run.done():
                print("scoring: waiting for METEOR (Java)", file=sys.stderr, flush=True)
            results["METEOR"] = meteor_run.result()
    # Every scorer lists its per-image scores in the order of gts' keys.
    corpus = {name: float(results[name][0]) for name in names}
    scores = {
        image_id: {name: float(results[name][1][index]) for name in names}
        for index, image_id in enumerate(gts)
        if per_image
    }
    spice, skipped = _spice(gts, res) if names == METRIC_NAMES else ({}, {})
    return _Scores(corpus=corpus | spice, per_image=scores, skipped=skipped)


def _tokenized(
    references: dict[str, list[str]], predictions: dict[str, str], progress: bool
) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """The references and predictions through the toolkit's tokenizer, `_TOKENIZE_IMAGES` images per Java run (its
    output is read whole, so one run over a large corpus holds every caption several times over)."""
    ids = list(references)
    gts: dict[str, list[str]] = {}
    res: dict[str, list[str]] = {}
    with progress_bar(len(ids), "tokenizing (PTB)", progress) as bar:
        for start in range(0, len(ids), _TOKENIZE_IMAGES):
            part = ids[start : start + _TOKENIZE_IMAGES]
            both = _tokenize(
                {("r", image_id): references[image_id] for image_id in part}
                | {("p", image_id): [predictions[image_id]] for image_id in part}
            )
            gts |= {image_id: both["r", image_id] for image_id in part}
            res |= {image_id: both["p", image_id] for image_id in part}
            bar.update(len(part))
    return gts, res


def _tokenize(captions: dict[_K, list[str]]) -> dict[_K, list[str]]:
    """Runs the toolkit's PTBTokenizer (lowercase, split, drop punctuation) on image id -> captions."""
    tokenized = PTBTokenizer().tokenize(
        {image_id: [{"caption": c.translate(_LINE_BREAKS)} for c in texts] for image_id, texts in captions.items()}
    )
    # The tokenizer pairs output lines with captions by position; a short output means Java failed.
    if any(len(tokenized.get(image_id, [])) != len(texts) for image_id, texts in captions.items()):
        raise CaptuneError(
            "the PTB tokenizer (Java) returned fewer lines than captions; check that `java -version` works"
        )
    return tokenized


def _spice(gts: dict[str, list[str]], res: dict[str, list[str]]) -> tuple[dict[str, float], dict[str, str]]:
    """Runs SPICE if it can run here; returns {"SPICE": score} or {"SPICE": why it was skipped}."""
    absent = [jar for jar in _SPICE_JARS if not (_SPICE_LIB / jar).is_file()]
    if absent:
        return {}, {
            "SPICE": f"Stanford CoreNLP jars not found in {_SPICE_LIB}: {', '.join(absent)}; run "
            "`python -m pycocoevalcap.spice.get_stanford_models` once with internet access to fetch them"
        }
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            score, _ = Spice().compute_score(gts, res)
    except subprocess.CalledProcessError as err:
        return {}, {"SPICE": f"spice-1.0.jar exited with status {err.returncode}; it needs Java 8 or 11, not 17+"}
    return {"SPICE": float(score)}, {}


def _checked_metric_names(metrics: Sequence[str]) -> tuple[str, ...]:
    """Returns the asked metric names in `METRIC_NAMES` order, refusing unknown names and an empty list."""
    if isinstance(metrics, str):
        raise CaptuneError(f"metrics must be a list of metric names, got the string {metrics!r}; pass [{metrics!r}]")
    unknown = [name for name in metrics if name not in METRIC_NAMES]
    if unknown:
        raise CaptuneError(
            f"unknown metrics {', '.join(map(repr, unknown))}; choose from {', '.join(METRIC_NAMES)} "
            "(SPICE is added by itself when all of them are asked for and it can run)"
        )
    if not metrics:
        raise CaptuneError(f"no metrics asked for; choose from {', '.join(METRIC_NAMES)}")
    return tuple(name for name in METRIC_NAMES if name in metrics)


def _require_java() -> None:
    """Fails early, with what to do, if the Java runtime the toolkit's scorers need is missing."""
    if shutil.which("java") is None:
        raise CaptuneError(
            "`java` is not on PATH; the COCO-caption toolkit runs its tokenizer, METEOR and SPICE in Java: "
            "install a JRE (e.g. apt-get install default-jre-headless)"
        )
