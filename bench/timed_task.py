"""A cell's own time, for bench/slurm_sweep.py: runs the cell's task (``task_name``) and writes the
seconds it took to ``<cell dir>/cell_time.json`` (``+task_module=bench.timed_task``)."""

from __future__ import annotations

import importlib
import json
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig


def run(cfg: DictConfig) -> dict[str, Any]:
    start = time.time()
    out = importlib.import_module(f"toolkit.tasks.{cfg.task_name}").run(cfg)
    (Path(cfg.paths.output_dir) / "cell_time.json").write_text(json.dumps({"seconds": time.time() - start}))
    return out
