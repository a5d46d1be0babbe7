"""Data order and augmentation randomness as functions of (seed, epoch, index), so a resumed run sees exactly
what an uninterrupted one would have."""
from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

__all__ = ["EpochSampler", "SeededSamples", "seeded"]


class EpochSampler(Sampler):
    """The order of one epoch, a function of (seed, epoch) only, sharded across processes and resumable.

    Process ``rank`` of ``world`` takes every world-th index of the epoch's permutation, so one process with
    batch ``world * b`` sees, batch for batch, the union of what ``world`` processes with batch ``b`` see.
    Each index comes with the seed its augmentation draws from (see :class:`SeededSamples`).
    """

    def __init__(self, size: int, batch_size: int, rank: int, world: int, seed: int, train: bool):
        self.size, self.batch_size, self.rank, self.world = size, batch_size, rank, world
        self.seed, self.train = seed, train
        self.epoch = self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def batches_per_epoch(self) -> int:
        if self.train:  # drop the last partial batch, evenly on every process
            return self.size // (self.world * self.batch_size)
        return math.ceil(len(range(self.rank, self.size, self.world)) / self.batch_size)

    def _indices(self) -> list[int]:
        if not self.train:
            return list(range(self.rank, self.size, self.world))
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed * 100003 + self.epoch))
        return order[: self.batches_per_epoch() * self.world * self.batch_size][self.rank :: self.world].tolist()

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for index in self._indices()[self.start_batch * self.batch_size :]:
            yield index, int(np.random.SeedSequence([self.seed, self.epoch, index]).generate_state(1)[0])

    def __len__(self) -> int:
        return len(self._indices()) - self.start_batch * self.batch_size


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed python, numpy and torch's CPU generator inside the block, and put their states back after it."""
    states = random.getstate(), np.random.get_state(), torch.random.default_generator.get_state()
    random.seed(seed)
    np.random.seed(seed)
    torch.random.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.random.default_generator.set_state(states[2])


class SeededSamples(Dataset):
    """Loads ``(index, seed)`` from :class:`EpochSampler` with the random transforms drawing from ``seed``: the
    same sample gets the same augmentation whatever the process, worker or resumption point."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        index, seed = key
        with seeded(seed):
            return self.dataset[index]
