"""Write the LoRA adapter in diffusers format next to every checkpoint and at the end of training.

``<checkpoint dir>/adapters/step=N/pytorch_lora_weights.safetensors`` at each save, and
``<output dir>/adapter/`` when training ends. Rank zero only.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L

from toolkit.models.lora import save_adapter

log = logging.getLogger(__name__)


class AdapterExport(L.Callback):
    """Args:
        dirpath: where the final adapter goes (``<run dir>/adapter``).
        every_checkpoint: also export next to each Lightning checkpoint.
    """

    def __init__(self, dirpath: str, every_checkpoint: bool = True) -> None:
        self.dirpath, self.every_checkpoint = Path(dirpath), every_checkpoint
        self._exported_step = -1  # "last" and "step=N" checkpoints of one step share one export

    def _export(self, trainer: L.Trainer, module: L.LightningModule, out: Path) -> None:
        if trainer.is_global_zero:
            path = save_adapter(out, module.unet, module.text_encoder)
            log.info("adapter written: %s", path)

    def on_save_checkpoint(self, trainer: L.Trainer, module: L.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        if (self.every_checkpoint and trainer.checkpoint_callback is not None
                and trainer.global_step != self._exported_step):
            self._exported_step = trainer.global_step
            ckpt_dir = Path(trainer.checkpoint_callback.dirpath)
            self._export(trainer, module, ckpt_dir / "adapters" / f"step={trainer.global_step}")

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if any(getattr(cb, "preempted_at", None) is not None for cb in trainer.callbacks):
            return   # stopped early: the final adapter is written by the resumed run
        self._export(trainer, module, self.dirpath)
