"""Bulk VQA answering on one GPU: the usual transformers loop against captune's `answer_questions` (the path of
`captune ask --questions` and `captune eval --task vqa`), one process, the same images, questions and weights.

    PYTHONPATH=src:.gpu/site python benchmarks/answer_throughput.py --model-dir DIR --work .bench --output OUT.json
    (DIR from `python benchmarks/random_blip2.py --output DIR`; --tiny for a CPU dry run)

Every answer is exactly `--tokens` new tokens greedy (`min_new_tokens = max_new_tokens`, 5 by default: VQA answers
are short), so random weights cost what trained ones do. `--images` generated 500x375 JPEGs, each asked the five
questions of the synthetic VQA set (what colour, which shape, where, how big, is there a ...?: 7-11 words, so the
prompts of one batch differ in length), as VQAv2 asks ~5 questions an image. Stages:
1. The usual loop: for each batch of questions, their images decoded in the loop, `processor(images=..., text=
   prompts, padding=True)` (left padding), `model.generate`, decode; at `--usual-batch`.
2. captune: `answer_questions` with no speed options (captune's decision: path, batch size), 8 decoding workers,
   timed whole and after its first batch; then the share of answers equal to the usual loop's (bf16).
Writes `--output` (JSON: questions/s of each, captune's decision line, agreement, versions, device, this command).
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch
from caption_throughput import _sync, make_images
from PIL import Image

from captune.config import GenerateConfig
from captune.data.vqa import Question
from captune.evaluation import answer_questions
from captune.model_dir import load_model_dir
from captune.twins import write_checkpoint

TEMPLATE = "Question: {} Answer:"
QUESTIONS = ("what colour is the shape?", "which shape is in the picture?", "where in the picture is the shape?",
             "how big is the shape in the picture?", "is there a circle in this picture?")  # fmt: skip


def questions_of(paths: list[Path]) -> list[Question]:
    """Five questions an image, ids in order; no annotator answers (nothing is scored)."""
    return [
        Question(
            question_id=index * len(QUESTIONS) + k,
            question=text,
            image_id=path.stem,
            image_path=path,
            answers=(),
            split="test",
        )  # fmt: skip
        for index, path in enumerate(paths)
        for k, text in enumerate(QUESTIONS)
    ]


def usual_loop(model: Any, processor: Any, questions: list[Question], batch: int, tokens: int) -> tuple:
    """questions/s and answers of the usual loop (images decoded in the loop, processor with text, generate)."""
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    processor.tokenizer.padding_side = "left"
    answers: list[str] = []
    _sync()
    start = time.perf_counter()
    for i in range(0, len(questions), batch):
        chunk = questions[i : i + batch]
        images = [Image.open(q.image_path).convert("RGB") for q in chunk]
        prompts = [TEMPLATE.format(q.question) for q in chunk]
        inputs = processor(images=images, text=prompts, padding=True, return_tensors="pt").to(device)
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        with torch.no_grad():
            output = model.generate(**inputs, num_beams=1, min_new_tokens=tokens, max_new_tokens=tokens,
                                    do_sample=False)  # fmt: skip
        new = output[:, inputs["input_ids"].shape[1] :]
        answers += [" ".join(t.split()) for t in processor.batch_decode(new, skip_special_tokens=True)]
    _sync()
    return len(questions) / (time.perf_counter() - start), answers


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path)
    parser.add_argument("--tiny", action="store_true", help="the OPT twin at tiny size, on this machine (dry run)")
    parser.add_argument("--work", type=Path, default=Path(".bench"))
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--usual-images", type=int, default=256, help="images (x5 questions) for the usual loop")
    parser.add_argument("--usual-batch", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=5)
    parser.add_argument("--workers", type=int, default=8)
    args = parser.parse_args(argv)
    if args.tiny:
        model_dir = write_checkpoint("Salesforce/blip2-opt-2.7b", args.work / "twin-model")
    elif args.model_dir:
        model_dir = args.model_dir
    else:
        parser.error("give --model-dir DIR (benchmarks/random_blip2.py) or --tiny")
    loaded = load_model_dir(model_dir, device="cuda" if torch.cuda.is_available() else "cpu")
    model, processor = loaded.model, loaded.processor
    paths = make_images(args.work / "images", args.images)
    questions = questions_of(paths)
    result: dict[str, Any] = {
        "what": "questions/s of bulk VQA answering: the usual transformers loop and captune's answer_questions",
        "command": shlex.join(["python", "benchmarks/answer_throughput.py", *(argv or sys.argv[1:])]),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
        "dtype": str(next(model.parameters()).dtype), "date": datetime.date.today().isoformat(),
        "tokens_per_answer": args.tokens, "questions": len(questions), "images": len(paths),
    }  # fmt: skip
    import transformers

    result["versions"] = {"torch": torch.__version__, "transformers": transformers.__version__}

    def save() -> None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=2) + "\n")

    usual_questions = questions[: args.usual_images * len(QUESTIONS)]
    rate, usual_answers = usual_loop(model, processor, usual_questions, args.usual_batch, args.tokens)
    result["usual_loop"] = {"batch": args.usual_batch, "questions": len(usual_questions), "questions_per_s": rate}
    print(f"usual loop, batch {args.usual_batch}: {rate:.1f} questions/s", flush=True)
    save()
    options = GenerateConfig(num_beams=1, min_new_tokens=args.tokens, max_new_tokens=args.tokens)
    lines = _Lines()
    logging.getLogger("captune").addHandler(lines)
    logging.getLogger("captune").setLevel(logging.INFO)
    for name in ("first_run", "second_run"):  # the second: what a long run gives once the first batch is paid
        _sync()
        start = time.perf_counter()
        answers = answer_questions(model, processor, questions, options, TEMPLATE, args.workers)
        _sync()
        seconds = time.perf_counter() - start
        decision = next((line for line in lines.lines if line.startswith(("answering:", "captioning:"))), None)
        result[f"captune_{name}"] = {"questions_per_s": len(questions) / seconds, "seconds": seconds,
                                     "decision": decision}  # fmt: skip
        print(f"captune answer_questions ({name}): {len(questions) / seconds:.1f} questions/s", flush=True)
        lines.lines.clear()
        save()
    same = sum(answers[q.question_id] == a for q, a in zip(usual_questions, usual_answers, strict=True))
    result["agreement_with_usual"] = {"identical_answers": same / len(usual_questions), "dtype": result["dtype"]}
    print(f"identical to the usual loop: {same / len(usual_questions):.1%}", flush=True)
    save()


if __name__ == "__main__":
    main()
