"""BLIP-2 VQA LoRA training throughput: the usual Hugging Face + PEFT recipe vs captune's real `captune train` path
with `task: vqa`, one process, one GPU, the same questions.

    PYTHONPATH=src:benchmarks:.gpu/site python benchmarks/vqa_train_throughput.py --model-dir DIR --output OUT.json
    (DIR from `python benchmarks/random_blip2.py --output DIR`; --tiny for a CPU dry run on the twin)

What runs, in order:
1. Data: `--images` generated JPEGs (500 x 375, as `train_throughput.py` makes them), each asked the five questions
   of `answer_throughput.py` (7-11 words: VQAv2 asks ~5 questions an image), each with ten annotator answers of one
   to three words (one to five tokens of the random model's tokenizer, OPT's BPE), the most frequent answer first;
   `questions.jsonl` in captune's VQA manifest layout, every row in the train split.
2. The usual recipe, as the PEFT notebooks train BLIP-2, on question rows: `Blip2ForConditionalGeneration` in bf16,
   PEFT LoRA r 8 on `q_proj`/`v_proj`, `torch.optim.AdamW`, a row per question with its image's pixels (the vision
   encoder and Q-Former run for every question), `image tokens + BOS + "Question: ... Answer:" + answer + END`
   padded to the longest row of the data set, labels -100 but on the answer and END,
   `model(pixel_values, input_ids, attention_mask, labels).loss`, backward, step, on batches already on the GPU (data
   loading is not timed: the usual recipe's best case). Per batch size: 3 warm-up steps, then `--steps` timed.
3. The loss check: one batch of captune's question rows in eval mode through the usual forward (pixels) and through
   captune's `CaptionLoss` with the image features computed once; they must agree to bf16 tolerance.
4. captune: `captune.training.recipe.train(config)` with `data.task=vqa`, the real path (data check, the feature pass
   over the images, each image's features serving its five questions, the loader with workers, answer-only logits,
   fused AdamW, checkpoint at the end), one epoch at `--batch-size`; its results.json gives samples (questions) per
   second of the training steps, the feature pass's time and peak memory. An image's questions are packed into one
   row (its image tokens once, then each question; `train.pack_captions`); `--ablations` runs the last batch size
   again with each override (default: one row per question).

The speed and memory of a random-weight model are those of the real one (the compute does not depend on the values).
Writes `--output` (JSON: every number, the software versions, the GPU, this command) and prints a table.
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from answer_throughput import QUESTIONS, TEMPLATE
from train_throughput import _environment, is_t5, make_data, time_usual, usual_model

from captune.config import vqa_read_options
from captune.config_loading import load_config
from captune.data.vqa import read_vqa
from captune.tiny import TINY_WORDS
from captune.training.batches import CaptionCollator, CaptionPairs
from captune.training.loss import CaptionLoss
from captune.training.recipe import train
from captune.twins import write_checkpoint

ANSWERS = 10


def make_questions(folder: Path, images: int, seed: int = 0) -> Path:
    """questions.jsonl beside train_throughput's images: five questions an image, ten answers each."""
    manifest = make_data(folder, images, seed)
    out = folder / f"questions-{images}"
    target = out / "questions.jsonl"
    if target.exists():
        return out
    rng = np.random.default_rng(seed + 1)
    rows = []
    for line in manifest.read_text().splitlines():
        image = str((folder / json.loads(line)["image"]).resolve())
        for question in QUESTIONS:
            words = rng.integers(1, 4)
            main = " ".join(rng.choice(TINY_WORDS, size=words))
            others = [" ".join(rng.choice(TINY_WORDS, size=rng.integers(1, 4))) for _ in range(3)]
            answers = [main] * (ANSWERS - 3) + others  # the most frequent answer: `main`, 7 of 10
            rows.append({"image": image, "question": question, "answers": answers, "split": "train"})
    out.mkdir(parents=True, exist_ok=True)
    target.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return out


