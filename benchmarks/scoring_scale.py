"""Time and memory of `captune evaluate` on a large corpus of long captions, beside pycocoevalcap's whole-corpus calls.

    .venv/bin/python benchmarks/scoring_scale.py                          # 200,000 images; official on 20,000
    .venv/bin/python benchmarks/scoring_scale.py --images 4000 --official-images 2000 --output /tmp/scale.json

The data is `scoring.py`'s seeded scenes, five of them joined into each caption: predictions and references of ~48
words, 5 references an image. Each run is a process of its own, and its memory is the peak of the summed resident
set of it and all its children (worker processes, JVMs), sampled every 0.2 s from /proc:

1. official, on the first `--official-images` images: PTBTokenizer, then Bleu(4), Meteor, Rouge and Cider
   `compute_score` on the whole corpus, one after another, as `COCOEvalCap.evaluate` does (SPICE left out).
2. `captune evaluate` (the CLI) on the same images; its metrics must equal (==) the official ones.
3. `captune evaluate` on all `--images` images.

Results go to benchmarks/results/scoring-scale-cpu.json with the command, the machine and the date.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from scoring import machine, make_data

RESULTS = Path(__file__).parent / "results" / "scoring-scale-cpu.json"
SCENES_PER_CAPTION = 5

# The official sequence, run in a child process so that its memory is measured alone.
OFFICIAL = """
import contextlib, io, json, sys
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

references = {str(a["image_id"]): [] for a in json.load(open(sys.argv[1]))["annotations"]}
for a in json.load(open(sys.argv[1]))["annotations"]:
    references[str(a["image_id"])].append(a["caption"])
predictions = {str(p["image_id"]): p["caption"] for p in json.load(open(sys.argv[2]))}
tokenizer = PTBTokenizer()
with contextlib.redirect_stdout(io.StringIO()):
    gts = tokenizer.tokenize({i: [{"caption": c} for c in refs] for i, refs in references.items()})
    res = tokenizer.tokenize({i: [{"caption": predictions[i]}] for i in references})
    scores = []
    for scorer in (Bleu(4), Meteor(), Rouge(), Cider()):
        score, _ = scorer.compute_score(gts, res)
        scores.extend(score if isinstance(score, list) else [score])
names = ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr"]
json.dump({name: float(value) for name, value in zip(names, scores)}, open(sys.argv[3], "w"))
"""


def make_files(folder: Path, num_images: int, seed: int) -> tuple[Path, Path]:
    """Writes references.json (COCO captions) and predictions.json (COCO results) of `num_images` long captions."""
    references, predictions = make_data(num_images * SCENES_PER_CAPTION, 5, seed)
    ids = list(references)
    annotations = []
    results = []
    for image in range(num_images):
        scenes = ids[image * SCENES_PER_CAPTION : (image + 1) * SCENES_PER_CAPTION]
        for k in range(5):
            annotations.append({"image_id": image, "caption": " ".join(references[s][k] for s in scenes)})
        results.append({"image_id": image, "caption": " ".join(predictions[s] for s in scenes)})
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "references.json").write_text(json.dumps({"annotations": annotations}))
    (folder / "predictions.json").write_text(json.dumps(results))
    return folder / "references.json", folder / "predictions.json"


def tree_rss_mb(root: int) -> float:
    """The summed resident set of a process and all its descendants, in MB."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            children.setdefault(int(fields[1]), []).append(int(entry))
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        with contextlib.suppress(OSError):
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return total / 2**20


def measured(command: list[str]) -> dict[str, object]:
    """Runs a command; returns its seconds, the peak summed memory of its process tree, and its stderr's last lines."""
    # Output goes to files, not pipes: the progress bars would fill a pipe nobody reads until the end.
    with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:
        start = time.perf_counter()
        process = subprocess.Popen(command, stdout=stdout, stderr=stderr, text=True)
        peak = 0.0
        while process.poll() is None:
            peak = max(peak, tree_rss_mb(process.pid))
            time.sleep(0.2)
        seconds = time.perf_counter() - start
        stdout.seek(0)
        stderr.seek(0)
        out, err = stdout.read(), stderr.read()
    if process.returncode != 0:
        sys.exit(f"{shlex.join(command)} failed ({process.returncode}):\n{out}\n{err[-3000:]}")
    return {"seconds": round(seconds, 1), "peak_tree_rss_mb": round(peak), "stdout": out.splitlines()}


def captune_evaluate(references: Path, predictions: Path, output: Path) -> dict[str, object]:
    command = [sys.executable, "-m", "captune.cli", "evaluate", "--references", str(references)]
    run = measured([*command, "--predictions", str(predictions), "--output", str(output)])
    return run | {"metrics": json.loads(output.read_text())}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200_000)
    parser.add_argument("--official-images", type=int, default=20_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="captune-scale-") as work:
        small = make_files(Path(work) / "small", args.official_images, args.seed)
        official_out = Path(work) / "official.json"
        official = measured([sys.executable, "-c", OFFICIAL, *map(str, small), str(official_out)])
        official["metrics"] = json.loads(official_out.read_text())
        print("official:", json.dumps(official))
        ours_small = captune_evaluate(*small, Path(work) / "small.json")
        print("captune, same images:", json.dumps(ours_small))
        if ours_small["metrics"] != official["metrics"]:
            sys.exit(
                f"captune's metrics differ from the official ones:\n{official['metrics']}\n{ours_small['metrics']}"
            )
        large = make_files(Path(work) / "large", args.images, args.seed)
        ours_large = captune_evaluate(*large, Path(work) / "large.json")
        print("captune, all images:", json.dumps(ours_large))
    results = {
        "what": "seconds and peak memory (summed RSS of the process tree) to score long captions with BLEU-1..4, "
        "METEOR, ROUGE-L, CIDEr-D: pycocoevalcap's whole-corpus calls vs `captune evaluate`",
        "command": shlex.join(
            [".venv/bin/python", "benchmarks/scoring_scale.py", *(sys.argv[1:] if argv is None else argv)]
        ),
        "data": {
            "images": args.images,
            "official_images": args.official_images,
            "references_per_image": 5,
            "scenes_per_caption": SCENES_PER_CAPTION,
            "seed": args.seed,
        },
        "identical": True,
        "official": official,
        "captune_same_images": ours_small,
        "captune_all_images": ours_large,
        "machine": machine(load),
        "date": datetime.date.today().isoformat(),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
