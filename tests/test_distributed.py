"""`captune train` in two processes (torch.distributed over gloo on the CPU, as `accelerate launch --cpu` would run
it): the same adapter as one process with the same global batch, files and logs from rank 0 only, validation over
every val image exactly once, resume across ranks, and a clear error when accelerate would run the processes alone;
VQA training and validation the same way, and retrieval's validation recall over every val pair once.

Each run is a subprocess (~10-20 s here). The model is the tiny one with its dropout off, so that the processes'
random streams cannot make the runs differ.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import Blip2ForConditionalGeneration

from captune.model import LoadedModel
from captune.model_dir import save_base
from captune.tiny import build_tiny_processor, tiny_config

STEPS = 4


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny BLIP-2 with its language model's dropout off, saved as a model directory."""
    processor = build_tiny_processor()
    config = tiny_config(processor)
    config.text_config.dropout = 0.0
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("base")
    save_base(path, LoadedModel(Blip2ForConditionalGeneration(config), processor, str(path)))
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _train(
    processes: int, base: Path, data: Path, out: Path, *extra: str, cpu_flag: bool = True
) -> subprocess.CompletedProcess:
    args = [f"model.name={base}", "model.dtype=fp32", "data=synthetic", f"data_dir={data}", f"output_dir={out}",
            f"train.batch_size={8 // processes}", f"max_steps={STEPS}", "lora.dropout=0", "group_by_length=false",
            "warmup_steps=0", "lr=1e-3", "log_every=1", "val_max_images=6", "generate.num_beams=1",
            "generate.min_new_tokens=1", "generate.max_new_tokens=4", *extra]  # fmt: skip
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port",
                     str(_free_port())]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if cpu_flag:
        env["ACCELERATE_USE_CPU"] = "true"
    else:
        env.pop("ACCELERATE_USE_CPU", None)
    return subprocess.run([*launcher, "-m", "captune.cli", "train", *args], env=env, capture_output=True, text=True,
                          timeout=600, check=False)  # fmt: skip


def _adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "final" / "adapter_model.safetensors"))


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and a
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6, msg=key)


@pytest.fixture(scope="module")
def runs(base_dir: Path, synthetic_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("distributed")
    done = {
        "one": _train(1, base_dir, synthetic_dir, root / "one"),
        "two": _train(2, base_dir, synthetic_dir, root / "two", "save_every=2"),
    }
    for name, result in done.items():
        assert result.returncode == 0, f"{name}: {result.stderr[-3000:]}"
    return {"one": root / "one", "two": root / "two", "root": root}


def test_two_processes_train_the_adapter_one_process_trains(runs: dict[str, Path]) -> None:
    _assert_same(_adapter(runs["two"]), _adapter(runs["one"]))
    one = [json.loads(line)["loss"] for line in (runs["one"] / "train_log.jsonl").read_text().splitlines()]
    two = [json.loads(line)["loss"] for line in (runs["two"] / "train_log.jsonl").read_text().splitlines()]
    assert len(two) == STEPS  # rank 0 alone logs: one line a step
    assert two == pytest.approx(one, rel=1e-5)  # each the global batch's loss


def test_two_processes_train_the_t5_adapter_one_process_trains(
    synthetic_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    # Flan-T5 BLIP-2s take the language model's mean loss; scaled by the token counts it is the global batch's too.
    processor = build_tiny_processor(t5=True)
    config = tiny_config(processor, t5=True)
    config.text_config.dropout_rate = 0.0
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("t5")
    save_base(root / "base", LoadedModel(Blip2ForConditionalGeneration(config), processor, str(root / "base")))
    runs = {n: _train(n, root / "base", synthetic_dir, root / str(n), "train.validate=false") for n in (1, 2)}
    for n, result in runs.items():
        assert result.returncode == 0, f"{n}: {result.stderr[-3000:]}"
    _assert_same(_adapter(root / "2"), _adapter(root / "1"))
    losses = [[json.loads(line)["loss"] for line in (root / str(n) / "train_log.jsonl").read_text().splitlines()]
              for n in (1, 2)]  # fmt: skip
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)


def test_validation_sees_every_val_image_exactly_once(runs: dict[str, Path]) -> None:
    one = json.loads((runs["one"] / "val" / f"step-{STEPS:06d}.json").read_text())["predictions"]
    two = json.loads((runs["two"] / "val" / f"step-{STEPS:06d}.json").read_text())["predictions"]
    assert sorted(two) == sorted(one) and len(two) == 6
    results = json.loads((runs["two"] / "results.json").read_text())
    assert results["total_steps"] == STEPS and len(results["history"]) == 1


def test_resume_across_ranks_gives_the_uninterrupted_adapter(
    runs: dict[str, Path], base_dir: Path, synthetic_dir: Path
) -> None:
    checkpoint = runs["two"] / "checkpoints" / "step-000002"
    assert sorted(p.name for p in checkpoint.glob("rng-*.pt")) == ["rng-0.pt", "rng-1.pt"]
    resumed = runs["root"] / "resumed"
    result = _train(2, base_dir, synthetic_dir, resumed, "save_every=2", f"train.resume_from={checkpoint}")
    assert result.returncode == 0, result.stderr[-3000:]
    _assert_same(_adapter(resumed), _adapter(runs["two"]))


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "train_log.jsonl").read_text().splitlines()]


