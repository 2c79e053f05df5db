"""The job's stop signals, one handler each, held by every process from the start of its task to the
end (toolkit/cli.py installs it, after submitit's and before Lightning's would be):

    SIGTERM   preemption, scancel, a requeue's kill, torchrun stopping its workers
    SIGUSR1   SLURM's warning before the time limit (``#SBATCH --signal=USR1@120``)
    SIGUSR2   the same from submitit (``hydra/launcher=slurm`` cells: ``signal_delay_s``)

What a signal does depends on the phase the process is in:

    start-up (config, imports, data scan, model)   stops at once; nothing is lost (the scan is cached)
    encoding (latent / text cache, class images)   stops at once; rows and images written stay (atomic files)
    training (steps, validation, sample grids)     a checkpoint at the end of the optimizer step in hand, on
                                                    every rank together (callbacks.preemption), then stops
    evaluation (generation, features, metrics)     stops at once; finished shards stay in <run>/eval_shards/

then the process exits with 143. Under SLURM, USR1 and USR2 (the time limit is near) also make
rank 0 requeue the job (``scontrol requeue``) while ``SLURM_RESTART_COUNT < max_requeues``; the
requeued job has the same id, so it continues the run: training from ``last.ckpt``
(``run.launch.elastic_resume``), evaluation from its shards, caches from their rows.
Lightning's own SLURM auto-requeue is off (``run.world.cluster_environment``): its handler saves
in the middle of a step and would be a second owner of USR1. Ctrl-C (SIGINT) keeps Python's
meaning outside training (KeyboardInterrupt, exit 130) and ``callbacks.preemption``'s inside it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import threading
from pathlib import Path
from typing import Any, NoReturn

from toolkit.run.world import job_world

log = logging.getLogger(__name__)
STOP_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGUSR2")
TIME_LIMIT_SIGNALS = ("SIGUSR1", "SIGUSR2")   # what SLURM (--signal) and submitit send before the limit
DEFAULT_MAX_REQUEUES = 3


class Stop(BaseException):  # noqa: N818 - like KeyboardInterrupt: no ``except Exception`` swallows it
    """A signal stopped the job; in training, after the checkpoint ``checkpoint`` of step ``step``."""

    def __init__(self, name: str, checkpoint: Path | None = None, step: int | None = None) -> None:
        super().__init__(f"stopped by {name}" + (f" at step {step}; checkpoint {checkpoint}" if checkpoint else ""))
        self.name, self.checkpoint, self.step = name, checkpoint, step

    @property
    def exit_code(self) -> int:
        """128 + the signal number, as a shell reports a process stopped by it; USR1/USR2 (warnings)
        as SIGTERM, the signal that schedulers expect; Ctrl-C 130."""
        return 128 + (signal.SIGINT if self.name == "SIGINT" else signal.SIGTERM)


class _Job:
    requested: str | None = None   # the first stop signal received
    deferred = 0                   # > 0: training, which stops at the end of its optimizer step
    children: list[Any] = []       # processes Lightning's launcher started: they get the signal too
    max_requeues = DEFAULT_MAX_REQUEUES


_JOB = _Job()


def _handler(signum: int, frame: Any) -> None:
    name = signal.Signals(signum).name
    for child in _JOB.children:   # Lightning's own SIGTERM handler forwarded it; this one replaces it
        with contextlib.suppress(Exception):
            child.send_signal(signum)
    first, _JOB.requested = _JOB.requested is None, _JOB.requested or name
    if _JOB.deferred:
        if first:
            log.warning("%s received: checkpointing at the end of this optimizer step", name)
        return
    raise Stop(name)


def install(max_requeues: int | None = None) -> dict[int, Any]:
    """Own SIGTERM, SIGUSR1 and SIGUSR2 in this process (idempotent; the main thread only); returns
    the handlers they had (``restore``)."""
    if max_requeues is not None:
        _JOB.max_requeues = int(max_requeues)
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {sig: signal.signal(sig, _handler) for sig in (getattr(signal, n) for n in STOP_SIGNALS)}


def restore(previous: dict[int, Any]) -> None:
    """Give the signals back to their handlers before ``install`` (a program that ran a task in its process)."""
    for sig, handler in previous.items():
        signal.signal(sig, handler)
    _JOB.requested, _JOB.deferred, _JOB.children = None, 0, []


def requested() -> str | None:
    """The stop signal received so far (None: none)."""
    return _JOB.requested


def check() -> None:
    """At a phase boundary: stop now if a signal came while the phase could not stop."""
    if _JOB.requested is not None:
        raise Stop(_JOB.requested)


def training(on: bool) -> None:
    """From the start of training (``on``) to its end: a stop signal only sets ``requested()``, and
    ``callbacks.preemption`` checkpoints at the end of the optimizer step in hand."""
    if on:
        install()   # again: Lightning's fit put its own SIGTERM handler in front of ours
    _JOB.deferred = int(on)


def stopping() -> None:
    """The process is on its way out: further stop signals (a requeue's kill) are ignored."""
    if threading.current_thread() is threading.main_thread():
        for name in STOP_SIGNALS:
            signal.signal(getattr(signal, name), signal.SIG_IGN)


def forward_to(processes: list[Any]) -> None:
    """Send this process's stop signals on to ``processes`` (the ranks Lightning's launcher started)."""
    _JOB.children = list(processes)


def slurm_job() -> str:
    """This job as scontrol and scancel name it: ``<array id>_<task>`` for a task of an array job
    (submitit's sweeps), whose own ``SLURM_JOB_ID`` may be the array's id, which names every task."""
    env = os.environ
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env["SLURM_JOB_ID"]


def requeue(stop: Stop) -> str:
    """Rank 0 of a SLURM job warned of its time limit requeues it, at most ``max_requeues`` times
    (``SLURM_RESTART_COUNT``); returns what was done, for the log."""
    world = job_world()
    if stop.name not in TIME_LIMIT_SIGNALS or world.launcher != "slurm" or world.rank != 0:
        return ""
    job, done = slurm_job(), int(os.environ.get("SLURM_RESTART_COUNT") or 0)
    if done >= _JOB.max_requeues:
        return (f"job {job} not requeued: it was requeued {done} times already (max_requeues={_JOB.max_requeues}); "
                "submit it again, or raise max_requeues")
    try:
        res = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"job {job} not requeued: scontrol requeue failed ({err})"
    if res.returncode != 0:
        return f"job {job} not requeued: scontrol requeue {job}: {res.stderr.strip() or res.returncode}"
    return f"requeued job {job} ({done + 1} of at most {_JOB.max_requeues} requeues: max_requeues)"


def exit_for(stop: Stop) -> NoReturn:
    """The end of a process a signal stopped: rank 0 says what happens next (requeued, or the
    command to run again), and the process exits with the signal's code."""
    stopping()
    if job_world().rank == 0:
        done = requeue(stop)
        if stop.checkpoint is None:   # (a training's stop has said its checkpoint and resume command)
            log.warning("%s; %s", stop, done or "run the same command again to continue (finished work is kept)")
        elif done:
            log.warning("%s", done)
    raise SystemExit(stop.exit_code)
