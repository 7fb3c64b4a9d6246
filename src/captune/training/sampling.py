"""The samplers that order a training epoch: a permutation seeded by (seed, epoch), and batches grouped by caption
length."""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Sampler


class EpochShuffle(Sampler[int]):
    """A permutation seeded by (seed, epoch): the order of an epoch never depends on the global RNG, so a resumed run
    sees the same batches as an uninterrupted one."""

    def __init__(self, size: int, seed: int):
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def _generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)

    def __iter__(self) -> Iterator[int]:
        return iter(torch.randperm(self.size, generator=self._generator()).tolist())


class LengthGroupedShuffle(EpochShuffle):
    """EpochShuffle, then within each group of batches the samples sorted by length and cut into batches, and the
    batches shuffled: batches hold captions of similar length (little padding) and still come in random order.

    A group is 50 batches, or fewer on small sets so that an epoch has at least 4 groups (as transformers'
    LengthGroupedSampler does). Grouping makes a batch's captions less varied: on a few templated captions (the
    demo) that slows learning, so the demo config turns it off.

    With several processes (`processes`), batches move in runs of that many neighbours of one sorted group: accelerate
    gives one step's consecutive batches to the processes, so they hold captions of similar length and none waits at
    the gradient all-reduce for another's longer batch."""

    GROUP_BATCHES = 50

    def __init__(self, lengths: np.ndarray, batch_size: int, seed: int, processes: int = 1):
        super().__init__(len(lengths), seed)
        self.lengths, self.batch_size, self.processes = lengths, batch_size, processes

    def __iter__(self) -> Iterator[int]:
        generator = self._generator()
        order = torch.randperm(self.size, generator=generator).numpy()
        per_group = max(1, min(self.GROUP_BATCHES, self.size // (self.batch_size * 4)))
        group = self.batch_size * math.ceil(per_group / self.processes) * self.processes
        runs, rest = [], []
        for start in range(0, self.size, group):
            members = order[start : start + group]
            members = members[np.argsort(-self.lengths[members], kind="stable")]
            batches = [members[i : i + self.batch_size] for i in range(0, len(members), self.batch_size)]
            full = [b for b in batches if len(b) == self.batch_size]
            cut = len(full) - len(full) % self.processes
            runs += [full[i : i + self.processes] for i in range(0, cut, self.processes)]
            rest += full[cut:] + [b for b in batches if len(b) < self.batch_size]
        # Runs of full batches in random order; what is left (at most the last group's) comes last, short batch last.
        shuffled = [batch for i in torch.randperm(len(runs), generator=generator).tolist() for batch in runs[i]]
        rest.sort(key=len, reverse=True)
        return iter(np.concatenate(shuffled + rest).tolist() if shuffled or rest else [])
