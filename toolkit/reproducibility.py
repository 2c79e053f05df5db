"""Random state that makes a resumed run identical to an uninterrupted one.

Training draws every random number of a step (noise, timesteps, caption dropout, the VAE's
posterior sample, LoRA dropout) from the global generators, reseeded at the start of the step
from ``(seed, epoch, batch index, rank)``: the draws are a pure function of *where* in training
the step is, so no restored RNG state can be stale. The full generator states (torch, CUDA, numpy,
python) are still saved per rank in every checkpoint and restored, for code outside the step.
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


def seed_step(seed: int, epoch: int, batch_idx: int, rank: int) -> None:
    s = step_seed(seed, epoch, batch_idx, rank)
    torch.manual_seed(s)   # also seeds every CUDA device
    np.random.seed(s % 2**32)
    random.seed(s)


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
