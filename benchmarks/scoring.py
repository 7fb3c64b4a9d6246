"""Time COCO-caption scoring: the official scorers one after another vs captune's `score_captions`, on one data set.

    .venv/bin/python benchmarks/scoring.py                      # 5,000 images x 5 references, 3 repeats
    .venv/bin/python benchmarks/scoring.py --images 500 --repeats 1 --output /tmp/scoring.json

The data is a seeded set of caption-like sentences (~10 words, from a word list): each image is a scene (who, doing
what, where), its references and its prediction are independent wordings of it, the prediction sometimes wrong about
a part, so the scores are in the range a fine-tuned captioner gets. Each repeat runs, in this order:

1. official: as pycocoevalcap's `COCOEvalCap.evaluate` does it, SPICE left out: PTBTokenizer on the references and
   on the predictions, then the scorer list is built (`Meteor()` starts its JVM there), then Bleu(4), Meteor, Rouge,
   Cider compute one after another. Each stage is timed; the METEOR stage includes waiting for its JVM to load.
2. captune: `score_captions(references, predictions)` with every metric (SPICE left out the same way), timed with the
   CPU seconds it used (Python and its Java children), then with `FAST_METRICS` (the validation subset, no METEOR).
3. captune again with `CAPTUNE_METEOR_FULL_TABLE=1`: METEOR loads its full paraphrase table, as pycocoevalcap's
   `Meteor()` does, so the difference to 2. is what the filtered table (captune.meteor) gives.
4. METEOR alone, on an idle machine otherwise: pycocoevalcap's (its JVM start until it answers a first request, then
   `compute_score`) and captune's `meteor_score` (filtering the table, its JVM start and the scoring).

Before the repeats, captune's paraphrase index is built if the cache has none (once per machine; its time is
recorded). The full runs' numbers must be identical (the script fails otherwise). Run it on a quiet machine (`uptime`
load below 1): the load average at the start is recorded. Results go to benchmarks/results/scoring-cpu.json with the
times of every repeat, their medians, the machine, the date and this command.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import os
import platform
import random
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from captune import metrics
from captune.meteor import meteor_score, paraphrase_index
from captune.metrics import FAST_METRICS, METRIC_NAMES, score_captions

RESULTS = Path(__file__).parent / "results" / "scoring-cpu.json"

# Scenes as COCO describes them: a subject, an action and a place, each with a few wordings.
SUBJECTS = [
    ["man", "guy", "person"],
    ["woman", "lady", "girl"],
    ["dog", "puppy"],
    ["cat", "kitten"],
    ["child", "boy", "kid"],
    ["group of people", "crowd", "few people"],
    ["bus", "large bus"],
    ["train", "passenger train"],
    ["horse", "brown horse"],
    ["giraffe", "tall giraffe"],
    ["plate of food", "meal", "dish"],
    ["skateboarder", "skater"],
]
ACTIONS = [
    ["sitting on", "resting on", "sitting next to"],
    ["standing in", "standing near", "waiting in"],
    ["walking down", "walking along", "strolling down"],
    ["riding", "riding on top of"],
    ["playing with", "holding"],
    ["looking at", "staring at"],
    ["parked in", "stopped in"],
    ["eating", "grazing in"],
]
PLACES = [
    ["a bench", "a wooden bench", "a park bench"],
    ["the street", "a busy street", "a city street"],
    ["a field", "a grassy field", "an open field"],
    ["the beach", "a sandy beach"],
    ["a kitchen", "a small kitchen"],
    ["a table", "a dining table", "a wooden table"],
    ["the snow", "a snowy hill"],
    ["a frisbee", "a red frisbee"],
    ["the water", "a lake"],
    ["a parking lot", "the road"],
]
OPENINGS = ["a", "a", "a", "an image of a", "there is a", "the", "a photo of a"]
ENDINGS = ["", "", "", " on a sunny day", " at night", " together", " in the background", " near some trees"]


def make_data(num_images: int, num_references: int, seed: int) -> tuple[dict[str, list[str]], dict[str, str]]:
    """Builds image id -> references and image id -> prediction, the same for a given seed."""
    rng = random.Random(seed)
    parts = (SUBJECTS, ACTIONS, PLACES)

    def wording(scene: list[int]) -> str:
        subject, action, place = (rng.choice(options[choice]) for options, choice in zip(parts, scene, strict=True))
        opening = rng.choice(OPENINGS)
        if opening.endswith(" a") and subject[0] in "aeiou":
            opening += "n"
        return f"{opening} {subject} {action} {place}{rng.choice(ENDINGS)}".capitalize() + rng.choice([".", "", "."])

    references: dict[str, list[str]] = {}
    predictions: dict[str, str] = {}
    for index in range(num_images):
        scene = [rng.randrange(len(options)) for options in parts]
        image_id = str(100_000 + index)
        references[image_id] = [wording(scene) for _ in range(num_references)]
        # A captioner gets each part of the scene wrong now and then.
        guess = [
            rng.randrange(len(options)) if rng.random() < 0.4 else part
            for options, part in zip(parts, scene, strict=True)
        ]
        predictions[image_id] = wording(guess)
    return references, predictions


def time_official(references: dict[str, list[str]], predictions: dict[str, str]) -> tuple[dict, dict[str, float]]:
    """Runs the scorers as COCOEvalCap.evaluate does (SPICE left out); returns stage seconds and the metrics."""
    stages: dict[str, float] = {}
    start = time.perf_counter()
    gts, res = tokenize(references, predictions)
    stages["PTBTokenizer"] = time.perf_counter() - start
    scorers = [(Bleu(4), "Bleu"), (Meteor(), "METEOR"), (Rouge(), "ROUGE_L"), (Cider(), "CIDEr")]
    scores: list[float] = []
    for scorer, stage in scorers:
        begin = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):  # Bleu prints its n-gram counts
            score, _ = scorer.compute_score(gts, res)
        stages[stage] = time.perf_counter() - begin
        scores.extend(score if isinstance(score, list) else [score])
    stages["total"] = time.perf_counter() - start
    del scorers  # Meteor.__del__ stops its JVM
    return stages, {name: float(score) for name, score in zip(METRIC_NAMES, scores, strict=True)}


def time_captune(
    references: dict[str, list[str]], predictions: dict[str, str], names: tuple[str, ...]
) -> tuple[dict[str, float], dict[str, float]]:
    """Returns the seconds and CPU seconds (this process and its finished children) `score_captions` takes, and its
    metrics."""
    cpu_before = _cpu_seconds()
    start = time.perf_counter()
    result = score_captions(references, predictions, metrics=names)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "cpu_seconds": _cpu_seconds() - cpu_before}, result.metrics


def time_meteor_alone(gts: dict[str, list[str]], res: dict[str, list[str]]) -> dict[str, float]:
    """Times pycocoevalcap's METEOR JVM start and its compute_score on tokenized captions, with nothing else running."""
    start = time.perf_counter()
    meteor = Meteor()
    # The JVM answers its first request once it has loaded the paraphrase table: that ends its start.
    meteor.meteor_p.stdin.write(b"SCORE ||| a dog ||| a dog\n")
    meteor.meteor_p.stdin.flush()
    meteor.meteor_p.stdout.readline()
    ready = time.perf_counter()
    meteor.compute_score(gts, res)
    end = time.perf_counter()
    del meteor
    return {"jvm_start": ready - start, "compute_score": end - ready, "total": end - start}


