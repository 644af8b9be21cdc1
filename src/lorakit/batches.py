"""Which examples each optimizer step sees: a seeded order that can resume at any step and be split across ranks.

:class:`BatchOrder` yields the same batches, in the same order, as
``DataLoader(data, batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed))`` iterated once per
epoch (a test holds it to that), but makes the position explicit: ``state_dict()`` is the generator's state at
the start of the current epoch plus the number of batches already taken, so a stopped run continues with exactly
the batches it would have seen.

With ``world_size`` processes, every *global* batch is cut into ``world_size`` contiguous slices and rank ``r``
takes slice ``r``; the global batch size and the data order stay the single-process run's. A mean loss on a slice
is weighted by ``world_size * len(slice) / len(global batch)`` (:attr:`Batch.weight`), so that averaging the
gradients over ranks (what DDP and FSDP do) gives the gradient of the global batch's mean loss, also for a last
batch that the world size does not divide.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class Batch:
    indices: list[int]
    """This rank's examples (indices into the data set)."""
    weight: float
    """Factor on this rank's mean loss (1.0 in one process; 0.0 for a rank whose slice is empty)."""
    global_size: int
    """Examples in the whole (global) batch."""


class BatchOrder:
    """The batches of a seeded, resumable, rank-sliced pass over ``num_examples`` examples."""

    def __init__(self, num_examples: int, batch_size: int, seed: int, shuffle: bool = True,
                 rank: int = 0, world_size: int = 1) -> None:
        if num_examples < 1:
            raise ValueError("nothing to train on: the data set is empty")
        if batch_size % world_size:
            raise ValueError(f"the global batch size {batch_size} is not divisible by the world size {world_size}; "
                             f"choose a batch size that is a multiple of {world_size}, or a number of processes "
                             f"that divides {batch_size}")
        self.num_examples, self.batch_size, self.shuffle = num_examples, batch_size, shuffle
        self.rank, self.world_size = rank, world_size
        self.generator = torch.Generator().manual_seed(seed)
        self.epoch, self.position = 0, 0  # position: batches of the current epoch already taken
        self._epoch_state = self.generator.get_state()
        self._order: torch.Tensor | None = None

    @property
    def batches_per_epoch(self) -> int:
        return math.ceil(self.num_examples / self.batch_size)

    def _start_epoch(self) -> None:
        self._epoch_state = self.generator.get_state()
        # A DataLoader draws its workers' base seed from its generator first, then the sampler permutes.
        torch.empty((), dtype=torch.int64).random_(generator=self.generator)
        self._order = (torch.randperm(self.num_examples, generator=self.generator) if self.shuffle
                       else torch.arange(self.num_examples))

    def next_batch(self) -> Batch:
        """This rank's part of the next global batch; epochs roll over by themselves."""
        if self._order is None:
            self._start_epoch()
        start = self.position * self.batch_size
        global_batch = self._order[start:start + self.batch_size].tolist()
        self.position += 1
        if self.position == self.batches_per_epoch:
            if self.shuffle:  # RandomSampler's trailing (empty) permutation at the end of every epoch
                torch.randperm(self.num_examples, generator=self.generator)
            self.epoch, self.position, self._order = self.epoch + 1, 0, None
            self._epoch_state = self.generator.get_state()  # a state saved now must start the next epoch
        return self._slice(global_batch)

    def _slice(self, global_batch: list[int]) -> Batch:
        size, world = len(global_batch), self.world_size
        if world == 1:
            return Batch(global_batch, 1.0, size)
        bounds = [r * size // world for r in range(world + 1)]  # contiguous, sizes differ by at most one
        mine = global_batch[bounds[self.rank]:bounds[self.rank + 1]]
        if not mine:  # every rank must run forward and backward; this one contributes nothing
            return Batch(global_batch[:1], 0.0, size)
        return Batch(mine, world * len(mine) / size, size)

    def state_dict(self) -> dict:
        return {"epoch_generator_state": self._epoch_state.clone(), "epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["epoch_generator_state"])
        self.epoch, self.position, self._order = int(state["epoch"]), int(state["position"]), None
        if self.position:
            self._start_epoch()
