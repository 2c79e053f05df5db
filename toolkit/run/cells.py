"""``hydra/launcher=local``: each sweep cell a process of its own on this machine (submitit's local
executor: the path ``hydra/launcher=slurm`` takes, without a scheduler), each running cell on
devices of its own.

    python run.py -m hydra/launcher=local hydra.launcher.gpus_per_node=1 trainer=gpu module.lora.r=4,8,16,32

submitit's local executor alone gives every cell the same GPUs (0 .. gpus_per_node-1; with
``gpus_per_node`` null, ``CUDA_VISIBLE_DEVICES=''``: no GPU at all) and starts every cell at once.
Here the GPUs this process sees (its ``CUDA_VISIBLE_DEVICES``, else every device torch counts; or
``visible_gpus``) are cut into slots of ``gpus_per_node``; a cell starts when a slot is free, with
``CUDA_VISIBLE_DEVICES`` set to its slot, so cells beyond the device count wait their turn. CPU
cells (``gpus_per_node`` 0 or null) see no GPU and run ``max_parallel`` at a time (null: one per
core, ``tasks_per_node`` 1). A cell that asks for GPUs where there are none, or for more than
there are, is refused before any cell starts, naming the key. Hand-written: submitit's executor
takes one device list per submission, and Hydra's launcher submits the whole sweep as one array.
The launcher class is ``hydra_plugins.toolkit_launchers.LocalCells`` (Hydra instantiates launchers
from the ``hydra_plugins`` namespace only); what it decides is here.
"""

from __future__ import annotations

import os
import queue
import shlex
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any


def visible_devices() -> list[str]:
    """The GPUs this process may use, as ``CUDA_VISIBLE_DEVICES`` names them (ids or UUIDs)."""
    if "CUDA_VISIBLE_DEVICES" in os.environ:
        return [d.strip() for d in os.environ["CUDA_VISIBLE_DEVICES"].split(",") if d.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def device_slots(gpus_per_cell: int, visible: Sequence[str], cpu_cells: int) -> list[list[str]]:
    """The device lists cells run on at once: ``visible`` cut into groups of ``gpus_per_cell``, or
    ``cpu_cells`` empty lists (no GPU)."""
    if gpus_per_cell <= 0:
        return [[] for _ in range(max(1, cpu_cells))]
    if not visible:
        raise ValueError(f"hydra.launcher.gpus_per_node={gpus_per_cell}, but this machine shows no GPU (CUDA_VISIBLE_"
                         f"DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '(unset)')!r}, torch counts none): set "
                         "hydra.launcher.gpus_per_node=0 for CPU cells, or run the sweep where the GPUs are")
    if gpus_per_cell > len(visible):
        raise ValueError(f"hydra.launcher.gpus_per_node={gpus_per_cell}, but only {len(visible)} GPUs are visible "
                         f"({','.join(visible)}): ask for at most {len(visible)}")
    return [list(visible[i: i + gpus_per_cell]) for i in range(0, len(visible) - gpus_per_cell + 1, gpus_per_cell)]


def launch_cells(cells: Sequence[Sequence[str]], slots: list[list[str]], setup: Sequence[str],
                 launch_one: Any) -> list[Any]:
    """Run ``launch_one(index, overrides, setup lines)`` for every cell, as many at once as there
    are ``slots``, each with its slot's devices (exported in the shell that starts the cell, over
    submitit's own ``CUDA_VISIBLE_DEVICES``, which it gives every cell alike)."""
    free: queue.Queue[list[str]] = queue.Queue()
    for slot in slots:
        free.put(slot)

    def one(i: int, overrides: Sequence[str]) -> Any:
        slot = free.get()
        try:
            return launch_one(i, overrides, [f"export CUDA_VISIBLE_DEVICES={shlex.quote(','.join(slot))}", *setup])
        finally:
            free.put(slot)

    with ThreadPoolExecutor(len(slots)) as pool:
        return list(pool.map(one, range(len(cells)), cells))


def check_tasks(tasks_per_node: int) -> None:
    if tasks_per_node != 1:
        raise ValueError(f"hydra.launcher.tasks_per_node={tasks_per_node}: hydra/launcher=local starts one process per "
                         "cell (its tasks would not form one job); for DDP inside a cell use trainer=ddp, whose "
                         "launcher starts the ranks: set hydra.launcher.tasks_per_node=1")