def test_two_processes_train_the_vqa_adapter_one_process_trains_and_answer_every_val_question_once(
    base_dir: Path, synthetic_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    # VQA rows are (image, question, answer): the global batch's loss is its answer tokens' mean over both processes,
    # and validation answers each process's share of the val questions, gathered once on rank 0.
    root = tmp_path_factory.mktemp("vqa")
    runs = {n: _train(n, base_dir, synthetic_dir, root / str(n), "data.task=vqa") for n in (1, 2)}
    for n, result in runs.items():
        assert result.returncode == 0, f"{n}: {result.stderr[-3000:]}"
    _assert_same(_adapter(root / "2"), _adapter(root / "1"))
    assert len(_losses(root / "2")) == STEPS and _losses(root / "2") == pytest.approx(_losses(root / "1"), rel=1e-5)
    questions = json.loads((root / "2" / "val" / "questions.json").read_text())
    val = [json.loads((root / str(n) / "val" / f"step-{STEPS:06d}.json").read_text()) for n in (1, 2)]
    assert sorted(val[1]["predictions"]) == sorted(val[0]["predictions"]) == sorted(questions)
    assert len(questions) > 6  # several questions of each of the 6 val images, split over the two processes
    assert val[1]["predictions"] == val[0]["predictions"]  # the same adapter answers alike
    assert val[1]["metrics"] == pytest.approx(val[0]["metrics"])


def test_two_processes_train_retrieval_and_score_recall_over_every_val_pair_once(
    synthetic_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    # The contrastive loss's global-batch negatives are checked against one process in tests/test_retrieval.py; the
    # matching loss samples each process's hard negatives from its own share (as documented), so the two runs'
    # losses differ. Validation ranks every val image and caption once on rank 0: its recall is what one process
    # evaluating the saved model over the whole val split computes.
    from captune.data import read
    from captune.retrieval import evaluate_retrieval, load_retrieval

    out = tmp_path_factory.mktemp("retrieval") / "two"
    result = _train(2, Path("unused"), synthetic_dir, out, "data.task=retrieval", "model.name=tiny-retrieval",
                    "train.mode=qformer", "train.val_k_test=3")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(_losses(out)) == STEPS
    validated = json.loads((out / "val" / f"step-{STEPS:06d}.json").read_text())["metrics"]
    records = read("synthetic", synthetic_dir).split("val")[:6]
    alone = evaluate_retrieval(load_retrieval(str(out / "final")), records, k_test=3).metrics()
    assert validated == pytest.approx(alone, rel=1e-5) and "itc_txt_r1" in validated


def test_processes_that_accelerate_would_run_alone_are_refused(
    base_dir: Path, synthetic_dir: Path, tmp_path: Path
) -> None:
    result = _train(2, base_dir, synthetic_dir, tmp_path / "alone", cpu_flag=False)
    if torch.cuda.is_available():
        pytest.skip("with GPUs accelerate sees the processes")
    assert result.returncode != 0
    assert "launched as 2 processes, but accelerate runs 1" in result.stderr


@pytest.mark.parametrize(("name", "kind"), [("single_gpu", "NO"), ("ddp", "MULTI_GPU"), ("fsdp", "FSDP")])
def test_shipped_accelerate_configs_load_and_open_with_their_command(name: str, kind: str) -> None:
    from accelerate.commands.config.config_args import load_config_from_file

    path = Path(__file__).parents[1] / "configs" / "accelerate" / f"{name}.yaml"
    config = load_config_from_file(str(path))
    assert config.distributed_type.value == kind and config.mixed_precision == "no"
    first = path.read_text().splitlines()[0]
    assert first.startswith(f"# accelerate launch --config_file configs/accelerate/{name}.yaml -m captune.cli train")
