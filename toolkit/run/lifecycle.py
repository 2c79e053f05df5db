"""The rules of a run's life, each written once: who is rank zero, when a fresh start is refused,
what ``ckpt_path=last`` means, how a run reused or resumed in a sweep decides, and how an
interrupted fit exits. ``run.resume`` (before Hydra), ``tasks.train`` and ``tasks.finetune_eval``
call these; nothing else decides them.
"""

from __future__ import annotations

import copy
import json
import logging
import pickle
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from omegaconf import DictConfig, open_dict

from toolkit.run.signals import Stop
from toolkit.run.world import job_world

if TYPE_CHECKING:
    import lightning as L

    from toolkit.run.identity import Identity

log = logging.getLogger(__name__)
INTERRUPTED_EXIT_CODE = 130   # 128 + SIGINT: what a shell reports for Ctrl-C


class RunDirError(ValueError):
    """A command that cannot mean what the user meant for this run directory."""


class CheckpointsExist(RunDirError, FileExistsError):
    """A fresh run was asked for in a directory holding another run's checkpoints."""


class NoCheckpoint(RunDirError, FileNotFoundError):
    """``ckpt_path=last`` names a run with no checkpoint to resume."""


class Interrupted(Exception):
    """Training stopped by Ctrl-C without a checkpoint of the current step."""


def rank_zero() -> bool:
    """This process is global rank zero (or not distributed): from the launcher (``run.world``), so
    it holds before any process group exists."""
    return job_world().rank == 0


def barrier() -> None:
    """Wait for every rank (a no-op outside a process group)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_ranks(value: object) -> list[object]:
    """Every rank's ``value``, in global-rank order (a collective; Lightning's strategies gather tensors only)."""
    import torch.distributed as dist

    out: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def check_fresh(run: Path, resume: str) -> None:
    """Refuse to start a fresh run over another run's checkpoints (resuming is explicit).
    ``resume``: the command that resumes ``run``."""
    ckpts = list((run / "checkpoints").glob("*.ckpt"))
    if ckpts:
        raise CheckpointsExist(
            f"{run} already holds checkpoints of an earlier run ({len(ckpts)} files); a fresh run there would mix "
            f"two runs. Resume it with: {resume}  — or start this run in another directory (hydra.run.dir=...).")


def nothing_to_resume(detail: str) -> NoCheckpoint:
    """The error of ``ckpt_path=last`` without a checkpoint (``detail``: what was looked at)."""
    return NoCheckpoint(
        f"ckpt_path=last: {detail}, so there is nothing to resume. Checkpoints are written every "
        "callbacks.model_checkpoint.every_n_train_steps steps and when a run is stopped by SIGTERM, SIGUSR1 or "
        "Ctrl-C; a run killed before its first one starts over: drop ckpt_path (and pick a new hydra.run.dir, "
        "or delete this one).")


def last_checkpoint(trainer: L.Trainer, output_dir: Path) -> Path:
    """The run's one ``last.ckpt`` (where the checkpoint callback writes it)."""
    cb = trainer.checkpoint_callback
    return Path(cb.dirpath if cb is not None and cb.dirpath else output_dir / "checkpoints") / "last.ckpt"


def resolve_ckpt_path(ckpt_path: str | None, trainer: L.Trainer, output_dir: Path) -> str | None:
    """``last`` -> this run's ``last.ckpt`` (the one file: never a guess between versions); an
    error if there is none, rather than a silent fresh start."""
    if ckpt_path != "last":
        return ckpt_path
    path = last_checkpoint(trainer, output_dir)
    if not path.is_file():
        raise nothing_to_resume(f"no checkpoint {path} in {output_dir}")
    return str(path)


def fit(trainer: L.Trainer, module: L.LightningModule, datamodule: L.LightningDataModule,
        ckpt_path: str | None) -> None:
    """``trainer.fit`` that reads checkpoints with ``weights_only=True`` (tensors and plain
    containers only: a pickle cannot run code on load) and explains a refused file. Lightning
    turns a KeyboardInterrupt it catches (Ctrl-C before training started, or a second Ctrl-C)
    into ``exit(1)``; that becomes ``Interrupted``."""
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    except SystemExit:
        if trainer.interrupted:
            raise Interrupted from None
        raise
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"refused to load checkpoint {ckpt_path!r}: it holds Python objects beyond tensors and "
            f"plain containers, and unpickling those can execute arbitrary code ({str(err).splitlines()[0]}). "
            "Resume only from checkpoints this toolkit wrote; to start from foreign LoRA weights, "
            "convert them to safetensors first.") from None


