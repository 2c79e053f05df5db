"""On-disk caches of frozen-encoder outputs: VAE posterior parameters per image and text
embeddings per caption, so a LoRA step runs the UNet alone.

Layout: ``<dir>/<kind>-<settings key>/`` holds ``.npy`` shards (memory-mapped on read) and, per
shard, a ``.keys.json`` naming its rows. A row's key is the SHA-256 of its input (the image
file's bytes, the caption's text); the folder's settings key hashes the encoder (config + every
weight) and the preprocessing (resolution, crop, flip variants). So a changed image, resolution
or VAE re-encodes exactly what changed, and runs with the same settings share the cache. Shards
are written to a temp name and renamed, keys file last: a crash never leaves a readable half.

Posterior *parameters* (mean, log-variance) are stored, not samples: every step still draws a
fresh ``z ~ q(z|x)`` as the naive path does. Flips are cached as a second variant per image;
random crops are not cacheable (one variant per crop position) and turn the latent cache off.

Storage dtypes: ``float16`` (half the disk), ``float32`` (exact) and ``bfloat16``, which ``.npy``
cannot name: its 16 bits are stored as ``uint16`` and viewed back as bfloat16 on read (float32's
range in half the bytes; what T5's states need, whose values float16 cannot hold). Rows are read
memory-mapped: a T5-XXL caption (256-512 tokens x 4096) is only paged in when a batch uses it.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from toolkit.atomic import atomic_open
from toolkit.data.names import UnsafeName
from toolkit.data.shards import KEYS_SCHEMA
from toolkit.data.storage import LocalStore, StorageError, read_json
from toolkit.logs import progress as progress_bar

log = logging.getLogger(__name__)
BITS = np.uint16   # bfloat16 rows: their bits (numpy has no bfloat16)


def to_rows(tensor: torch.Tensor, dtype: str) -> np.ndarray:
    """``tensor`` as stored rows of ``dtype`` (``float16``, ``float32``, or ``bfloat16`` as its bits)."""
    if dtype == "bfloat16":
        return tensor.detach().to(torch.bfloat16).cpu().view(torch.uint16).numpy()
    return tensor.float().cpu().numpy().astype(dtype)


def from_rows(rows: np.ndarray) -> torch.Tensor:
    """Stored rows as a float32 tensor (bfloat16 bits viewed back as bfloat16 first)."""
    if rows.dtype == BITS:
        return torch.from_numpy(np.ascontiguousarray(rows)).view(torch.bfloat16).float()
    return torch.from_numpy(rows.astype(np.float32))


class ArrayStore:
    """Fixed-shape rows keyed by strings, in append-only ``.npy`` shards."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.index: dict[str, tuple[str, int]] = {}
        self._maps: dict[str, np.ndarray] = {}
        self.refresh()

    def refresh(self) -> None:
        for keys_file in sorted(self.root.glob("*.keys.json")):
            shard = keys_file.name[: -len(".keys.json")] + ".npy"
            for row, key in enumerate(read_keys(keys_file)):
                self.index.setdefault(key, (shard, row))

    def __contains__(self, key: str) -> bool:
        return key in self.index

    def __len__(self) -> int:
        return len(self.index)

    def write(self, keys: Sequence[str], rows: np.ndarray) -> None:
        name = uuid.uuid4().hex[:12]
        with atomic_open(self.root / f"{name}.npy") as f:
            np.save(f, rows)
        with atomic_open(self.root / f"{name}.keys.json", "w") as f:   # last: a shard without it is unseen
            json.dump(list(keys), f)
        for row, key in enumerate(keys):
            self.index.setdefault(key, (f"{name}.npy", row))

    def get(self, key: str) -> np.ndarray:
        shard, row = self.index[key]
        if shard not in self._maps:
            self._maps[shard] = np.load(self.root / shard, mmap_mode="r")
        return self._maps[shard][row]

    def tensor(self, keys: Sequence[str]) -> torch.Tensor:
        """The rows of ``keys``, stacked, as float32."""
        return from_rows(np.stack([self.get(k) for k in keys]))

    def __getstate__(self) -> dict[str, Any]:   # DataLoader workers re-open their own memmaps
        return {**self.__dict__, "_maps": {}}


def read_keys(path: Path) -> list[str]:
    """A shard's key list, read as every JSON file a set brings is (a regular file, below
    ``MAX_JSON_BYTES``, a list of strings): a damaged or foreign one is a refusal naming it."""
    try:
        return read_json(LocalStore(path.parent), path.name, KEYS_SCHEMA)
    except (StorageError, UnsafeName) as err:
        raise StorageError(f"{err} (an encoded-cache file: delete it and {path.name.removesuffix('.keys.json')}.npy "
                           "beside it to encode those rows again)") from None


def fill(store: ArrayStore, keys: Sequence[str], inputs: Sequence[Any], encode: Callable[[list[Any]], np.ndarray],
         batch_size: int, rank: int = 0, world_size: int = 1, barrier: Callable[[], None] = lambda: None,
         desc: str = "encoding", agree: Callable[[Any], Any] = lambda todo: todo) -> int:
    """Encode the inputs whose key is missing, this rank's share of them, in batches; returns
    how many this rank encoded. All ranks see every shard after the barrier.

    The to-do list is decided once for the job: after a barrier (no rank of this job has written
    yet), the group's leader reads the store and ``agree`` hands its list to every rank (a
    broadcast). Reading the store on each rank instead let two jobs sharing a cache folder split
    different lists (the other job writes between the ranks' reads): items nobody encoded. Rows
    another job writes meanwhile are simply found at the end."""
    barrier()
    store.refresh()
    todo = agree(sorted({k: i for i, k in enumerate(keys) if k not in store}.values()))
    # Whole batches dealt round-robin: a batch holds the same items whatever the number of ranks
    # (or nodes building their own copy), so the rows are bit-identical to a one-process build
    # (convolutions' numerics depend on the batch they run in).
    mine = [i for b in range(rank * batch_size, len(todo), world_size * batch_size) for i in todo[b: b + batch_size]]
    chunk = max(batch_size, 1024 // max(batch_size, 1) * batch_size)   # rows per shard file
    bar = progress_bar(total=len(mine), desc=f"{desc} (rank {rank})", unit="item", disable=not mine)
    for start in range(0, len(mine), chunk):
        part = mine[start: start + chunk]
        rows = [encode([inputs[i] for i in part[b: b + batch_size]]) for b in range(0, len(part), batch_size)]
        store.write([keys[i] for i in part], np.concatenate(rows))
        bar.update(len(part))
    bar.close()
    barrier()
    store.refresh()
    missing = sum(k not in store for k in keys)
    if missing:
        raise RuntimeError(f"{missing} items still missing from the cache {store.root} after encoding")
    return len(mine)
