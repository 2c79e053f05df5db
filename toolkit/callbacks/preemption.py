"""Survive preemption and Ctrl-C: checkpoint at an optimizer-step boundary, write every checkpoint atomically.

``PreemptionCheckpoint`` turns a stop signal received during training (SIGTERM, SIGUSR1,
SIGUSR2: the job's handler, ``toolkit.run.signals``; Ctrl-C: this callback's) into a checkpoint
written at the end of the next batch that ends an optimizer step (with gradient accumulation,
the end of the accumulation window: the gradients accumulated so far are in no checkpoint; it
is where ``ModelCheckpoint`` saves too, so ``ckpt_path=last`` resumes exactly), then stops
training at once by raising ``run.signals.Stop``: the train task prints the command that
resumes the run and exits with 128 + the signal number (143 for SIGTERM, SIGUSR1 and SIGUSR2,
130 for Ctrl-C); under SLURM a time-limit warning also requeues the job (``run.signals``). A
second Ctrl-C stops at once, without a checkpoint (the previous ``last.ckpt`` stays: writes are
atomic). In a DDP run the signal flag is OR-reduced over ranks every batch, so all ranks stop at
the same step (a signal sent to one rank is enough).

Why raise rather than ``trainer.should_stop``: a stop that way lets Lightning run validation once
more and then ``ModelCheckpoint.on_train_end`` (Lightning 2.6) write ``last.ckpt`` over this
checkpoint when it has saved nothing yet in this process, with the interrupted epoch marked
complete: a resume from that file skipped the rest of the epoch (the requeued job of issue 44,
tests/test_slurm.py).

The checkpoint is ``<dirpath>/last.ckpt``, the file ``ModelCheckpoint(save_last=True)`` keeps
current; with ``enable_version_counter=false`` (conf/callbacks) ModelCheckpoint overwrites it
too, so a run dir holds exactly one ``last.ckpt``, always the newest state.

``AtomicCheckpointIO`` writes ``<file>.tmp`` and renames it over ``<file>``: a crash in the
middle of a write leaves the previous checkpoint intact (Lightning's own ``TorchCheckpointIO``
writes the final path in place).
"""

from __future__ import annotations

import logging
import signal
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from toolkit.atomic import atomic_open
from toolkit.run import signals as run_signals

log = logging.getLogger(__name__)


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path,
                        storage_options: Any | None = None) -> None:
        if "://" in str(path):   # remote storage: as Lightning does
            return super().save_checkpoint(checkpoint, path, storage_options)
        with atomic_open(path) as f:
            torch.save(checkpoint, f)


class PreemptionCheckpoint(Checkpoint):
    # A Checkpoint: Lightning runs checkpoint callbacks after every other one, so the state saved at
    # the step's end holds that step's EMA update and every other callback's (an L.Callback listed
    # before the EMA saved the step without it: the resumed EMA adapter differed)
    """Args:
        dirpath: checkpoint folder (the checkpoint is ``<dirpath>/last.ckpt``).
        signals: the signals turned into a checkpoint during training (of the job's SIGTERM,
            SIGUSR1, SIGUSR2, and Ctrl-C); one left out stops the job after training instead.
    """

    def __init__(self, dirpath: str,
                 signals: tuple[str, ...] | list[str] = ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT")) -> None:
        unknown = set(signals) - {*run_signals.STOP_SIGNALS, "SIGINT"}
        if unknown:
            raise ValueError(f"callbacks.preemption.signals: {sorted(unknown)} are not stop signals "
                             f"({', '.join([*run_signals.STOP_SIGNALS, 'SIGINT'])})")
        self.dirpath, self.signals = Path(dirpath), tuple(signals)
        self.ctrl_c = 0                 # Ctrl-C presses during training
        self._previous_int: Any = None
        self._step = -1                 # the optimizer step at the previous batch end

    def _int_handler(self, signum: int, frame: Any) -> None:
        self.ctrl_c += 1
        if self.ctrl_c > 1:   # second Ctrl-C: stop now
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        log.warning("SIGINT received: checkpointing at the end of this optimizer step (Ctrl-C again to stop at "
                    "once, without one)")

    def setup(self, trainer: L.Trainer, module: L.LightningModule, stage: str) -> None:
        # the ranks Lightning's launcher started get this process's stop signals (its own handler did that)
        run_signals.forward_to(getattr(trainer.strategy.launcher, "procs", None) or [])

    def on_sanity_check_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        run_signals.install()   # in front of the SIGTERM handler Lightning's fit has just put before ours

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        run_signals.training(True)
        if "SIGINT" in self.signals:
            self._previous_int = signal.signal(signal.SIGINT, self._int_handler)
        self._step = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        stepped, self._step = trainer.global_step != self._step, trainer.global_step
        job = run_signals.requested()
        mine = job if job in self.signals else "SIGINT" if self.ctrl_c else None
        # every rank takes part in the reduction every batch (a collective), and all stop together
        if not trainer.strategy.reduce_boolean_decision(mine is not None, all=False) or not stepped:
            return   # mid accumulation window: the accumulated gradients would be lost
        path = self.dirpath / "last.ckpt"
        trainer.save_checkpoint(path, weights_only=False)   # the full state, as ModelCheckpoint saves
        raise run_signals.Stop(mine or "a signal on another rank", path, trainer.global_step)

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        run_signals.training(False)
        if self._previous_int is not None:
            signal.signal(signal.SIGINT, self._previous_int)
            self._previous_int = None

    def on_exception(self, trainer: L.Trainer, module: L.LightningModule, exception: BaseException) -> None:
        self.on_train_end(trainer, module)
