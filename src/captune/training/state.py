"""What a run carries from step to step: the loop state a checkpoint saves, the throughput count, the `Run` that
`setup` builds and every later stage reads, and the watch for a loss or gradient that stops being finite."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader

from captune.config import Config
from captune.data import Record
from captune.data.vqa import Question
from captune.errors import TrainingDiverged
from captune.model import LoadedModel
from captune.training.sampling import EpochShuffle


@dataclass
class TrainState:
    """What a checkpoint needs besides weights and optimizer to continue exactly."""

    global_step: int = 0
    epoch: int = 0
    best_cider: float | None = None
    """The best val score: CIDEr, or with `task: vqa` VQA accuracy in percent (results.json: `best_vqa_accuracy`),
    with `task: retrieval` the mean recall `r_mean` in percent (`best_r_mean`)."""
    best_step: int | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    train_samples: int = 0
    """Samples trained on over every segment of the run (a resumed run continues the count)."""


@dataclass
class Throughput:
    """Samples per second of training alone: time spent validating and checkpointing is left out."""

    samples: int = 0
    seconds: float = 0.0
    window_samples: int = 0
    window_seconds: float = 0.0
    window_wait: float = 0.0
    """Of window_seconds, the time the loop waited for the loader (a data-starved GPU shows here)."""
    since: float = field(default_factory=time.perf_counter)
    epochs: list[float] = field(default_factory=list)
    """Samples per second of each finished epoch (the first pays for start-up: compare later ones)."""
    _epoch_start: tuple[int, float] = (0, 0.0)

    def add(self, samples: int) -> None:
        """Counts a batch and the time since the previous one."""
        now = time.perf_counter()
        elapsed, self.since = now - self.since, now
        self.samples, self.seconds = self.samples + samples, self.seconds + elapsed
        self.window_samples, self.window_seconds = self.window_samples + samples, self.window_seconds + elapsed

    def fetched(self) -> None:
        """Marks a batch's arrival: the time since the previous batch was queued was spent waiting for the loader."""
        self.window_wait += time.perf_counter() - self.since

    def window_rate(self) -> float:
        return self.window_samples / max(self.window_seconds, 1e-9)

    def window_wait_fraction(self) -> float:
        return min(1.0, self.window_wait / max(self.window_seconds, 1e-9))

    def new_window(self) -> None:
        self.window_samples, self.window_seconds, self.window_wait = 0, 0.0, 0.0

    def skip(self) -> None:
        """Leaves the time since the last batch (a validation, a checkpoint) out of the count."""
        self.since = time.perf_counter()

    def end_epoch(self) -> None:
        samples, seconds = self.samples - self._epoch_start[0], self.seconds - self._epoch_start[1]
        self.epochs.append(samples / max(seconds, 1e-9))
        self._epoch_start = (self.samples, self.seconds)


@dataclass
class Run:
    """Everything the loop touches, built by `setup`."""

    config: Config
    accelerator: Accelerator
    loaded: LoadedModel
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    loader: DataLoader
    sampler: EpochShuffle
    step: nn.Module
    """The training forward (`CaptionLoss` around the model), as accelerate prepared it."""
    features: torch.Tensor | None
    """Cached image features of the train images (row = image index), or None for the full path."""
    val_records: list[Record]
    output_dir: Path
    base_dir: Path | None
    steps_per_epoch: int
    total_steps: int
    feature_pass_seconds: float = 0.0
    val_questions: list[Question] = field(default_factory=list)
    """With `task: vqa`, the val questions validation answers (`val_records` is then empty)."""
    state: TrainState = field(default_factory=TrainState)
    first_nonfinite: torch.Tensor | None = None
    """On the device: the first optimizer step whose loss or gradient norm was NaN or inf, else `NO_STEP`."""


NO_STEP = 2**62


def results(state: TrainState, task: str = "caption") -> dict[str, Any]:
    """The validation record for results.json and checkpoints; the best score named by what it is."""
    best = {"vqa": "best_vqa_accuracy", "retrieval": "best_r_mean"}.get(task, "best_cider")
    return {best: state.best_cider, "best_step": state.best_step, "history": state.history}


def mark_nonfinite(run: Run, loss: torch.Tensor, grad_norm: torch.Tensor | None, step: int) -> None:
    """Records on the device the first step whose loss or gradient norm is NaN or inf, without waiting for the GPU
    (`stop_if_diverged` reads it). Under fp16's loss scaling an infinite gradient only makes the scaler skip the step
    and lower its scale, so there only the loss counts."""
    finite = torch.isfinite(loss.detach())
    if grad_norm is not None and run.accelerator.scaler is None:
        finite = finite & torch.isfinite(grad_norm)
    assert run.first_nonfinite is not None
    run.first_nonfinite = torch.where(finite, run.first_nonfinite, run.first_nonfinite.clamp(max=step))


def stop_if_diverged(run: Run) -> None:
    """Stops the run at the first non-finite step any process saw (this waits for the GPU: called at logging steps,
    epoch ends and before every save only).

    Raises:
        TrainingDiverged: naming the step, the last good checkpoint and what to try.
    """
    if run.first_nonfinite is None:
        return
    step = int(run.accelerator.gather(run.first_nonfinite[None]).min().item())
    if step == NO_STEP:
        return
    config = run.config
    found = sorted(p for p in (run.output_dir / "checkpoints").glob("step-*") if p.is_dir())
    kept = (f"the last good checkpoint is {found[-1]} (continue with train.resume_from=latest and the changes below)"
            if found else "no checkpoint was saved before it")  # fmt: skip
    raise TrainingDiverged(
        f"training stopped: the loss or gradients became NaN or infinite at step {step} (model.dtype="
        f"{config.model.dtype}, train.lr={config.train.lr}, train.max_grad_norm={config.train.max_grad_norm}); "
        f"{kept}. Try model.dtype=bf16 or fp32 (fp16 overflow is the commonest cause), a lower train.lr, or "
        "train.max_grad_norm=1.0"
    )
