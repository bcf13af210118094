"""Batches with a fixed share of replay: every batch the sampler yields holds exactly `per_batch`
examples from a replay pool and `batch_size - per_batch` task examples.

`data.replay` shuffles its general text into the task set, so a batch of 8 at ratio 0.2 holds 0 to
8 replay examples (binomial, mean 1.6); a replay that stands in for a penalty on every step
(`regularizers.base_replay`) needs its share in every batch, as a penalty term is. The training
set is task examples first (indices 0 .. n_task - 1), then the pool (n_task .. n_task + pool - 1).

Under data parallelism accelerate hands rank r the batches r, r + W, r + 2W, ... of this sampler
(`BatchSamplerShard`, per-device batch size), so every rank's batches hold `per_batch` replay
examples each, and since the pool is read as one stream cut into batches, the ranks' shares of a
pass over it are disjoint and together cover it.
"""

from __future__ import annotations

import math
import random
from typing import Iterator

from torch.utils.data import Sampler


def replay_per_batch(ratio: float, batch_size: int) -> int:
    """round(ratio * batch_size): 0.25 of 8 is 2, 0.2 of 8 is 1.6, so 2 (an effective 0.25)."""
    return round(ratio * batch_size)


class MixedBatchSampler(Sampler[int]):
    """Indices for a DataLoader of batch size `batch_size`, `per_batch` of each batch from the pool.

    Per epoch: the task examples in a fresh seeded order, cut into ceil(n_task / (batch_size -
    per_batch)) batches, the last one filled up from the start of that order, so every batch is
    full and every task example is seen once an epoch (a few twice). The pool is one endless
    stream, pass p a seeded permutation of it, and epoch e reads on where epoch e - 1 stopped:
    a pool larger than one epoch's replay is still all seen over the run.
    """

    def __init__(self, n_task: int, pool: int, batch_size: int, per_batch: int, seed: int = 0):
        if not 0 < per_batch < batch_size:
            raise ValueError(f"per_batch {per_batch} must be between 1 and batch_size - 1 = {batch_size - 1}")
        if n_task < 1 or pool < 1:
            raise ValueError(f"need task examples and a pool (n_task {n_task}, pool {pool})")
        self.n_task, self.pool, self.batch_size, self.per_batch = n_task, pool, batch_size, per_batch
        self.seed, self.epoch = seed, 0
        self.n_batches = math.ceil(n_task / (batch_size - per_batch))

    def set_epoch(self, epoch: int) -> None:
        """Called by the Trainer (through accelerate's loader) at the start of every epoch."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n_batches * self.batch_size

    def _replay(self, start: int, count: int) -> list[int]:
        """Pool positions start .. start + count - 1 of the stream, as training-set indices."""
        out, orders = [], {}
        for position in range(start, start + count):
            p = position // self.pool
            if p not in orders:  # str seeds hash with sha512: the same order in every process
                orders[p] = random.Random(f"{self.seed}:replay:{p}").sample(range(self.pool), self.pool)
            out.append(self.n_task + orders[p][position % self.pool])
        return out

    def batches(self) -> list[list[int]]:
        """This epoch's batches, each task indices then replay indices."""
        task_size = self.batch_size - self.per_batch
        order = random.Random(f"{self.seed}:task:{self.epoch}").sample(range(self.n_task), self.n_task)
        need = self.n_batches * task_size
        task = (order * math.ceil(need / self.n_task))[:need]
        replay = self._replay(self.epoch * self.n_batches * self.per_batch, self.n_batches * self.per_batch)
        return [task[b * task_size:(b + 1) * task_size] + replay[b * self.per_batch:(b + 1) * self.per_batch]
                for b in range(self.n_batches)]

    def __iter__(self) -> Iterator[int]:
        for batch in self.batches():
            yield from batch
