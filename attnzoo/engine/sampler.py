"""Data order and augmentation randomness as functions of (seed, epoch, index), so a resumed run sees exactly
what an uninterrupted one would have."""
from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from ..common import InputError, UnreadableSample

__all__ = ["EpochSampler", "SeededLoader", "SeededSamples", "collate_with_unreadable", "seeded"]


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
    same sample gets the same augmentation whatever the process, worker or resumption point.

    Each item is ``(sample, unreadable)``. A sample whose file cannot be read (the dataset raises
    :class:`~attnzoo.common.UnreadableSample`) is replaced by another index drawn from its seed, so a resumed run
    replaces it with the same one; ``unreadable`` lists the ``(path, reason)`` of each sample replaced
    (:func:`collate_with_unreadable` gathers them per batch).
    """

    max_replacements = 10  # then the data is mostly unreadable: an InputError

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        index, seed = key
        unreadable: list[tuple[str, str]] = []
        tried = {index}
        while len(unreadable) <= self.max_replacements:
            try:
                with seeded(seed):
                    return self.dataset[index], unreadable
            except UnreadableSample as e:
                unreadable.append((e.path, e.reason))
            while index in tried and len(tried) < len(self.dataset):  # another index, drawn from the seed
                seed = int(np.random.SeedSequence([seed, len(unreadable)]).generate_state(1)[0])
                index = seed % len(self.dataset)
            tried.add(index)
        raise InputError(f"{len(unreadable)} unreadable samples in a row, e.g. {unreadable[0][0]} "
                         f"({unreadable[0][1]}): is the data folder damaged?")


def collate_with_unreadable(items: list[tuple[object, list]], collate: Callable = default_collate):
    """The loader's collate for :class:`SeededSamples`: ``(collate(samples), unreadable of the batch)``."""
    return collate([sample for sample, _ in items]), [u for _, bad in items for u in bad]


class SeededLoader(DataLoader):
    """A ``DataLoader`` over :class:`SeededSamples` with :func:`collate_with_unreadable`: it yields the batches
    alone and appends the ``(path, reason)`` of each replaced sample to :attr:`unreadable`."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.unreadable: list[tuple[str, str]] = []

    def __iter__(self):
        for batch, unreadable in super().__iter__():
            self.unreadable.extend(unreadable)
            yield batch
