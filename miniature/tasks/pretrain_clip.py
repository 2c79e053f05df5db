"""Task ``pretrain_clip``: train the miniature's CLIP on world captions (with hard negatives).

    python run.py experiment=pretrain_clip          # writes <pretrain.miniature_dir>/clip

Saves ``CLIPModel`` + tokenizer + ``CLIPImageProcessor`` (so ``CLIPProcessor.from_pretrained``
works) and reports the attribute-binding rates on held-out base images.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch.utils.data import DataLoader
from transformers import CLIPImageProcessor

from miniature.pretrain.clip import CLIP_MEAN, CLIP_STD, CaptionedWorld, collate, normalise
from miniature.pretrain.export import copy_tokenizer, num_params, save_fp16
from miniature.pretrain.measure import attribute_binding
from miniature.pretrain.world_data import load_images, read_rows
from toolkit.training.trainer import build_trainer

log = logging.getLogger(__name__)


def image_processor(resolution: int) -> CLIPImageProcessor:
    """Resize + centre-crop to the vision tower's side, OpenAI CLIP normalisation."""
    return CLIPImageProcessor(size={"shortest_edge": resolution},
                              crop_size={"height": resolution, "width": resolution},
                              image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))


def run(cfg: DictConfig) -> dict[str, Any]:
    p = cfg.pretrain
    L.seed_everything(cfg.seed, workers=True)
    images, rows = [], []
    for folder in p.data.folders:
        r = read_rows(folder.path, folder.limit)
        images.append(load_images(folder.path, r, p.data.resolution))
        rows += r
    dataset = CaptionedWorld(torch.cat(images), rows, p.data.swaps)
    loader = DataLoader(dataset, batch_size=p.data.batch_size, shuffle=True, drop_last=True,
                        collate_fn=collate)
    module = instantiate(p.module)
    trainer = build_trainer(cfg)
    start = time.time()
    trainer.fit(module, train_dataloaders=loader)
    train_s = time.time() - start

    model = module.model.eval()
    eval_rows = read_rows(p.eval.folder, p.eval.images)
    pixels = normalise(load_images(p.eval.folder, eval_rows, p.data.resolution))
    rates = attribute_binding(model, module.tokenizer, pixels, eval_rows, seed=cfg.seed)
    metrics = {"global_step": trainer.global_step, "train_seconds": train_s,
               "params": num_params(model), "text_params": num_params(model.text_model),
               **{f"binding_{k}": v for k, v in rates.items()}}
    if trainer.is_global_zero:
        out = save_fp16(model, Path(p.miniature_dir) / "clip")
        copy_tokenizer(out)
        image_processor(p.data.resolution).save_pretrained(out)
        (Path(cfg.paths.output_dir) / "metrics.json").write_text(json.dumps(metrics, indent=2))
        log.info("clip -> %s: %s", out, metrics)
    return metrics
