"""Shard work across ranks with no padding, and gather it back in index order.

``DistributedSampler`` pads the last shard with duplicates so every rank gets the same count;
a duplicated image would bias FID/KID. Here the indices are cut into blocks of ``block`` (the
batch size) and rank r takes blocks r, r+W, r+2W, ...: every batch has the same members as in
a single-process run (so even batch-size-dependent kernels give bit-identical images), and the
gather reorders by index, so the result holds each item exactly once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch.distributed as dist


def shard(n: int, rank: int, world_size: int, block: int = 1) -> list[int]:
    starts = range(rank * block, n, world_size * block)
    return [i for s in starts for i in range(s, min(s + block, n))]


def gather_by_index(indices: Sequence[int], values: Sequence[Any], world_size: int) -> list[Any]:
    """All ranks' (index, value) pairs, ordered by index (on every rank)."""
    local = list(zip(indices, values))
    if world_size > 1:
        # all_gather_object: shards have different lengths and hold arrays + floats; the
        # payload is features (not images), small next to the generation cost.
        parts: list[Any] = [None] * world_size
        dist.all_gather_object(parts, local)
        local = [item for part in parts for item in part]
    local.sort(key=lambda kv: kv[0])
    idx = [k for k, _ in local]
    if idx != sorted(set(idx)):
        raise RuntimeError("gathered shards overlap: an item was computed twice")
    return [v for _, v in local]
