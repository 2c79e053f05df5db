"""A test task (``+task_module=tests.cell_env``): what a sweep cell's process was given. Writes
``<cell dir>/cell_env.json`` with its CUDA_VISIBLE_DEVICES, start and end time, after ``+hold_s``."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig


def run(cfg: DictConfig) -> dict[str, Any]:
    start = time.time()
    time.sleep(float(cfg.get("hold_s", 0)))
    row = {"cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"), "start": start, "end": time.time(),
           "pid": os.getpid()}
    (Path(cfg.paths.output_dir) / "cell_env.json").write_text(json.dumps(row))
    return row
