"""Test-only callbacks, injected through the real config (``+callbacks.x._target_=tests.helpers.X``)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from safetensors.torch import save_file


class DumpRankLoRA(L.Callback):
    """Each rank writes its LoRA tensors at the end of training (to compare ranks in DDP tests)."""

    def __init__(self, dirpath: str) -> None:
        self.dirpath = Path(dirpath)

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.dirpath.mkdir(parents=True, exist_ok=True)
        sd = {k: v.detach().contiguous() for k, v in module.trainable_state_dict().items()}
        save_file(sd, self.dirpath / f"rank{trainer.global_rank}.safetensors")
