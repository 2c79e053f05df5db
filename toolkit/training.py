"""Pieces every training task shares: the Trainer with its callbacks and loggers, and the
optimizer + step-wise LR schedule built from ``_partial_`` configs."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import LearningRateMonitor
from omegaconf import DictConfig, OmegaConf


def build_trainer(cfg: DictConfig) -> L.Trainer:
    """``cfg.trainer`` with ``cfg.callbacks`` and ``cfg.logger``; the resolved config goes to each logger."""
    loggers = [instantiate(c) for c in (cfg.logger or {}).values()]
    callbacks = [instantiate(c) for c in cfg.callbacks.values()]
    if not loggers:  # logger=none: LearningRateMonitor refuses to run without a logger
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    for lg in loggers:
        lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    return trainer


def optimizers(params: Iterable[torch.nn.Parameter], optimizer_fn: Callable[..., torch.optim.Optimizer],
               lr_scheduler_fn: Callable[..., Any] | None, num_training_steps: int) -> Any:
    """What ``LightningModule.configure_optimizers`` returns: the optimizer, plus a per-step schedule."""
    opt = optimizer_fn(params)
    if lr_scheduler_fn is None:
        return opt
    sched = lr_scheduler_fn(optimizer=opt, num_training_steps=int(num_training_steps))
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