def usual_question_batches(
    model: torch.nn.Module,
    model_dir: Path,
    data_dir: Path,
    batch_size: int,
    count: int,
    device: torch.device,
    keep_start: bool = False,
) -> list[dict]:
    """`count` batches of the usual recipe: captune's question rows (the same tokens and labels), a row per question
    with its image's pixels, right-padded to the longest row of the data set (the usual recipe's fixed length);
    `keep_start`: with `caption_start` (the first answer column), which captune's loss takes."""
    from transformers import Blip2Processor

    processor = Blip2Processor.from_pretrained(model_dir)
    options = vqa_read_options(load_config(None, ["data.task=vqa", "data.format=manifest"]).data)
    questions = read_vqa("manifest", data_dir, options).questions
    pairs = CaptionPairs.from_questions(questions, processor, TEMPLATE, "most-frequent")
    collate = CaptionCollator.for_model(model, processor, "", max_caption_tokens=8)
    # The longest row: image tokens, the longest prompt (BOS + question) and the longest answer + END, from the
    # texts alone (no image decoded).
    prompts = [pairs.prompts[i] for i in range(len(pairs))] if pairs.prompts is not None else []
    answers = [pairs.captions[i] for i in range(len(pairs))]
    longest = max(map(len, collate.prompt_ids(prompts))) + max(map(len, collate.caption_ids(answers, prompts)))
    width = None if is_t5(model_dir) else processor.num_query_tokens + longest
    batches = []
    for b in range(count):
        batch = collate([pairs[(b * batch_size + i) % len(pairs)] for i in range(batch_size)])
        start = batch.pop("caption_start")
        if width is not None:
            pads = (("input_ids", processor.tokenizer.pad_token_id), ("attention_mask", 0), ("labels", -100))
            for key, value in pads:
                batch[key] = torch.nn.functional.pad(batch[key], (0, width - batch[key].shape[1]), value=value)
        batches.append({k: v.to(device) for k, v in batch.items()} | ({"caption_start": start} if keep_start else {}))
    return batches


def loss_check(model: torch.nn.Module, batch: dict) -> dict[str, float]:
    """The usual forward's loss and captune's CaptionLoss on features computed once, same question rows, eval mode."""
    model.eval()
    with torch.no_grad():
        usual = model(**{k: v for k, v in batch.items() if k != "caption_start"}).loss.item()
        features = (
            model.get_base_model()
            .get_image_features(pixel_values=batch["pixel_values"], return_dict=True)
            .pooler_output
        )
        rest = {k: v for k, v in batch.items() if k != "pixel_values"}
        ours = CaptionLoss(model).eval()(**rest, image_features=features).item()
    return {"usual": usual, "captune_cached_features": ours, "relative_difference": abs(ours - usual) / abs(usual)}


