"""The Trainer every training task shares, with its callbacks and loggers (and a CSV log, always)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from hydra.utils import instantiate
from lightning.fabric.utilities.distributed import is_shared_filesystem
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.loggers import CSVLogger
from omegaconf import DictConfig, OmegaConf

from toolkit.run import lifecycle
from toolkit.run.lifecycle import RunDirError
from toolkit.run.world import cluster_environment, job_world


def check_shared(trainer: L.Trainer, path: str | Path) -> None:
    """Several nodes: the run directory must be one folder every node sees (checkpoints, the adapter
    and a resume live there). Collective: every rank raises together."""
    if not is_shared_filesystem(trainer.strategy, path):
        raise RunDirError(
            f"the run directory {path} is not shared between the nodes: checked with Lightning's "
            "is_shared_filesystem (the path must be the same on every rank, and a file rank 0 writes there must "
            "appear on every other rank within 3 s). Put hydra.run.dir on storage every node mounts; "
            "node-local disks are for paths.cache_dir.")


class SharedRunDir(L.Callback):
    """``check_shared`` once the process group exists, before any work (nodes started by Lightning's
    own launcher: the group comes up inside ``fit``)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        check_shared(trainer, self.path)


def join_job(trainer: L.Trainer, output_dir: Path, ckpt_path: str | None) -> str | None:
    """The checkpoint to start from, decided once for the whole job.

    Processes an external launcher started (torchrun, srun) join their process group here, before
    the data scan and the model, so that the job can decide things together: the run directory is
    checked to be shared (several nodes), rank zero resolves ``ckpt_path`` and broadcasts it, and
    every rank must see that file. An error is raised on every rank at once, never on one while the
    others wait. Lightning's ``fit`` finds the group up and reuses it. Single processes and
    Lightning's own launcher (its ranks start inside ``fit``) resolve on their own, as before."""
    if trainer.world_size == 1 or not job_world().external:
        return lifecycle.resolve_ckpt_path(ckpt_path, trainer, output_dir)
    trainer.strategy.setup_environment()   # init_process_group from the launcher's variables
    if trainer.num_nodes > 1:
        check_shared(trainer, output_dir)
    decision: tuple[str | None, str | None] = (None, None)
    if trainer.is_global_zero:
        try:
            decision = (lifecycle.resolve_ckpt_path(ckpt_path, trainer, output_dir), None)
        except lifecycle.NoCheckpoint as err:
            decision = (None, str(err))
    path, error = trainer.strategy.broadcast(decision, 0)
    if error is not None:
        raise lifecycle.NoCheckpoint(error)
    seen = lifecycle.all_ranks(path is None or Path(path).is_file())
    if not all(seen):
        blind = [r for r, ok in enumerate(seen) if not ok]
        raise RunDirError(f"rank 0 resumes from {path}, but ranks {blind} cannot read that file: the checkpoint "
                          "folder must be on storage every node mounts (the run directory)")
    return path


def build_trainer(cfg: DictConfig) -> L.Trainer:
    """``cfg.trainer`` with ``cfg.callbacks`` and ``cfg.logger`` (plus a CSV log, always); the resolved
    config goes to each logger."""
    loggers = [instantiate(c) for c in (cfg.logger or {}).values()]
    if not any(isinstance(lg, CSVLogger) for lg in loggers):
        # the run's own record of its curves, whatever dashboard is configured (the report reads it)
        loggers.append(CSVLogger(save_dir=cfg.paths.output_dir, name="csv"))
    callbacks = [instantiate(c) for c in cfg.callbacks.values()]
    if not cfg.trainer.get("enable_progress_bar", True):   # Lightning refuses a progress callback then
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    if cfg.trainer.get("num_nodes", 1) > 1 and not job_world().external:   # else join_job checks it
        callbacks.append(SharedRunDir(cfg.paths.output_dir))
    # the launcher's view of the job (run.world), with Lightning's SLURM auto-requeue off: the job's
    # signals are the toolkit's (run.signals)
    plugins = [*(instantiate(cfg.trainer.get("plugins")) or []), cluster_environment()]
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers, plugins=plugins)
    for lg in loggers:
        lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    return trainer
