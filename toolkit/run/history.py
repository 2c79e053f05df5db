"""A run's own record of its attempts: ``<run>/run_history.jsonl`` holds every start, resume and
rerun with the overrides it added, the checkpoint, the toolkit version and git commit."""

from __future__ import annotations

import json
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from toolkit.config import ROOT
from toolkit.results import append_row
from toolkit.run.launch import job_run_id
from toolkit.run.lifecycle import rank_zero
from toolkit.run.resume import SAVED

HISTORY = "run_history.jsonl"


def _git() -> str | None:
    if ROOT is None:   # an installed package: its version says what ran
        return None
    try:
        rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=5)
        if rev.returncode:
            return None
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return rev.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def toolkit_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("toolkit")
    except PackageNotFoundError:   # run from a source tree without pip install
        return "source tree (not installed)"


def record_attempt(cfg: DictConfig) -> dict[str, Any] | None:
    """Append this start or resume to ``<run>/run_history.jsonl`` (rank zero, single runs only):
    time, the overrides this attempt added, the checkpoint, toolkit version and git commit."""
    from hydra.core.hydra_config import HydraConfig


    if not HydraConfig.initialized() or not rank_zero():
        return None
    hc = HydraConfig.get()
    subdir = hc.output_subdir
    if subdir is None:
        return None
    out = Path(hc.runtime.output_dir)
    task = [str(o) for o in hc.overrides.task]
    resumed = str(subdir).startswith(f"{SAVED}/resume-")   # .hydra/rerun-<n>: a sweep cell run again
    if resumed:
        saved = [str(x) for x in OmegaConf.to_container(OmegaConf.load(out / SAVED / "overrides.yaml"), resolve=False)]
        new = task[len(saved):] if task[:len(saved)] == saved else [o for o in task if o not in saved]
    else:
        new = task
    # "rerun": a sweep command run again over this cell (it skips or resumes the cell's work)
    event = "resume" if resumed else "rerun" if history(out) else "start"
    row = {"time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "event": event, "hydra_dir": str(subdir), "overrides": new,
           "ckpt_path": cfg.get("ckpt_path"), "toolkit": toolkit_version(), "git": _git(),
           "job": job_run_id()}   # torchrun's rendezvous id / SLURM's job id: a restart of it continues
    append_row(out / HISTORY, row)
    return row


def record_event(run: str | Path, event: str, **fields: Any) -> None:
    """Append an event the task itself decides (e.g. a sweep cell resuming its training)."""

    if rank_zero():
        append_row(Path(run) / HISTORY, {"time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                                         "event": event, **fields})


def history(run: str | Path) -> list[dict[str, Any]]:
    path = Path(run) / HISTORY
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
