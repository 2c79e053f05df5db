"""Task ``pretrain_autoencoder``: train the miniature's AutoencoderKL (32 px -> 8x8x4 latents).

    python run.py experiment=pretrain_autoencoder     # writes <pretrain.miniature_dir>/sd/vae

Data: world base/train images plus procedural textures (``miniature.pretrain.imagery``), so the
AE also reconstructs looks the base world lacks (the striped style a LoRA must learn later).
Reports reconstruction MSE on held-out base and style images.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from diffusers import AutoencoderKL
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch.utils.data import DataLoader, TensorDataset

from miniature.pretrain.autoencoder import latent_std
from miniature.pretrain.export import num_params, save_fp16
from miniature.pretrain.imagery import KINDS, pattern_bank
from miniature.pretrain.measure import reconstruction_mse
from miniature.pretrain.world_data import load_images, read_rows, to_unit
from toolkit.training.trainer import build_trainer

log = logging.getLogger(__name__)


def training_images(world: str, world_limit: int, patterns: int, resolution: int, seed: int,
                    kinds: tuple[str, ...] = KINDS, workers: int = 1) -> torch.Tensor:
    """World images and procedural textures (drawn from ``kinds``), as one uint8 NHWC tensor."""
    rows = read_rows(world, world_limit)
    bank = torch.from_numpy(pattern_bank(patterns, seed, resolution, tuple(kinds), workers))
    return torch.cat([load_images(world, rows, resolution), bank])


def run(cfg: DictConfig) -> dict[str, Any]:
    p = cfg.pretrain
    L.seed_everything(cfg.seed, workers=True)
    images = training_images(p.data.world, p.data.world_limit, p.data.patterns, p.data.resolution,
                             cfg.seed + p.data.seed_offset, p.data.kinds, p.data.workers)
    loader = DataLoader(TensorDataset(to_unit(images)), batch_size=p.data.batch_size, shuffle=True,
                        drop_last=True)
    module = instantiate(p.module)
    trainer = build_trainer(cfg)
    start = time.time()
    trainer.fit(module, train_dataloaders=loader, ckpt_path=cfg.get("ckpt_path"))
    train_s = time.time() - start

    vae = module.vae.eval()
    base = to_unit(images[: min(len(images), p.scaling_images)])
    std = latent_std(vae, base, seed=cfg.seed)
    if p.module.get("train_encoder", True):
        vae.register_to_config(scaling_factor=1.0 / std)
    else:   # same encoder, same latent space: keep the scale the UNet was trained with
        vae.register_to_config(scaling_factor=AutoencoderKL.load_config(p.module.init_from)["scaling_factor"])
    metrics: dict[str, Any] = {"global_step": trainer.global_step, "train_seconds": train_s,
                               "params": num_params(vae), "latent_std": std,
                               "scaling_factor": vae.config.scaling_factor}
    for name, folder in p.eval.items():
        rows = read_rows(folder, p.eval_images)
        x = to_unit(load_images(folder, rows, p.data.resolution))
        metrics[f"mse_{name}"] = reconstruction_mse(vae, x)
    if trainer.is_global_zero:
        out = save_fp16(vae, Path(p.miniature_dir) / "sd" / "vae")
        (Path(cfg.paths.output_dir) / "metrics.json").write_text(json.dumps(metrics, indent=2))
        log.info("autoencoder -> %s: %s", out, metrics)
    return metrics
