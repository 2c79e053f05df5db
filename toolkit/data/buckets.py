"""Aspect-ratio buckets: images train at their own shape, batches drawn from one bucket.

Bucket sizes have about ``resolution²`` pixels, sides multiples of ``step`` (a multiple of the
VAE factor), aspect ratios up to ``max_aspect``. An image goes to the bucket nearest its aspect
ratio (in log space) and is resized to cover it, then cropped. The batch order is a pure
function of (seed, epoch) and independent of the number of processes: the batches are cut at the
global size (per-device batch × world size) and each rank takes its share of every batch, so 1
process and W processes with the same global batch train on the same images in the same steps,
and a run resumes exactly on another number of processes (``ResumableLoader``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler


def make_buckets(resolution: int, step: int = 64, max_aspect: float = 2.0) -> list[tuple[int, int]]:
    """(width, height) pairs with ~resolution² pixels, sides multiples of ``step``."""
    area, out = resolution * resolution, set()
    w = step
    while w <= resolution * max_aspect:
        h = max(step, int(area / w) // step * step)
        if 1 / max_aspect <= w / h <= max_aspect:
            out.add((w, h))
        w += step
    out.add((resolution // step * step,) * 2)
    return sorted(out, key=lambda s: s[0] / s[1])


def nearest_bucket(width: int, height: int, buckets: Sequence[tuple[int, int]]) -> int:
    ratio = math.log(width / height)
    return min(range(len(buckets)), key=lambda b: abs(math.log(buckets[b][0] / buckets[b][1]) - ratio))


class BucketBatchSampler(Sampler[list[tuple[int, int]]]):
    """Batches of ``(epoch, index)`` from one bucket each.

    Every epoch: each bucket's items are shuffled and cut into global batches of ``batch_size ×
    world_size`` (the last one of a bucket may be smaller), the batches of all buckets are
    shuffled together, and rank ``r`` takes items ``r, r + W, ...`` of each. The list does not
    depend on W; on W > 1 processes a bucket's last batch with fewer than W items (at most one per
    bucket per epoch) sits out, as every rank needs an item.
    """

    def __init__(self, bucket_of: Sequence[int], batch_size: int, seed: int = 0, shuffle: bool = True,
                 rank: int = 0, world_size: int = 1) -> None:
        self.bucket_of, self.batch_size, self.seed, self.shuffle = list(bucket_of), batch_size, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.start = epoch, 0

    def batches(self, epoch: int) -> list[list[int]]:
        """The epoch's global batches (what one process with the whole batch would train on)."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        groups: dict[int, list[int]] = {}
        for i, b in enumerate(self.bucket_of):
            groups.setdefault(b, []).append(i)
        out, size = [], self.batch_size * self.world_size
        for b in sorted(groups):
            items = groups[b]
            if self.shuffle:
                items = [items[j] for j in torch.randperm(len(items), generator=g).tolist()]
            out += [items[k: k + size] for k in range(0, len(items), size)]
        if self.shuffle:
            out = [out[j] for j in torch.randperm(len(out), generator=g).tolist()]
        return [b for b in out if len(b) >= self.world_size]

    def __len__(self) -> int:
        return len(self.batches(self.epoch))

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        mine = [b[self.rank:: self.world_size] for b in self.batches(self.epoch)]
        start, self.start = self.start, 0
        for batch in mine[start:]:
            yield [(self.epoch, i) for i in batch]
