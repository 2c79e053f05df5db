"""Random state that makes a resumed run identical to an uninterrupted one, on any number of processes.

Every random number a training sample needs (caption dropout, the VAE's posterior sample, noise,
noise offset, timestep, input perturbation) is drawn from a generator of its own, seeded from
``(seed, the sample's key, the kind of draw)``; the key is ``(epoch, dataset index, role)`` (role 1:
a paired class image), the sample's global identity in training. So a sample gets the same draws
whichever process, micro-batch or accumulation slot computes it, and whatever else is switched on
(``SampleDraws``). What draws from torch's global generator inside a micro-batch's forward (LoRA
dropout) is seeded per micro-batch from all of its samples' keys (``seed_micro_batch``): the same
micro-batch on 1 or on 2 processes gets the same masks. No restored RNG state can be stale; the
full generator states (torch, CUDA, numpy, python) are still saved per rank in every checkpoint and
restored, for code outside the step.
"""

from __future__ import annotations

import hashlib
import random
from typing import Any

import numpy as np
import torch
import torch.distributed as dist


def step_seed(*parts: int) -> int:
    """A 63-bit seed that changes unpredictably with every part (unlike ``seed + step``, which
    makes neighbouring runs share streams)."""
    digest = hashlib.sha256(",".join(str(int(p)) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def seed_global(s: int) -> None:
    torch.manual_seed(s)   # also seeds every CUDA device
    np.random.seed(s % 2**32)
    random.seed(s)


def seed_micro_batch(seed: int, keys: torch.Tensor) -> None:
    """Seed the global generators from every sample key of a micro-batch (what its forward draws
    there, e.g. LoRA dropout, then depends on the micro-batch only, not on the process)."""
    seed_global(step_seed(seed, *keys.flatten().tolist()))


# one stream per kind of draw: a sample's noise is the same whether or not, say, noise offset is on
DRAWS = ("caption_dropout", "latent", "noise", "offset", "timestep", "perturbation")
TRAINING, VALIDATION = 0, 1   # streams: the validation loss's draws never repeat a training sample's


class SampleDraws:
    """Per-sample generators: ``draws(kind)`` is one ``torch.Generator`` per sample (per repeat),
    seeded from ``(seed, key, kind, copy)``.

    Args:
        seed: the run's seed (``module.seed``; ``module.validation.seed`` for the validation loss).
        keys: the batch's ``(n, 3)`` sample keys (``toolkit.data.datamodule.collate``).
        repeat: copies of each sample in the batch (the validation loss scores each image at several
            timesteps: copy j of sample i gets its own stream).
        stream: ``TRAINING`` or ``VALIDATION``.
    """

    def __init__(self, seed: int, keys: torch.Tensor, repeat: int = 1, stream: int = TRAINING) -> None:
        self.seed, self.keys, self.repeat, self.stream = seed, [tuple(k) for k in keys.tolist()], repeat, stream

    def __call__(self, kind: str) -> list[torch.Generator]:
        tag = DRAWS.index(kind)
        return [torch.Generator().manual_seed(step_seed(self.seed, self.stream, *key, tag, j))
                for key in self.keys for j in range(self.repeat)]


def rng_state() -> dict[str, Any]:
    """This process's generator states, in types ``torch.load(weights_only=True)`` accepts."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(tuple(x if not isinstance(x, list) else tuple(x) for x in state["python"]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def gather_rng_states() -> list[dict[str, Any]]:
    """Every rank's ``rng_state()`` (a collective in a distributed run: call it on all ranks)."""
    mine = rng_state()
    if not (dist.is_available() and dist.is_initialized()):
        return [mine]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, mine)
    return out