def time_captune_meteor_alone(gts: dict[str, list[str]], res: dict[str, list[str]]) -> dict[str, float]:
    """Times captune's meteor_score (table filtering, JVM start and scoring) on tokenized captions."""
    start = time.perf_counter()
    meteor_score(gts, res)
    return {"total": time.perf_counter() - start}


def tokenize(
    references: dict[str, list[str]], predictions: dict[str, str]
) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """Tokenizes references and predictions as COCOEvalCap does, one PTBTokenizer run each."""
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({i: [{"caption": c} for c in captions] for i, captions in references.items()})
    return gts, tokenizer.tokenize({i: [{"caption": c}] for i, c in predictions.items()})


def machine(load: float) -> dict[str, object]:
    """This machine, as the results record it: cores, Python, Java, platform and the load average at the start."""
    return {
        "nproc": os.cpu_count(),
        "python": platform.python_version(),
        "java": java_version(),
        "platform": platform.platform(),
        "load_average_at_start": round(load, 2),
    }


def java_version() -> str:
    """The first line of `java -version`."""
    return subprocess.run(["java", "-version"], capture_output=True, text=True, check=True).stderr.splitlines()[0]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--references", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    load = os.getloadavg()[0]
    if load >= 1:
        print(f"warning: load average {load:.2f} >= 1; the times will be slower than on a quiet machine")
    references, predictions = make_data(args.images, args.references, args.seed)
    gts, res = tokenize(references, predictions)
    start = time.perf_counter()
    built = paraphrase_index(build=False) is None
    if paraphrase_index() is None:
        sys.exit("captune's paraphrase index could not be built; see the message above")
    index_build = {"built_now": built, "seconds": time.perf_counter() - start}
    runs = []
    with tempfile.TemporaryDirectory() as no_spice:
        # SPICE is not part of the comparison; an empty lib dir makes captune skip it on machines that have its jars.
        metrics._SPICE_LIB = Path(no_spice)
        for repeat in range(args.repeats):
            official_stages, official = time_official(references, predictions)
            captune_times, ours = time_captune(references, predictions, METRIC_NAMES)
            fast_times, fast = time_captune(references, predictions, FAST_METRICS)
            os.environ["CAPTUNE_METEOR_FULL_TABLE"] = "1"
            full_table_times, full_table = time_captune(references, predictions, METRIC_NAMES)
            del os.environ["CAPTUNE_METEOR_FULL_TABLE"]
            if ours != official or full_table != official or any(fast[n] != official[n] for n in FAST_METRICS):
                sys.exit(
                    f"repeat {repeat}: captune's numbers differ from the official ones:\n{official}\n{ours}\n{fast}"
                )
            run = {
                "official": official_stages,
                "captune": captune_times,
                "captune_fast_metrics": fast_times,
                "captune_full_meteor_table": full_table_times,
                "meteor_alone": time_meteor_alone(gts, res),
                "captune_meteor_alone": time_captune_meteor_alone(gts, res),
            }
            runs.append(run)
            print(f"repeat {repeat}: " + json.dumps(_rounded(run)))

    median = {
        part: {key: statistics.median(run[part][key] for run in runs) for key in runs[0][part]} for part in runs[0]
    }
    results = {
        "what": "seconds to score a caption set with BLEU-1..4, METEOR, ROUGE-L, CIDEr-D (SPICE left out): "
        "pycocoevalcap's scorers one after another as COCOEvalCap runs them, vs captune.score_captions",
        "command": shlex.join([".venv/bin/python", "benchmarks/scoring.py", *(sys.argv[1:] if argv is None else argv)]),
        "data": {"images": args.images, "references_per_image": args.references, "seed": args.seed},
        "metrics": official,
        "identical": True,
        "paraphrase_index": index_build,
        "median_seconds": median,
        "runs": runs,
        "machine": machine(load),
        "date": datetime.date.today().isoformat(),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print(f"median of {len(runs)}: " + json.dumps(_rounded(median)) + f"; written to {args.output}")


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process and of its children that have exited."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _rounded(times: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    return {part: {key: round(seconds, 2) for key, seconds in values.items()} for part, values in times.items()}


if __name__ == "__main__":
    main()
