"""Pieces every training task shares: the Trainer with its callbacks and loggers, and the
optimizer + step-wise LR schedule built from ``_partial_`` configs."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import lightning as L
import torch
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


def prodigy(params: Iterable[torch.nn.Parameter], lr: float = 1.0, **kwargs: Any) -> torch.optim.Optimizer:
    """Prodigy (``prodigyopt``), which estimates the step size itself: ``lr`` only multiplies that
    estimate, so a value far from 1 (e.g. a preset's AdamW learning rate left in place) is flagged."""
    from prodigyopt import Prodigy

    if not 0.1 <= lr <= 10:
        logging.getLogger(__name__).warning(
            "WRONG-RESULTS RISK: Prodigy with lr=%g: its lr multiplies the step size it estimates, 1.0 is the "
            "usual value (set module.optimizer.lr=1)", lr)
    return Prodigy(params, lr=lr, **kwargs)


def adamw_8bit(params: Iterable[torch.nn.Parameter], **kwargs: Any) -> torch.optim.Optimizer:
    """bitsandbytes' 8-bit AdamW (``module/optimizer=adamw8bit``): CUDA only, refused elsewhere."""
    params = list(params)
    if any(p.device.type != "cuda" for p in params):
        raise ValueError("8-bit AdamW (bitsandbytes) runs on CUDA GPUs only and this run's parameters are on "
                         f"{params[0].device}; use module/optimizer=adamw (or prodigy) here")
    try:
        import bitsandbytes as bnb
    except ImportError as err:
        raise ImportError("module/optimizer=adamw8bit needs bitsandbytes: pip install bitsandbytes") from err
    return bnb.optim.AdamW8bit(params, **kwargs)


def optimizers(params: Iterable[torch.nn.Parameter], optimizer_fn: Callable[..., torch.optim.Optimizer],
               lr_scheduler_fn: Callable[..., Any] | None, num_training_steps: int) -> Any:
    """What ``LightningModule.configure_optimizers`` returns: the optimizer, plus a per-step schedule."""
    opt = optimizer_fn(params)
    if lr_scheduler_fn is None:
        return opt
    sched = lr_scheduler_fn(optimizer=opt, num_training_steps=int(num_training_steps))
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
