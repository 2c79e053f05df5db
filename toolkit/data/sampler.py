"""A training data order that survives a crash: deterministic in (seed, epoch), sharded over
ranks, and resumable mid-epoch.

``ResumableSampler`` yields ``(epoch, index)`` pairs so that each item's augmentation is drawn
from its own generator seeded with ``(seed, epoch, index)``, independent of workers and restarts.
``ResumableLoader`` is a ``DataLoader`` with ``state_dict``/``load_state_dict``: Lightning's fit
loop saves that state in every checkpoint and restores it before iterating, so a resumed run
skips exactly the batches the interrupted one had trained on.

The number of processes does not change what is trained on: global batch ``k`` of an epoch is
``order[k·B : (k+1)·B]`` (B = per-device batch × world size) whatever the world size, each rank
holding every W-th of its items. So a checkpoint written on W processes resumes exactly on W'
processes with the same global batch: both have consumed k global batches. (torchdata's StatefulDataLoader
does the same, at the cost of a dependency and of snapshotting worker state.)
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


class ResumableSampler(Sampler[tuple[int, int]]):
    """Per-epoch permutation of ``range(n)``, rank ``rank`` takes every ``world_size``-th item
    (the tail that does not fill every rank is dropped, so ranks stay in step).

    Args:
        n: dataset length.
        seed: seed of the order.
        shuffle: permute each epoch (else dataset order).
        rank / world_size: this process's shard.
    """

    def __init__(self, n: int, seed: int = 0, shuffle: bool = True, rank: int = 0, world_size: int = 1) -> None:
        self.n, self.seed, self.shuffle, self.rank, self.world_size = n, seed, shuffle, rank, world_size
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int) -> None:   # called by Lightning before each epoch
        if epoch != self.epoch:
            self.epoch, self.start = epoch, 0

    def __len__(self) -> int:
        return self.n // self.world_size

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order = epoch_permutation(self.n, self.seed, self.epoch, self.shuffle)
        mine = order[self.rank: len(self) * self.world_size: self.world_size]
        start, self.start = self.start, 0   # a resume offset applies to one pass only
        for i in mine[start:]:
            yield self.epoch, i


class ResumableLoader(DataLoader):
    """``DataLoader`` over a ``ResumableSampler`` that records how many batches it has yielded
    in the current epoch (Lightning fetches without prefetch when the length is known, so this is
    the number of batches trained on when a checkpoint is written)."""

    def __init__(self, dataset: Any, sampler: ResumableSampler | None = None, batch_size: int = 1,
                 batch_sampler: Any = None, **kw: Any) -> None:
        """Either ``sampler`` (+ ``batch_size``, full batches) or a resumable ``batch_sampler``
        (``toolkit.data.buckets.BucketBatchSampler``): both have ``epoch``, ``start``, ``seed``."""
        if batch_sampler is not None:
            super().__init__(dataset, batch_sampler=batch_sampler, **kw)
            self._order, self._unit = batch_sampler, 1            # start counts batches
            self._per_device = batch_sampler.batch_size
        else:
            super().__init__(dataset, sampler=sampler, batch_size=batch_size, drop_last=True, **kw)
            self._order, self._unit = sampler, batch_size         # start counts items
            self._per_device = batch_size
        self._yielded, self._epoch = 0, self._order.epoch

    def __iter__(self) -> Iterator[Any]:
        if self._epoch != self._order.epoch:
            self._epoch, self._yielded = self._order.epoch, 0
        self._order.start = self._yielded * self._unit
        for batch in super().__iter__():
            self._yielded += 1
            yield batch
        self._yielded = 0
        self._epoch = self._order.epoch + 1

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self._order.epoch, "batches": self._yielded, "seed": self._order.seed,
                "world_size": self._order.world_size, "batch_size": self._per_device}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue at the saved position, on any number of processes with the same global batch
        per loader step (``data.global_batch_size`` and the accumulation kept)."""
        world, saved_world = self._order.world_size, state.get("world_size", self._order.world_size)
        if saved_world != world:
            saved, now = state.get("batch_size", 0) * saved_world, self._per_device * world
            if saved != now:
                raise ValueError(
                    f"the checkpoint's data position was saved on {saved_world} processes with a per-device batch "
                    f"of {state.get('batch_size', '?')} ({saved} images per loader step); this run has {world} "
                    f"× {self._per_device} = {now}: an exact resume on another number of processes needs the "
                    "same data.global_batch_size and trainer.accumulate_grad_batches")
        self._order.epoch, self._epoch, self._yielded = state["epoch"], state["epoch"], state["batches"]
