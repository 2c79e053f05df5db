"""Fine-tune LoRA adapters on a frozen pretrained latent-diffusion pipeline: the body of
``task=train`` (and of the training half of ``task=finetune_eval``).

Everything that can be checked without model weights is checked first: the model and data
locations, the data (scan, columns, batch split) and the resolution against the VAE config.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig

from toolkit.config import in_multirun
from toolkit.data.buckets import STEP as BUCKET_STEP
from toolkit.locate import check_local_or_hub
from toolkit.models.pretrained import check_resolution
from toolkit.run import lifecycle, signals
from toolkit.run.identity import RESUMABLE, Identity, identity, started_from, write_record
from toolkit.run.launch import check_world_size
from toolkit.run.resume import relaunch_as_cell, resume_command
from toolkit.training.trainer import build_trainer, join_job

log = logging.getLogger(__name__)


def train(cfg: DictConfig, ident: Identity | None = None) -> dict[str, Any]:
    """Train with ``cfg`` (the composed root config); the final metrics, also in ``train_metrics.json``.
    ``ident``: the run's identity (``toolkit.run.identity``, view ``run``), recorded in ``<run>/identity.json``."""
    output_dir = Path(cfg.paths.output_dir)
    resume = resume_command(output_dir)
    ident = ident or identity(cfg, "run")
    if in_multirun():   # a sweep run again: its own finished cell is reused, its interrupted one resumed
        cfg, done = lifecycle.reuse_or_resume(cfg, output_dir, ident)
        if done is not None:
            return done
    if cfg.ckpt_path is None:
        lifecycle.check_fresh(output_dir, resume)
    elif started_from(cfg) is None:   # a resume of this run: its identity, but for how long it trains
        lifecycle.check_identity(output_dir, ident, RESUMABLE, "resume")
    L.seed_everything(cfg.seed, workers=True, verbose=False)

    check_world_size(cfg.trainer.devices, cfg.trainer.get("num_nodes", 1))
    trainer = build_trainer(cfg)
    ckpt_path = join_job(trainer, output_dir, cfg.ckpt_path)
    if trainer.is_global_zero:
        log.info("run dir %s (resume: %s)", output_dir, resume)
        if ckpt_path:
            log.info("starting from checkpoint %s", ckpt_path)
        write_record(output_dir, ident, cfg)   # what this folder's training is: a re-run or resume compares it
    check_local_or_hub(cfg.model.name_or_path, "model.name_or_path", "model", cfg.model.revision)
    datamodule = instantiate(cfg.data)
    datamodule.trainer = trainer
    datamodule.setup("fit")
    check_resolution(cfg.model.name_or_path, datamodule.resolution, cfg.model.revision, cfg.model.get("config"),
                     datamodule.buckets.get("step", BUCKET_STEP) if datamodule.buckets else None)
    module = instantiate(cfg.module)
    if in_multirun():   # DDP in a sweep cell: the other ranks must run this cell, not the sweep
        relaunch_as_cell(cfg.ckpt_path)

    try:
        lifecycle.fit(trainer, module, datamodule, ckpt_path)
    except lifecycle.Interrupted:
        lifecycle.exit_interrupted(trainer, output_dir, resume)
    except signals.Stop as stop:
        lifecycle.stopped(stop, resume)

    # the run's figures (logged-only ones, like the learning-rate monitor's, stay in the logs: their last
    # value depends on how often the loggers write)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("train/", "val/"))}
    metrics.update(lr=float(trainer.optimizers[0].param_groups[0]["lr"]), global_step=trainer.global_step,
                   adapter=str(output_dir / "adapter"))
    if trainer.is_global_zero:
        (output_dir / "train_metrics.json").write_text(json.dumps(metrics, indent=2))
        log.info("train metrics (%s): %s", output_dir / "train_metrics.json",
                 " · ".join(f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, float)))
    return metrics
