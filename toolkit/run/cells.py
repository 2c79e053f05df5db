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
"""

from __future__ import annotations

import copy
import os
import queue
import shlex
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from hydra.core.utils import JobReturn
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import LocalLauncher


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


class LocalCells(LocalLauncher):
    """Hydra's submitit ``LocalLauncher``, one cell per free device slot.

    Args:
        max_parallel: CPU cells running at once (null: one per core).
        visible_gpus: the GPUs to share out (null: what this process sees).
        **params: hydra_submitit_launcher's local parameters (``gpus_per_node`` per cell, ...).
    """

    def __init__(self, max_parallel: int | None = None, visible_gpus: Sequence[Any] | None = None,
                 **params: Any) -> None:
        super().__init__(**params)
        self.max_parallel = max_parallel
        self.visible_gpus = None if visible_gpus is None else [str(d) for d in visible_gpus]

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        if int(self.params.get("tasks_per_node") or 1) != 1:
            raise ValueError(f"hydra.launcher.tasks_per_node={self.params['tasks_per_node']}: hydra/launcher=local "
                             "starts one process per cell (its tasks would not form one job); for DDP inside a "
                             "cell use trainer=ddp, whose launcher starts the ranks: set "
                             "hydra.launcher.tasks_per_node=1")
        gpus = int(self.params.get("gpus_per_node") or 0)
        visible = self.visible_gpus if self.visible_gpus is not None else (visible_devices() if gpus else [])
        slots = device_slots(gpus, visible, min(len(job_overrides), self.max_parallel or os.cpu_count() or 1))
        free: queue.Queue[list[str]] = queue.Queue()
        for slot in slots:
            free.put(slot)

        def one(i: int, overrides: Sequence[str]) -> JobReturn:
            slot = free.get()
            try:
                cell = copy.copy(self)
                # the slot's devices, by name (ids or UUIDs): set in the shell that starts the cell,
                # over submitit's own CUDA_VISIBLE_DEVICES (which it gives every cell alike)
                setup = [f"export CUDA_VISIBLE_DEVICES={shlex.quote(','.join(slot))}",
                         *(self.params.get("setup") or [])]
                cell.params = {**self.params, "gpus_per_node": 0, "setup": setup}
                return LocalLauncher.launch(cell, [overrides], initial_job_idx + i)[0]
            finally:
                free.put(slot)

        with ThreadPoolExecutor(len(slots)) as pool:
            return list(pool.map(one, range(len(job_overrides)), job_overrides))
