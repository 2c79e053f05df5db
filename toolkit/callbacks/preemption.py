"""Survive preemption and Ctrl-C: checkpoint on SIGTERM / SIGUSR1 / SIGINT, write every checkpoint atomically.

``PreemptionCheckpoint`` turns a signal into a checkpoint written at the end of the next batch
that ends an optimizer step (with gradient accumulation, the end of the accumulation window: the
gradients accumulated so far are in no checkpoint; it is where ``ModelCheckpoint`` saves too, so
``ckpt_path=last`` resumes exactly), then
stops training; the train task exits with 128 + the signal number (143 for SIGTERM and SIGUSR1,
130 for Ctrl-C) and prints the command that resumes the run. A second Ctrl-C stops at once,
without a checkpoint (the previous ``last.ckpt`` stays: writes are atomic). In a DDP run the
signal flag is OR-reduced over ranks every batch, so all ranks stop at the same step. SLURM:
``#SBATCH --signal=USR1@120`` gives the job two minutes' warning.

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
from lightning.pytorch.plugins.io import TorchCheckpointIO

from toolkit.atomic import atomic_open

log = logging.getLogger(__name__)


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path,
                        storage_options: Any | None = None) -> None:
        if "://" in str(path):   # remote storage: as Lightning does
            return super().save_checkpoint(checkpoint, path, storage_options)
        with atomic_open(path) as f:
            torch.save(checkpoint, f)


class PreemptionCheckpoint(L.Callback):
    """Args:
        dirpath: checkpoint folder (the checkpoint is ``<dirpath>/last.ckpt``).
        signals: signal names that request a checkpoint and a clean stop.
    """

    def __init__(self, dirpath: str, signals: tuple[str, ...] = ("SIGTERM", "SIGUSR1", "SIGINT")) -> None:
        self.dirpath, self.signals = Path(dirpath), tuple(signals)
        self.requested: str | None = None
        self.preempted_at: int | None = None
        self.checkpoint: Path | None = None
        self._previous: dict[int, Any] = {}
        self._step = -1   # the optimizer step at the previous batch end

    @property
    def exit_code(self) -> int:
        """128 + the signal number, as a shell reports a process stopped by it; SIGUSR1 (SLURM's
        warning) as SIGTERM, the signal that schedulers expect."""
        return 128 + (signal.SIGINT if self.requested == "SIGINT" else signal.SIGTERM)

    def _handler(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if name == "SIGINT" and self.requested is not None:   # second Ctrl-C: stop now
            signal.signal(signal.SIGINT, signal.default_int_handler)
            self.requested = "SIGINT"
            raise KeyboardInterrupt
        self.requested = name
        again = " (Ctrl-C again to stop at once, without one)" if name == "SIGINT" else ""
        log.warning("%s received: checkpointing at the end of this optimizer step%s", name, again)

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        # Registered after Lightning's own handlers (set up at fit start), which they replace
        # for the run: ours checkpoint first, then stop the same way.
        for name in self.signals:
            sig = getattr(signal, name)
            self._previous[sig] = signal.signal(sig, self._handler)
        self._step = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        stepped, self._step = trainer.global_step != self._step, trainer.global_step
        # every rank takes part in the reduction every batch (a collective), and all stop together
        requested = trainer.strategy.reduce_boolean_decision(self.requested is not None, all=False)
        if self.preempted_at is not None or not requested or not stepped:
            return   # mid accumulation window: the accumulated gradients would be lost
        path = self.dirpath / "last.ckpt"
        trainer.save_checkpoint(path, weights_only=False)   # the full state, as ModelCheckpoint saves
        self.preempted_at, self.checkpoint = trainer.global_step, path
        trainer.should_stop = True

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def on_exception(self, trainer: L.Trainer, module: L.LightningModule, exception: BaseException) -> None:
        self.on_train_end(trainer, module)
