"""The toolkit's Hydra launcher: ``hydra/launcher=local`` (``conf/hydra/launcher/local.yaml``), each
sweep cell a process of its own, each running cell on devices of its own (``toolkit/run/cells.py``).
Here because Hydra instantiates launchers from the ``hydra_plugins`` namespace only."""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from typing import Any

from hydra.core.utils import JobReturn
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import LocalLauncher


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
        from toolkit.run.cells import check_tasks, device_slots, launch_cells, visible_devices

        check_tasks(int(self.params.get("tasks_per_node") or 1))
        gpus = int(self.params.get("gpus_per_node") or 0)
        visible = self.visible_gpus if self.visible_gpus is not None else (visible_devices() if gpus else [])
        slots = device_slots(gpus, visible, min(len(job_overrides), self.max_parallel or os.cpu_count() or 1))

        def one(i: int, overrides: Sequence[str], setup: list[str]) -> JobReturn:
            cell = copy.copy(self)
            cell.params = {**self.params, "gpus_per_node": 0, "setup": [*setup, *(self.params.get("setup") or [])]}
            return LocalLauncher.launch(cell, [overrides], initial_job_idx + i)[0]

        return launch_cells(job_overrides, slots, [], one)
