"""The Trainer every training task shares, with its callbacks and loggers (and a CSV log, always)."""

from __future__ import annotations

import lightning as L
from hydra.utils import instantiate
from lightning.fabric.utilities.distributed import is_shared_filesystem
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.loggers import CSVLogger
from omegaconf import DictConfig, OmegaConf


class SharedRunDir(L.Callback):
    """Several nodes: the run directory must be one folder every node sees (checkpoints, the adapter
    and a resume live there), checked once the process group exists, before any work."""

    def __init__(self, path: str) -> None:
        self.path = path

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not is_shared_filesystem(trainer.strategy, self.path):
            raise RuntimeError(
                f"the run directory {self.path} is not shared between the nodes: checked with Lightning's "
                "is_shared_filesystem (the path must be the same on every rank, and a file rank 0 writes there must "
                "appear on every other rank within 3 s). Put hydra.run.dir on storage every node mounts; "
                "node-local disks are for paths.cache_dir.")


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
    if cfg.trainer.get("num_nodes", 1) > 1:
        callbacks.append(SharedRunDir(cfg.paths.output_dir))
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers)
    for lg in loggers:
        lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    return trainer
