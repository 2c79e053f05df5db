"""Who this process is in its job: its rank, the job's size, its node, and the launcher that started
it, read through Lightning's cluster environments (torchelastic for torchrun, SLURM for srun and
submitit, its own for the ranks its launcher starts), in Lightning's order. Every decision that
depends on the rank reads it here: the run directory, rank-zero writes and log lines, the
evaluation's sharding, prepare's blocks, the data scan, the cache's to-do list.

    srun -N 1 --ntasks-per-node=2 python run.py task=eval ...   # World(rank 0|1, size 2, launcher slurm)
    srun -n 2 python run.py task=eval ...                        # the same, when the tasks fall evenly

The Trainer and the evaluation's Fabric get ``cluster_environment()``: Lightning's environment,
with its SLURM auto-requeue off (the toolkit owns the signals: ``run.signals``). ``job_world``
reads the same variables by the same rules without importing Lightning (which costs seconds of
start-up before a config error could be reported); tests/test_slurm.py checks that the two agree
under srun, torchrun and Lightning's launcher.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lightning.fabric.plugins.environments import ClusterEnvironment


class LaunchError(ValueError):
    """A launch that cannot give every process its place in the job."""


@dataclass(frozen=True)
class World:
    """Args:
        rank: global rank (for a process Lightning's launcher starts, exact on node 0; elsewhere only
            its being non-zero is known before the process group exists).
        size: processes in the job.
        local_rank / local_size: this process among those of its node.
        node_rank: the node.
        launcher: ``torchrun`` | ``slurm`` | ``lightning`` (a rank Lightning's launcher started, or
            the process that started them) | None (one process on its own).
    """

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1
    node_rank: int = 0
    launcher: str | None = None

    @property
    def nodes(self) -> int:
        return max(1, self.size // max(1, self.local_size))

    @property
    def external(self) -> bool:
        """Started, with the other ranks, by a launcher outside this program (torchrun, srun)."""
        return self.launcher in ("torchrun", "slurm") and self.size > 1


def cluster_environment() -> ClusterEnvironment:
    """Lightning's choice (torchelastic first: it can run inside SLURM), with SLURM's auto-requeue
    off: its handler would checkpoint mid-step and requeue from inside the signal, beside ours."""
    from lightning.fabric.plugins.environments import LightningEnvironment, SLURMEnvironment, TorchElasticEnvironment

    if TorchElasticEnvironment.detect():
        return TorchElasticEnvironment()
    if SLURMEnvironment.detect():
        return SLURMEnvironment(auto_requeue=False)
    return LightningEnvironment()


def torchelastic(env: Mapping[str, str]) -> bool:
    """``TorchElasticEnvironment.detect()``: torch's ``is_torchelastic_launched``."""
    return env.get("TORCHELASTIC_RUN_ID") is not None


def srun(env: Mapping[str, str]) -> bool:
    """``SLURMEnvironment.detect()``: a SLURM job, not an interactive allocation's shell."""
    return "SLURM_NTASKS" in env and env.get("SLURM_JOB_NAME") not in ("bash", "interactive")


def slurm_tasks_per_node(env: Mapping[str, str] = os.environ) -> int:
    """The tasks srun started on each node: ``--ntasks-per-node``, or ``-n N`` when the tasks fell
    evenly on the nodes (``SLURM_TASKS_PER_NODE`` ``2`` or ``2(x3)``); uneven (``2,1``) is refused."""
    if env.get("SLURM_NTASKS_PER_NODE"):
        return int(env["SLURM_NTASKS_PER_NODE"])
    layout = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or "1"
    counts = {int(m.group(1)) for m in re.finditer(r"(\d+)(?:\(x\d+\))?", layout)}
    if len(counts) != 1:
        raise LaunchError(
            f"srun placed the {env.get('SLURM_NTASKS')} tasks unevenly on the nodes ({layout} per node); every node "
            "needs the same number of processes: use srun --ntasks-per-node=<tasks per node> (with -N <nodes>) "
            "instead of -n")
    return counts.pop()


def adopt_srun_layout() -> None:
    """``srun -n N``: set ``SLURM_NTASKS_PER_NODE`` to what ``--ntasks-per-node`` would have set
    (Lightning requires it, and refuses ``-n`` alone deep inside the Trainer); refused, before any
    work, when the tasks are uneven, or when a multi-task job's batch script runs this without srun
    (that one process would wait for the others forever)."""
    env = os.environ
    if not srun(env) or torchelastic(env) or int(env.get("SLURM_NTASKS", 1)) <= 1:
        return
    if "SLURM_STEP_ID" not in env and "SLURM_STEPID" not in env:
        raise LaunchError(
            f"this runs in the batch script of a SLURM job with {env['SLURM_NTASKS']} tasks, but not under srun, "
            "so it is one process waiting for the others: start it with srun (srun python run.py ...), or "
            "submit the job with one task")
    env["SLURM_NTASKS_PER_NODE"] = str(slurm_tasks_per_node(env))


def job_world(env: Mapping[str, str] = os.environ) -> World:
    """This process's place in its job (before any process group exists), as Lightning's cluster
    environment of ``cluster_environment()`` gives it."""
    if torchelastic(env):   # TorchElasticEnvironment
        return World(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env["LOCAL_RANK"]),
                     int(env.get("LOCAL_WORLD_SIZE", 1)), int(env.get("GROUP_RANK", 0)), "torchrun")
    if srun(env):           # SLURMEnvironment
        size = int(env["SLURM_NTASKS"])
        return World(int(env["SLURM_PROCID"]), size, int(env["SLURM_LOCALID"]),
                     slurm_tasks_per_node(env) if size > 1 else 1, int(env["SLURM_NODEID"]), "slurm")
    # LightningEnvironment: its launcher sets LOCAL_RANK, NODE_RANK and WORLD_SIZE for the ranks it
    # starts (and in the process that starts them); a plain process has none of them.
    size = int(env.get("WORLD_SIZE", 1) or 1)
    if "LOCAL_RANK" not in env or size <= 1:
        return World()
    local, node = int(env["LOCAL_RANK"]), int(env.get("NODE_RANK", env.get("GROUP_RANK", 0)))
    per_node = max(1, size // (node + 1))   # exact on node 0 and the last node; elsewhere only non-zero
    return World(local + node * per_node, size, local, per_node, node, "lightning")


def rank_zero() -> bool:
    """This process is global rank zero of its job (or alone): before any process group exists."""
    return job_world().rank == 0
