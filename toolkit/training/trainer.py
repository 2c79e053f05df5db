"""The Trainer every training task shares, with its callbacks and loggers (and a CSV log, always)."""

from __future__ import annotations

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.loggers import CSVLogger
from omegaconf import DictConfig, OmegaConf


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
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers)
    for lg in loggers:
        lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    return trainer
