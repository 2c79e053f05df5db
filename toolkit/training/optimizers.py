"""Optimizers beyond torch's (Prodigy, 8-bit AdamW) and what ``configure_optimizers`` returns:
the optimizer built from its ``_partial_`` config plus a step-wise LR schedule."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import torch


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
