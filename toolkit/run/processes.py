"""A checkpoint written on W processes, resumed on W' with the same micro-batches per optimizer step.

With P = W·A micro-batches per step (A: accumulation) held, a process counts A = P/W micro-batches
per step, so every per-process batch count in Lightning's loop state scales by W/W' (a checkpoint
of 2 processes × accumulation 1 after k micro-batches each is, on 1 process × accumulation 2, after
2k). The optimizer-step counts (``global_step``, the schedulers', the EMA's) do not change. The data
position itself is converted by the loader (``toolkit.data.sampler.ResumableLoader``); the identity
check (``toolkit.run.identity``: ``derived.micro_batches_per_step``) has already refused any other P.
"""

from __future__ import annotations

from fractions import Fraction
from typing import Any

BATCH_PROGRESS = "epoch_loop.batch_progress"


def saved_world_size(checkpoint: dict[str, Any]) -> int | None:
    """The number of processes the checkpoint's training loader ran on (None: not recorded)."""
    loaders = checkpoint.get("loops", {}).get("fit_loop", {}).get("state_dict", {}).get("combined_loader") or []
    return loaders[0].get("world_size") if loaders else None


def rescale_batch_progress(checkpoint: dict[str, Any], world_size: int) -> bool:
    """Convert the checkpoint's per-process batch counts (in place) for ``world_size`` processes.
    Returns whether anything changed. Each counter keeps its offset from ``ready`` (a checkpoint is
    written between a batch's end and its completion count), and ``ready`` scales by W/W'."""
    saved = saved_world_size(checkpoint)
    if saved is None or saved == world_size:
        return False
    factor = Fraction(saved, world_size)
    progress = checkpoint["loops"]["fit_loop"][BATCH_PROGRESS]
    for part in ("total", "current"):
        counts = progress[part]
        scaled = counts["ready"] * factor
        if scaled.denominator != 1:
            raise ValueError(f"the checkpoint was written after {counts['ready']} micro-batches per process on "
                             f"{saved} processes, which {world_size} processes cannot share evenly: it is not "
                             "at an optimizer step")
        shift = int(scaled) - counts["ready"]
        for k in counts:
            counts[k] += shift
    return True
