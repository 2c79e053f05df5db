"""Task ``train``: fine-tune LoRA adapters on a frozen pretrained latent-diffusion pipeline.

    python run.py task=train                                   # 1 CPU, embedded default
    python run.py task=train trainer=gpu model=sd15 data=hub data.path=<hub dataset>
    python run.py task=train trainer=ddp trainer.devices=8 trainer.num_nodes=2
    python run.py task=train hydra.run.dir=<run dir> ckpt_path=last   # resume
"""

from __future__ import annotations

import json
import logging
import pickle
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig

from toolkit.models.pretrained import check_resolution
from toolkit.training import build_trainer

log = logging.getLogger(__name__)
PREEMPTED_EXIT_CODE = 143   # 128 + SIGTERM: what schedulers expect from a job stopped by a signal


def check_fresh_run_dir(output_dir: Path, ckpt_path: str | None) -> None:
    """Refuse to start a fresh run over another run's checkpoints (resuming is explicit)."""
    ckpts = list((output_dir / "checkpoints").glob("*.ckpt"))
    if ckpts and ckpt_path is None:
        raise FileExistsError(
            f"{output_dir} already holds {len(ckpts)} checkpoint(s) of an earlier run. Resume it with "
            "ckpt_path=last, or start a fresh run in another directory (hydra.run.dir=...)."
        )


def fit(trainer: L.Trainer, module: L.LightningModule, datamodule: L.LightningDataModule,
        ckpt_path: str | None) -> None:
    """``trainer.fit`` that reads checkpoints with ``weights_only=True`` (tensors and plain
    containers only: a pickle cannot run code on load) and explains a refused file."""
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"refused to load checkpoint {ckpt_path!r}: it holds Python objects beyond tensors and "
            f"plain containers, and unpickling those can execute arbitrary code ({str(err).splitlines()[0]}). "
            "Resume only from checkpoints this toolkit wrote; to start from foreign LoRA weights, "
            "convert them to safetensors first.") from None


def run(cfg: DictConfig) -> dict[str, Any]:
    output_dir = Path(cfg.paths.output_dir)
    check_fresh_run_dir(output_dir, cfg.ckpt_path)
    L.seed_everything(cfg.seed, workers=True)

    # Everything that can be checked without model weights is checked first: the data (scan,
    # columns, batch split) and the resolution against the VAE config.
    trainer = build_trainer(cfg)
    datamodule = instantiate(cfg.data)
    datamodule.trainer = trainer
    datamodule.setup("fit")
    check_resolution(cfg.model.name_or_path, datamodule.resolution, cfg.model.revision)
    module = instantiate(cfg.module)

    fit(trainer, module, datamodule, cfg.ckpt_path)
    preempted = [cb.preempted_at for cb in trainer.callbacks if getattr(cb, "preempted_at", None) is not None]
    if preempted:
        log.warning("run stopped by a signal at step %d; resume with: python run.py task=train "
                    "hydra.run.dir=%s ckpt_path=last", preempted[0], output_dir)
        raise SystemExit(PREEMPTED_EXIT_CODE)

    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    metrics.update(global_step=trainer.global_step, adapter=str(output_dir / "adapter"))
    if trainer.is_global_zero:
        (output_dir / "train_metrics.json").write_text(json.dumps(metrics, indent=2))
        log.info("train metrics: %s", metrics)
    return metrics