def stopped(stop: Stop, resume: str) -> NoReturn:
    """A fit a signal stopped (``callbacks.preemption``: after its checkpoint): rank zero names the
    checkpoint and the command that resumes the run; the entry then exits (or requeues the job)."""
    if stop.checkpoint is not None and rank_zero():
        log.warning("stopped by %s at step %d; checkpoint %s. Resume with:\n    %s", stop.name, stop.step,
                    stop.checkpoint, resume)
    raise stop


def exit_interrupted(trainer: L.Trainer, output_dir: Path, resume: str) -> None:
    """Ctrl-C without a checkpoint of the current step: say what there is to resume, exit 130."""
    last = last_checkpoint(trainer, output_dir)
    log.warning("interrupted at step %d, without a checkpoint of that step. %s", trainer.global_step,
                f"The last checkpoint is {last}; resume with: {resume}" if last.is_file()
                else "No checkpoint was written: nothing to resume.")
    raise SystemExit(INTERRUPTED_EXIT_CODE) from None


def check_identity(run: Path, ident: Identity, allow: tuple[str, ...] = (), what: str = "resume") -> None:
    """``run`` holds a training of ``ident`` (``toolkit.run.identity``; keys in ``allow`` may differ),
    else ``RunDirError`` naming the keys that differ. A folder without a record (made before
    identities were recorded) is another identity, except for an explicit resume, which continues
    it with its saved settings (checked by ``toolkit.run.resume``), saying so."""
    from toolkit.run.identity import RECORD, read_record

    recorded = read_record(run)
    if recorded is None:
        if what == "resume":
            log.warning("%s has no %s (made before identities were recorded): resuming with its saved settings; "
                        "the content of its model and data files cannot be compared", run, RECORD)
            return
        raise RunDirError(
            f"{run} holds a training made before identities were recorded (no {RECORD}), so it cannot be shown to "
            f"be this cell's: it is not reused. Run the sweep into a new hydra.sweep.dir (or move {run} away).")
    changed = ident.differences(recorded, allow)
    if changed:
        lines = "\n".join(f"  {c}" for c in changed[:12]) + (f"\n  ... and {len(changed) - 12} more"
                                                            if len(changed) > 12 else "")
        hint = ("A sweep numbers its cells by their position (hydra.sweep.subdir = the job number): the same sweep "
                "dir takes the same values in the same order, or run this sweep into a new hydra.sweep.dir."
                if what == "cell" else "Start a new run (another hydra.run.dir) for other settings.")
        raise RunDirError(f"{run} holds another {'cell' if what == 'cell' else 'run'}'s training, which differs from "
                          f"this one in:\n{lines}\nIt is never reused or continued as this one. "
                          f"{hint}")


def reuse_or_resume(cfg: DictConfig, out: Path, ident: Identity) -> tuple[DictConfig, dict[str, Any] | None]:
    """A sweep cell run again: its finished training's metrics (reused), or its interrupted
    training continued from its last checkpoint (``cfg`` with ``ckpt_path=last``) — only when the
    folder's recorded identity is this cell's (``check_identity``)."""
    from toolkit.run.history import record_event
    from toolkit.run.identity import RESUMABLE

    done = out / "train_metrics.json"
    finished = done.is_file() and (out / "adapter").is_dir()
    interrupted = (out / "checkpoints" / "last.ckpt").is_file() and cfg.ckpt_path is None
    if finished or interrupted:
        check_identity(out, ident, () if finished else RESUMABLE, "cell")
    if finished:
        log.info("training of %s finished earlier: reused (%s)", out, done)
        return cfg, json.loads(done.read_text())
    if interrupted:
        log.info("training of %s was interrupted: resuming from its last checkpoint", out)
        record_event(out, "resume", ckpt_path="last", why="the sweep ran again over an interrupted cell")
        cfg = copy.deepcopy(cfg)
        with open_dict(cfg):
            cfg.ckpt_path = "last"
    return cfg, None
