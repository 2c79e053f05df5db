"""Runs started by a cluster launcher (torchrun, SLURM's srun): every process must agree on one run
directory and on the size of the job before anything is written.

Hydra resolves ``${now:…}`` in each process on its own, so under torchrun or srun the default
``hydra.run.dir`` could differ between processes (Lightning's own single-node launcher forwards
it; an external launcher does not). Here the run directory comes from an id every process of
the job shares: ``SLURM_JOB_ID`` under srun, the rendezvous id (``TORCHELASTIC_RUN_ID``,
``torchrun --rdzv-id``) under torchrun, or an explicit ``hydra.run.dir``; never a clock.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

from toolkit.run.lifecycle import RunDirError


def external_launcher(env: Mapping[str, str] = os.environ) -> str | None:
    """``torchrun`` or ``slurm`` when this process was started by one for a multi-process job, else None
    (a plain run, or a rank Lightning's own launcher started: it passes ``hydra.run.dir`` itself)."""
    if int(env.get("WORLD_SIZE", "1") or 1) <= 1 and int(env.get("SLURM_NTASKS", "1") or 1) <= 1:
        return None
    if "TORCHELASTIC_RUN_ID" in env:
        return "torchrun"
    if "SLURM_JOB_ID" in env and "SLURM_PROCID" in env:
        return "slurm"
    return None


def process_rank(env: Mapping[str, str] = os.environ) -> tuple[int, int]:
    """(rank, world size) of this process in a job started by torchrun or srun; (0, 1) on its own."""
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"])
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
    return 0, 1


def job_run_id(env: Mapping[str, str] = os.environ) -> str | None:
    """The id every process of this job shares (None: the launcher gave none)."""
    launcher = external_launcher(env)
    if launcher == "slurm":
        return f"slurm-{env['SLURM_JOB_ID']}"
    if launcher == "torchrun":
        rid = env.get("TORCHELASTIC_RUN_ID", "none")
        return None if rid in ("", "none") else f"torchrun-{re.sub(r'[^A-Za-z0-9_.-]', '_', rid)}"
    return None


def shared_run_dir(args: list[str], env: Mapping[str, str] = os.environ) -> list[str]:
    """``args`` with ``hydra.run.dir`` set from the job's id when an external launcher started this
    process and none was given; refused when the launcher gives no id to agree on."""
    launcher = external_launcher(env)
    if launcher is None or any(a in ("-m", "--multirun") for a in args):
        return args
    if any(a.lstrip("+").startswith("hydra.run.dir=") for a in args):
        return args
    rid = job_run_id(env)
    if rid is None:
        raise RunDirError(
            "started by torchrun without a rendezvous id, so the processes have nothing to agree on for their run "
            "directory (each would take its own time stamp): pass --rdzv-id=<job name> to torchrun, or "
            "hydra.run.dir=<a folder every node sees> to run.py")
    return [*args, f"hydra.run.dir=outputs/${{task_name}}/{rid}"]


def check_world_size(devices: int | str, num_nodes: int, env: Mapping[str, str] = os.environ) -> None:
    """Under an external launcher, ``trainer.devices × trainer.num_nodes`` must be the job's size."""
    if external_launcher(env) is None:
        return
    world = int(env.get("WORLD_SIZE") or env.get("SLURM_NTASKS") or 1)
    if not isinstance(devices, int) or devices * num_nodes != world:
        raise RunDirError(
            f"trainer.devices={devices} × trainer.num_nodes={num_nodes} ≠ WORLD_SIZE={world} (the processes the "
            f"launcher started): set trainer.devices to the processes per node and trainer.num_nodes to the nodes")


def elastic_resume(args: list[str], env: Mapping[str, str] = os.environ) -> list[str]:
    """A job started again under its own id continues its run from the last checkpoint
    (``ckpt_path=last``) instead of refusing to start over it. That covers torchrun restarting the
    worker group after a failure (``--max-restarts``; the agents of healthy nodes restart theirs
    as a new rendezvous round, with ``TORCHELASTIC_RESTART_COUNT`` still 0, so the count cannot
    tell), SLURM requeueing a job (same ``SLURM_JOB_ID``), and the same ``--rdzv-id`` given again.
    "Its own": the run's history records the job id of its first start. A job that failed before
    its first checkpoint starts over. ``args`` already hold ``hydra.run.dir`` (``shared_run_dir``)."""
    rid = job_run_id(env)
    if rid is None or any(a.lstrip("+").startswith("ckpt_path=") for a in args):
        return args
    i, run = next(((i, a.split("=", 1)[1]) for i, a in enumerate(args) if a.lstrip("+").startswith("hydra.run.dir=")),
                  (None, None))
    if run is None:
        return args
    if "${task_name}" in run:   # the task's name, as Hydra will resolve it
        from toolkit.run.resume import _compose

        run = run.replace("${task_name}", str(_compose([a for a in args if a.startswith("task=")]).task_name))
    from toolkit.run.history import history
    from toolkit.run.resume import has_last_checkpoint

    if not has_last_checkpoint(Path(run)) or not any(a.get("job") == rid for a in history(run)):
        return args
    return [*args[:i], f"hydra.run.dir={run}", *args[i + 1:], "ckpt_path=last"]


def check_restartable(env: Mapping[str, str] = os.environ) -> None:
    """Refuse a multi-node torchrun job with ``--max-restarts`` whose workers share the agent's
    rendezvous store: after a failure only the failed node's agent counts a restart, the workers
    of the other nodes keep the old count, key the store by it (pytorch/pytorch#135712) and read
    the previous round's addresses, so the restart the user asked for would die connecting."""
    if external_launcher(env) != "torchrun" or int(env.get("TORCHELASTIC_MAX_RESTARTS") or 0) == 0:
        return
    if int(env.get("GROUP_WORLD_SIZE") or 1) > 1 and env.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        raise RunDirError(
            "torchrun --max-restarts on several nodes needs TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in torchrun's "
            "environment (export it before torchrun on every node): with the shared store a restarted group "
            "cannot connect (pytorch/pytorch#135712)")
