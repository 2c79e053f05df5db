"""Exponential moving average of the adapter weights (diffusers' ``EMAModel`` over the trainable tensors).

    θ_ema ← d·θ_ema + (1 − d)·θ          every ``every_n_steps`` optimizer steps, after ``warmup_steps``
    d = min(decay, (1 + n) / (10 + n))    n = EMA updates so far (diffusers' ramp: early averages
                                          follow the weights instead of staying near the init)

Only the adapter tensors are averaged (the frozen base never changes). The EMA state lives in
every Lightning checkpoint (this callback's ``state_dict``), so a resumed run continues the same
average. ``AdapterExport`` writes the EMA variant beside the raw adapter (``adapter/ema/``);
``task=sample|eval adapter_variant=ema`` loads it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import lightning as L
import torch
from diffusers.training_utils import EMAModel


class AdapterEMA(L.Callback):
    """Args:
        decay: the EMA decay (the ceiling of the ramp); None: no EMA (the callback does nothing).
        warmup_steps: optimizer steps before averaging starts (the average is the weights until then).
        every_n_steps: update the average every N optimizer steps.
    """

    def __init__(self, decay: float | None = 0.999, warmup_steps: int = 0, every_n_steps: int = 1) -> None:
        if decay is not None and not 0 < decay < 1 or every_n_steps < 1 or warmup_steps < 0:
            raise ValueError(f"EMA decay={decay} must be in (0, 1), every_n_steps={every_n_steps} >= 1, "
                             f"warmup_steps={warmup_steps} >= 0")
        self.decay, self.warmup_steps, self.every = decay, warmup_steps, every_n_steps
        self.ema: EMAModel | None = None
        self._pending: dict[str, Any] | None = None
        self._last_step = -1

    def _params(self, module: L.LightningModule) -> list[torch.nn.Parameter]:
        return list(module.denoiser_lora_params) + list(module.text_lora_params)

    @property
    def active(self) -> bool:
        return self.decay is not None

    def setup(self, trainer: L.Trainer, module: L.LightningModule, stage: str) -> None:
        if not self.active:
            return
        # use_ema_warmup=False is diffusers' (1 + n)/(10 + n) ramp capped at decay
        self.ema = EMAModel(self._params(module), decay=self.decay, use_ema_warmup=False,
                            update_after_step=self.warmup_steps // self.every)
        if self._pending is not None:
            self.ema.load_state_dict(self._pending)
            self._pending = None

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        # setup and a checkpoint's restore run before Lightning moves the module to its device
        if self.active:
            self.ema.to(device=module.device)
        # the optimizer step the weights are at (restored with the checkpoint): the average
        # moves only after the next one, never on a batch that merely accumulated gradients
        self._last_step = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        # once per optimizer step (several batches share one with gradient accumulation)
        if self.active and step != self._last_step:
            self._last_step = step
            if step % self.every == 0:
                self.ema.step(self._params(module))

    @contextlib.contextmanager
    def swapped(self, module: L.LightningModule) -> Iterator[None]:
        """The module holds the EMA weights inside the block, its trained weights again after."""
        params = self._params(module)
        self.ema.store(params)
        self.ema.copy_to(params)
        try:
            yield
        finally:
            self.ema.restore(params)

    def state_dict(self) -> dict[str, Any]:
        return self.ema.state_dict() if self.ema is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.ema is None:
            self._pending = state_dict   # restored at setup, once the parameters exist
        else:
            self.ema.load_state_dict(state_dict)
