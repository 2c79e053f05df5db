"""A training data order that survives a crash and a change of the number of processes:
deterministic in (seed, epoch), cut into the same micro-batches whatever the number of processes,
and resumable mid-epoch.

An epoch is a list of global steps (what one optimizer step trains on). Each step is cut into
P = W·A equal micro-batches (W processes, A accumulated micro-batches per process and step);
micro-batch q of a step goes to rank q mod W as its accumulation slot q // W. So 2 processes ×
micro-batch b and 1 process × micro-batch b with accumulation 2 compute the same micro-batches in
the same steps, and (with the per-sample draws of ``toolkit.reproducibility``) the same update:
DDP's average of the two ranks' gradients and accumulation's sum of the two halves are the same
sum of the same two terms. The samplers yield ``(epoch, index)`` pairs so that each item's
augmentation and draws come from generators seeded with its own (seed, epoch, index).

``ResumableLoader`` is a ``DataLoader`` with ``state_dict``/``load_state_dict``: Lightning's fit
loop saves that state in every checkpoint and restores it before iterating, so a resumed run
skips exactly the micro-batches the interrupted one had trained on — on the same number of
processes or on another one with the same P and micro-batch. (torchdata's StatefulDataLoader
snapshots worker state instead, and knows nothing of steps across processes.)
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler


def epoch_permutation(n: int, seed: int, epoch: int, shuffle: bool) -> list[int]:
    if not shuffle:
        return list(range(n))
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


class MicroBatchSampler(Sampler[list[tuple[int, int]]]):
    """This process's micro-batches of each epoch's global steps (``steps``, defined by a subclass).

    Args:
        micro_batch: items per micro-batch (the per-process batch).
        seed: seed of the order.
        shuffle: a new order each epoch (else the dataset's).
        rank / world_size: this process and the number of processes (W).
        accumulation: micro-batches each process accumulates per optimizer step (A).
    """

    def __init__(self, micro_batch: int, seed: int = 0, shuffle: bool = True, rank: int = 0, world_size: int = 1,
                 accumulation: int = 1) -> None:
        self.micro_batch, self.seed, self.shuffle = micro_batch, seed, shuffle
        self.rank, self.world_size, self.accumulation = rank, world_size, accumulation
        self.epoch, self.start = 0, 0

    @property
    def per_step(self) -> int:
        """Micro-batches per optimizer step over all processes (P = W·A)."""
        return self.world_size * self.accumulation

    def steps(self, epoch: int) -> list[list[int]]:
        """The epoch's global steps, each a list of item indices whose length is a multiple of P."""
        raise NotImplementedError

    def micro_batches(self, epoch: int) -> list[list[int]]:
        """Every process's micro-batches of the epoch, in order: P per step."""
        out = []
        for step in self.steps(epoch):
            m = len(step) // self.per_step
            out += [step[q * m: (q + 1) * m] for q in range(self.per_step)]
        return out

    def set_epoch(self, epoch: int) -> None:   # called by Lightning before each epoch
        if epoch != self.epoch:
            self.epoch, self.start = epoch, 0

    def __len__(self) -> int:
        return len(self.micro_batches(self.epoch)) // self.world_size

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        mine = self.micro_batches(self.epoch)[self.rank:: self.world_size]
        start, self.start = self.start, 0   # a resume offset applies to one pass only
        for batch in mine[start:]:
            yield [(self.epoch, i) for i in batch]


class ResumableSampler(MicroBatchSampler):
    """A per-epoch permutation of ``range(n)`` cut into global steps of ``micro_batch × P`` items;
    the tail that does not fill a step is left out of that epoch (every step weighs its items alike).

    Args:
        n: dataset length; the others as ``MicroBatchSampler``.
    """

    def __init__(self, n: int, micro_batch: int, seed: int = 0, shuffle: bool = True, rank: int = 0,
                 world_size: int = 1, accumulation: int = 1) -> None:
        super().__init__(micro_batch, seed, shuffle, rank, world_size, accumulation)
        self.n = n

    def steps(self, epoch: int) -> list[list[int]]:
        order, size = epoch_permutation(self.n, self.seed, epoch, self.shuffle), self.micro_batch * self.per_step
        return [order[k: k + size] for k in range(0, self.n - self.n % size, size)]


class ShardBatches(Sampler[list[tuple[int, int]]]):
    """Validation micro-batches: ``range(n)`` cut into micro-batches of ``micro_batch`` (the last may be
    smaller), rank ``r`` taking every W-th; ``(0, index)`` pairs. The same micro-batches on any number of
    processes, so a per-image figure summed over them is the same sum."""

    def __init__(self, n: int, micro_batch: int, rank: int = 0, world_size: int = 1) -> None:
        self.n, self.micro_batch, self.rank, self.world_size = n, micro_batch, rank, world_size

    def __len__(self) -> int:
        return len(range(self.rank, -(-self.n // self.micro_batch), self.world_size))

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for j in range(self.rank, -(-self.n // self.micro_batch), self.world_size):
            yield [(0, i) for i in range(j * self.micro_batch, min((j + 1) * self.micro_batch, self.n))]


class ResumableLoader(DataLoader):
    """``DataLoader`` over a ``MicroBatchSampler`` that records how many micro-batches it has yielded
    in the current epoch (Lightning fetches without prefetch when the length is known, so this is
    the number trained on when a checkpoint is written)."""

    def __init__(self, dataset: Any, batch_sampler: MicroBatchSampler, **kw: Any) -> None:
        super().__init__(dataset, batch_sampler=batch_sampler, **kw)
        self._order = batch_sampler
        self._yielded, self._epoch = 0, self._order.epoch

    def __iter__(self) -> Iterator[Any]:
        if self._epoch != self._order.epoch:
            self._epoch, self._yielded = self._order.epoch, 0
        self._order.start = self._yielded
        for batch in super().__iter__():
            self._yielded += 1
            yield batch
        self._yielded = 0
        self._epoch = self._order.epoch + 1

    def state_dict(self) -> dict[str, int]:
        o = self._order
        return {"epoch": o.epoch, "batches": self._yielded, "seed": o.seed, "world_size": o.world_size,
                "batch_size": o.micro_batch, "accumulation": o.accumulation}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue at the saved position, on any number of processes with the same micro-batch and
        micro-batches per step (P): the micro-batches trained so far are the same whatever W."""
        o = self._order
        saved_world = state.get("world_size", o.world_size)
        saved_per_step = saved_world * state.get("accumulation", o.accumulation)
        if state.get("batch_size", o.micro_batch) != o.micro_batch or saved_per_step != o.per_step:
            raise ValueError(
                f"the checkpoint's data position was saved with micro-batches of {state.get('batch_size')} images, "
                f"{saved_per_step} per optimizer step ({saved_world} processes × accumulation "
                f"{state.get('accumulation', '?')}); this run has {o.micro_batch} images, {o.per_step} per step "
                f"({o.world_size} × {o.accumulation}): an exact resume needs the same data.global_batch_size and "
                "trainer.devices × trainer.num_nodes × trainer.accumulate_grad_batches")
        done = state["batches"] * saved_world   # micro-batches of the epoch trained, all processes together
        if done % o.world_size:
            raise ValueError(f"the checkpoint was written after {done} micro-batches of its epoch, which "
                             f"{o.world_size} processes cannot share: it is not at an optimizer step")
        o.epoch, self._epoch, self._yielded = state["epoch"], state["epoch"], done // o.world_size
