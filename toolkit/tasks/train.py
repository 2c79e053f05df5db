"""Task ``train``: fine-tune LoRA adapters on a frozen pretrained latent-diffusion pipeline.

    python run.py task=train                                   # 1 CPU, embedded default
    python run.py task=train trainer=gpu model=sd15 data=hub data.path=<hub dataset>
    python run.py task=train trainer=ddp trainer.devices=8 trainer.num_nodes=2
    python run.py hydra.run.dir=<run dir> ckpt_path=last             # resume (the run's own settings)

The work is ``toolkit.training.fit.train``; the run's rules (fresh vs resume, ``ckpt_path``,
interrupts) are ``toolkit.run.lifecycle``'s.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from toolkit.training.fit import train


def run(cfg: DictConfig) -> dict[str, Any]:
    return train(cfg)
