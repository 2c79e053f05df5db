"""Task ``pretrain_unet``: train the miniature's UNet and write the whole pipeline.

    python run.py experiment=pretrain_unet      # needs sd/vae and clip/ from the other two tasks

Frozen: the autoencoder (``<miniature_dir>/sd/vae``) and the CLIP text tower
(``<miniature_dir>/clip``); their outputs are cached once (``miniature.pretrain.latent_cache``).
Writes ``<miniature_dir>/sd`` as a StableDiffusionPipeline directory.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import lightning as L
from diffusers import AutoencoderKL
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch.utils.data import DataLoader
from transformers import CLIPModel

from miniature.pretrain.clip import text_encoder_from_clip
from miniature.pretrain.export import assemble_pipeline, num_params
from miniature.pretrain.latent_cache import build_cache
from miniature.pretrain.world_data import load_images, read_rows, to_unit
from miniature.tokenizer import load_clip_tokenizer
from toolkit.training.trainer import build_trainer

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> dict[str, Any]:
    p = cfg.pretrain
    root = Path(p.miniature_dir)
    L.seed_everything(cfg.seed, workers=True)
    vae = AutoencoderKL.from_pretrained(root / "sd" / "vae").eval()
    text_encoder = text_encoder_from_clip(CLIPModel.from_pretrained(root / "clip"))
    tokenizer = load_clip_tokenizer(root / "clip")

    start = time.time()
    rows = read_rows(p.data.world, p.data.limit)
    images = to_unit(load_images(p.data.world, rows, p.data.resolution))
    cache = build_cache(vae, text_encoder, tokenizer, images, [r["text"] for r in rows])
    cache_s = time.time() - start
    log.info("cached %d latents, %d distinct prompts in %.0f s", len(cache),
             len(cache.prompt_embeds), cache_s)
    loader = DataLoader(cache, batch_size=p.data.batch_size, shuffle=True, drop_last=True,
                        collate_fn=cache.collate)

    # The latent scale is read from the trained VAE, not repeated in the config.
    module = instantiate(p.module, scaling_factor=vae.config.scaling_factor)
    trainer = build_trainer(cfg)
    start = time.time()
    trainer.fit(module, train_dataloaders=loader, ckpt_path=cfg.get("ckpt_path"))
    train_s = time.time() - start

    metrics = {"global_step": trainer.global_step, "train_seconds": train_s, "cache_seconds": cache_s,
               "params": num_params(module.unet), "prompts": len(cache.prompt_embeds),
               **{k: float(v) for k, v in trainer.callback_metrics.items()}}
    if trainer.is_global_zero:
        out = assemble_pipeline(root / "sd", module.unet.eval(), text_encoder, module.noise_scheduler)
        (Path(cfg.paths.output_dir) / "metrics.json").write_text(json.dumps(metrics, indent=2))
        log.info("pipeline -> %s: %s", out, metrics)
    return metrics
