"""Aspect-ratio buckets: images train at their own shape, batches drawn from one bucket.

Bucket sizes have about ``resolution²`` pixels, sides multiples of ``step`` (a multiple of the
VAE factor), aspect ratios up to ``max_aspect``. An image goes to the bucket nearest its aspect
ratio (in log space) and is resized to cover it, then cropped. The batch order is a pure
function of (seed, epoch); the steps are cut into the processes' micro-batches as without buckets
(``toolkit.data.sampler``), so W processes and W/k processes accumulating k micro-batches train on
the same micro-batches in the same steps, and a run resumes exactly on either (``ResumableLoader``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from toolkit.data.sampler import MicroBatchSampler

STEP = 64   # bucket sides' default step (pixels)


def make_buckets(resolution: int, step: int = STEP, max_aspect: float = 2.0) -> list[tuple[int, int]]:
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


class BucketBatchSampler(MicroBatchSampler):
    """Global steps of ``(epoch, index)`` from one bucket each (``MicroBatchSampler`` cuts them into
    the processes' micro-batches).

    Every epoch: each bucket's items are shuffled and cut into steps of ``micro_batch × P`` items;
    a bucket's last, smaller step keeps the largest multiple of P items it has (so it still splits
    into P equal micro-batches: at most P − 1 items of a bucket sit out an epoch, none when P = 1);
    the steps of all buckets are shuffled together. The list depends on P, not on W alone, so W
    processes × accumulation A and W·A processes compute the same micro-batches, and every item of
    a step weighs the same in its update.

    Args:
        bucket_of: each item's bucket; the others as ``MicroBatchSampler``.
    """

    def __init__(self, bucket_of: Sequence[int], micro_batch: int, seed: int = 0, shuffle: bool = True,
                 rank: int = 0, world_size: int = 1, accumulation: int = 1) -> None:
        super().__init__(micro_batch, seed, shuffle, rank, world_size, accumulation)
        self.bucket_of = list(bucket_of)

    def steps(self, epoch: int) -> list[list[int]]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        groups: dict[int, list[int]] = {}
        for i, b in enumerate(self.bucket_of):
            groups.setdefault(b, []).append(i)
        out, size, p = [], self.micro_batch * self.per_step, self.per_step
        for b in sorted(groups):
            items = groups[b]
            if self.shuffle:
                items = [items[j] for j in torch.randperm(len(items), generator=g).tolist()]
            out += [step[: len(step) // p * p] for step in (items[k: k + size] for k in range(0, len(items), size))]
        out = [s for s in out if s]
        if self.shuffle:
            out = [out[j] for j in torch.randperm(len(out), generator=g).tolist()]
        return out
