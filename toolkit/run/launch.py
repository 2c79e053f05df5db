"""Runs started by a cluster launcher (torchrun, SLURM's srun or sbatch, submitit): every process
must agree on one run directory and on the size of the job before anything is written, and a
restart or requeue of the job continues its run.

Hydra resolves ``${now:…}`` in each process on its own, so under torchrun or srun the default
``hydra.run.dir`` could differ between processes (Lightning's own single-node launcher forwards
it; an external launcher does not). Here the run directory comes from an id every process of
the job shares: ``SLURM_JOB_ID`` under SLURM (also for a one-task job: a requeue keeps the id),
the rendezvous id (``TORCHELASTIC_RUN_ID``, ``torchrun --rdzv-id``) under torchrun, or an
explicit ``hydra.run.dir``; never a clock. Who is who comes from ``run.world``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from toolkit.run.lifecycle import RunDirError
from toolkit.run.world import job_world


def job_run_id() -> str | None:
    """The id every process of this job shares, and a restart or requeue of it keeps (None: not
    started by torchrun or SLURM, or torchrun without a rendezvous id)."""
    launcher = job_world().launcher
    if launcher == "slurm":
        return f"slurm-{os.environ['SLURM_JOB_ID']}"
    if launcher == "torchrun":
        rid = os.environ.get("TORCHELASTIC_RUN_ID", "none")
        return None if rid in ("", "none") else f"torchrun-{re.sub(r'[^A-Za-z0-9_.-]', '_', rid)}"
    return None


def shared_run_dir(args: list[str]) -> list[str]:
    """``args`` with ``hydra.run.dir`` set from the job's id when torchrun or SLURM started this
    process and none was given; refused when the launcher gives no id to agree on."""
    if job_world().launcher not in ("torchrun", "slurm") or any(a in ("-m", "--multirun") for a in args):
        return args
    if any(a.lstrip("+").startswith("hydra.run.dir=") for a in args):
        return args
    rid = job_run_id()
    if rid is None:
        raise RunDirError(
            "started by torchrun without a rendezvous id, so the processes have nothing to agree on for their run "
            "directory (each would take its own time stamp): pass --rdzv-id=<job name> to torchrun, or "
            "hydra.run.dir=<a folder every node sees> to run.py")
    return [*args, f"hydra.run.dir=outputs/${{task_name}}/{rid}"]


def check_world_size(devices: int | str, num_nodes: int) -> None:
    """Under torchrun or SLURM, ``trainer.devices`` must be the processes per node and
    ``trainer.num_nodes`` the nodes the launcher started (Lightning would stop later, mid-setup)."""
    w = job_world()
    if w.launcher not in ("torchrun", "slurm"):
        return
    if not isinstance(devices, int) or devices != w.local_size or num_nodes != w.nodes:
        where = "srun's tasks per node" if w.launcher == "slurm" else "torchrun's --nproc-per-node"
        raise RunDirError(
            f"trainer.devices={devices} × trainer.num_nodes={num_nodes} ≠ WORLD_SIZE={w.size} (the processes the "
            f"launcher started: {w.local_size} per node on {w.nodes} nodes): set trainer.devices to {where} "
            f"({w.local_size}) and trainer.num_nodes to the nodes ({w.nodes})")


def elastic_resume(args: list[str]) -> list[str]:
    """A job started again under its own id continues its run from the last checkpoint
    (``ckpt_path=last``) instead of refusing to start over it. That covers torchrun restarting the
    worker group after a failure (``--max-restarts``; the agents of healthy nodes restart theirs
    as a new rendezvous round, with ``TORCHELASTIC_RESTART_COUNT`` still 0, so the count cannot
    tell), SLURM requeueing a job (same ``SLURM_JOB_ID``), and the same ``--rdzv-id`` given again.
    "Its own": the run's history records the job id of its first start. A job that failed before
    its first checkpoint starts over. ``args`` already hold ``hydra.run.dir`` (``shared_run_dir``);
    its ``${task_name}`` is the composed config's (``task=``, or the task an experiment sets)."""
    rid = job_run_id()
    if rid is None or any(a.lstrip("+").startswith("ckpt_path=") for a in args):
        return args
    i, run = next(((i, a.split("=", 1)[1]) for i, a in enumerate(args) if a.lstrip("+").startswith("hydra.run.dir=")),
                  (None, None))
    if run is None:
        return args
    if "${task_name}" in run:   # the task's name, as Hydra will resolve it
        task = composed_task_name(args)
        if task is None:
            return args   # the arguments do not compose: Hydra reports why
        run = run.replace("${task_name}", task)
    from toolkit.run.history import history
    from toolkit.run.resume import has_last_checkpoint

    if not has_last_checkpoint(Path(run)) or not any(a.get("job") == rid for a in history(run)):
        return args
    return [*args[:i], f"hydra.run.dir={run}", *args[i + 1:], "ckpt_path=last"]


def composed_task_name(args: list[str]) -> str | None:
    """``task_name`` of the config ``args`` compose (None if they do not compose)."""
    from hydra.errors import HydraException

    from toolkit.run.resume import _compose, _plain

    try:
        return str(_compose(_plain(args)).task_name)
    except HydraException:
        return None


def check_restartable() -> None:
    """Refuse a multi-node torchrun job with ``--max-restarts`` whose workers share the agent's
    rendezvous store: after a failure only the failed node's agent counts a restart, the workers
    of the other nodes keep the old count, key the store by it (pytorch/pytorch#135712) and read
    the previous round's addresses, so the restart the user asked for would die connecting."""
    env = os.environ
    if job_world().launcher != "torchrun" or int(env.get("TORCHELASTIC_MAX_RESTARTS") or 0) == 0:
        return
    if int(env.get("GROUP_WORLD_SIZE") or 1) > 1 and env.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        raise RunDirError(
            "torchrun --max-restarts on several nodes needs TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in torchrun's "
            "environment (export it before torchrun on every node): with the shared store a restarted group "
            "cannot connect (pytorch/pytorch#135712)")
