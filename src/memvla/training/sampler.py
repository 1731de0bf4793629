"""A deterministic batch sampler indexed by optimisation step, so that a resumed run reads
exactly the batches the uninterrupted run would have read, and each of several processes
reads its own share of every global batch."""

from __future__ import annotations

from collections.abc import Iterator

import torch


class StepBatchSampler(torch.utils.data.Sampler):
    """Yields, for steps ``start .. steps-1``, this rank's indices of the global batch.

    Epoch e is a permutation of the dataset drawn from a generator seeded with seed + e;
    the global batch of step s is the slice [s·G, (s+1)·G) of the concatenated epochs
    (G = batch_size · world); rank r takes every world-th element of it.
    """

    def __init__(self, n: int, batch_size: int, steps: int, seed: int, start: int = 0,
                 rank: int = 0, world: int = 1):
        if n <= 0:
            raise ValueError("the dataset has no frames to sample")
        self.n, self.batch_size, self.steps, self.seed = n, batch_size, steps, seed
        self.start, self.rank, self.world = start, rank, world
        self._perm_epoch, self._perm = -1, None

    def _epoch(self, e: int) -> torch.Tensor:
        if e != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed + e)
            self._perm, self._perm_epoch = torch.randperm(self.n, generator=g), e
        return self._perm

    def batch(self, step: int) -> list[int]:
        g = self.batch_size * self.world
        flat = range(step * g, (step + 1) * g)
        idx = [int(self._epoch(i // self.n)[i % self.n]) for i in flat]
        return idx[self.rank :: self.world]

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start, self.steps):
            yield self.batch(step)

    def __len__(self) -> int:
        return self.steps - self.start
