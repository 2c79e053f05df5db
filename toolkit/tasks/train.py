"""Task ``train``: fine-tune LoRA adapters on a frozen pretrained latent-diffusion pipeline.

    python run.py task=train                                   # 1 CPU, embedded default
    python run.py task=train trainer=gpu model=sd15 data=hub data.path=<hub dataset>
    python run.py task=train trainer=ddp trainer.devices=8 trainer.num_nodes=2
    python run.py task=train hydra.run.dir=<run dir> ckpt_path=last   # resume
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig

from toolkit.training import build_trainer

log = logging.getLogger(__name__)


def check_fresh_run_dir(output_dir: Path, ckpt_path: str | None) -> None:
    """Refuse to start a fresh run over another run's checkpoints (resuming is explicit)."""
    ckpts = list((output_dir / "checkpoints").glob("*.ckpt"))
    if ckpts and ckpt_path is None:
        raise FileExistsError(
            f"{output_dir} already holds {len(ckpts)} checkpoint(s) of an earlier run. Resume it with "
            "ckpt_path=last, or start a fresh run in another directory (hydra.run.dir=...)."
        )


def run(cfg: DictConfig) -> dict[str, Any]:
    output_dir = Path(cfg.paths.output_dir)
    check_fresh_run_dir(output_dir, cfg.ckpt_path)
    L.seed_everything(cfg.seed, workers=True)

    datamodule = instantiate(cfg.data)
    module = instantiate(cfg.module)
    trainer = build_trainer(cfg)

    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path)

    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    metrics.update(global_step=trainer.global_step, adapter=str(output_dir / "adapter"))
    if trainer.is_global_zero:
        (output_dir / "train_metrics.json").write_text(json.dumps(metrics, indent=2))
        log.info("train metrics: %s", metrics)
    return metrics