def run_captune(model_dir: Path, data_dir: Path, output: Path, batch_size: int, overrides: list[str]) -> dict:
    config = load_config(None, [
        f"model.name={model_dir}", "data.task=vqa", "data.format=manifest", f"data.data_dir={data_dir}",
        f"train.output_dir={output}", f"train.batch_size={batch_size}", "train.epochs=1", "train.validate=false",
        "train.warmup_steps=10", "train.log_every=10", "train.lr=1e-4", "data.num_workers=8", *overrides,
    ])  # fmt: skip
    shutil.rmtree(output, ignore_errors=True)  # a fresh run, never a continuation of an earlier one
    start = time.perf_counter()
    train(config)
    results = json.loads((output / "results.json").read_text())
    gc.collect()
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return {
        "batch_size": batch_size,
        "overrides": overrides,
        "samples_per_s": results["samples_per_second"],
        "train_samples": results["train_samples"],
        "train_seconds": results["train_seconds"],
        "feature_pass_seconds": results["feature_pass_seconds"],
        "image_features_cached": results["image_features_cached"],
        "peak_gib": results["peak_gpu_memory_gib"],
        # the whole epoch's rate: its training steps and the feature pass before them
        "samples_per_s_with_feature_pass": results["train_samples"]
        / (results["train_seconds"] + results["feature_pass_seconds"]),
        "wall_seconds": time.perf_counter() - start,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path)
    parser.add_argument("--tiny", action="store_true", help="CPU dry run on the twin of blip2-opt-2.7b")
    parser.add_argument("--work", type=Path, default=Path(".bench"))
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--images", type=int, default=4000)
    parser.add_argument("--usual-batch-sizes", default="32,64,128")
    parser.add_argument("--batch-sizes", default="64,256", help="captune's batch sizes, one epoch each")
    parser.add_argument("--steps", type=int, default=20, help="timed steps of the usual recipe per batch size")
    parser.add_argument(
        "--ablations",
        nargs="*",
        default=["train.pack_captions=false"],
        metavar="KEY=VALUE",
        help="one more captune epoch at the last batch size per override (default: rows unpacked)",
    )
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    args.work.mkdir(parents=True, exist_ok=True)
    model_dir = args.model_dir
    if args.tiny:  # the twin of blip2-opt-2.7b: the real tokenizer and ids at tiny sizes
        model_dir = write_checkpoint("Salesforce/blip2-opt-2.7b", args.work / "twin-model")
    assert model_dir is not None, "--model-dir or --tiny"
    data_dir = make_questions(args.work / "data", args.images)
    result: dict[str, Any] = {"what": __doc__.splitlines()[0],
                              "data": {"images": args.images, "questions": args.images * len(QUESTIONS)}}  # fmt: skip
    result.update(_environment(device, argv))

    def save() -> None:  # after every stage, so that a run cut short keeps what it measured
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=2) + "\n")

    model = usual_model(model_dir, device, dtype)
    result["usual"] = {}
    for batch_size in map(int, args.usual_batch_sizes.split(",")):
        try:
            batches = usual_question_batches(model, model_dir, data_dir, batch_size, 4, device)
            result["usual"][batch_size] = time_usual(model, batches, args.steps, device)
        except torch.OutOfMemoryError:
            result["usual"][batch_size] = {"error": "out of memory"}
        batches = None
        gc.collect()
        print(f"usual recipe, batch {batch_size}: {result['usual'][batch_size]}", flush=True)
        save()
    check = usual_question_batches(model, model_dir, data_dir, 8, 1, device, keep_start=True)[0]
    result["loss_check"] = loss_check(model, check)
    print(f"loss check: {result['loss_check']}", flush=True)
    save()
    model = check = None
    gc.collect()
    torch.cuda.empty_cache() if device.type == "cuda" else None
    result["captune"] = []
    for batch_size in map(int, args.batch_sizes.split(",")):
        result["captune"].append(run_captune(model_dir, data_dir, args.work / f"run-{batch_size}", batch_size, []))
        print(f"captune, batch {batch_size}: {result['captune'][-1]}", flush=True)
        save()
    result["ablations"] = []
    for override in args.ablations:
        result["ablations"].append(run_captune(model_dir, data_dir, args.work / "run-ablation", batch_size, [override]))
        print(f"captune, batch {batch_size}, {override}: {result['ablations'][-1]}", flush=True)
        save()
    usual_best = max((r["samples_per_s"] for r in result["usual"].values() if "samples_per_s" in r), default=0.0)
    ours_best = max(r["samples_per_s"] for r in result["captune"])
    whole_best = max(r["samples_per_s_with_feature_pass"] for r in result["captune"])
    result["speedup_over_usual_best"] = ours_best / usual_best if usual_best else None
    result["speedup_with_feature_pass"] = whole_best / usual_best if usual_best else None
    save()
    print(f"usual best {usual_best:.1f} questions/s; captune best {ours_best:.1f}; "
          f"x{result['speedup_over_usual_best'] or 0:.2f} (x{result['speedup_with_feature_pass'] or 0:.2f} with the "
          f"feature pass); written to {args.output}")  # fmt: skip


if __name__ == "__main__":
    main()
