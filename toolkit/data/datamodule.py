"""LightningDataModule over a captioned image dataset (hub, imagefolder or sidecar captions).

Batch size is stated globally: ``global_batch_size = per_device × world_size × accumulation``;
the per-device size is derived at setup and a non-divisible setting fails with what to change.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

from toolkit.data.sources import load_captioned
from toolkit.data.transforms import train_transform

log = logging.getLogger(__name__)


def per_device_batch_size(global_batch_size: int, world_size: int, accumulation: int) -> int:
    denom = world_size * accumulation
    if global_batch_size % denom:
        raise ValueError(
            f"data.global_batch_size={global_batch_size} is not divisible by world_size ({world_size}) "
            f"× trainer.accumulate_grad_batches ({accumulation}) = {denom}; use a multiple of {denom}."
        )
    return global_batch_size // denom


class CaptionedImages(torch.utils.data.Dataset):
    """Wraps an HF dataset: decodes, transforms and returns ``(pixel_values, caption)``."""

    def __init__(self, ds: Any, image_column: str, caption_column: str, resolution: int,
                 center_crop: bool, random_flip: bool) -> None:
        self.ds, self.image_column, self.caption_column = ds, image_column, caption_column
        self.resolution, self.center_crop, self.random_flip = resolution, center_crop, random_flip

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> dict[str, Any]:
        row = self.ds[i]
        rng = np.random.default_rng(int(torch.randint(2**31, (1,))))  # seeded per worker by Lightning
        pixels = train_transform(row[self.image_column], self.resolution, self.center_crop,
                                 self.random_flip, rng)
        return {"pixel_values": pixels, "caption": str(row[self.caption_column] or "")}


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    return {"pixel_values": torch.stack([it["pixel_values"] for it in items]),
            "captions": [it["caption"] for it in items]}


class CaptionedImageDataModule(L.LightningDataModule):
    """Args:
        path: hub dataset id or local folder.
        resolution: training side length in pixels.
        global_batch_size: images per optimizer step summed over devices and accumulation.
        image_column / caption_column: column names.
        split: split to train on; ``validation_split`` names a split for validation, else
            ``val_fraction`` of the training split is held out (seeded).
        center_crop / random_flip: augmentation.
        num_workers / pin_memory: dataloader settings.
        seed: seed of the train/validation split.
    """

    def __init__(self, path: str, resolution: int = 512, global_batch_size: int = 16,
                 image_column: str = "image", caption_column: str = "text", split: str = "train",
                 validation_split: str | None = None, val_fraction: float = 0.0,
                 center_crop: bool = True, random_flip: bool = False, num_workers: int = 0,
                 pin_memory: bool = False, revision: str | None = None, seed: int = 0) -> None:
        super().__init__()
        self.path, self.resolution, self.global_batch_size = path, resolution, global_batch_size
        self.image_column, self.caption_column, self.split = image_column, caption_column, split
        self.validation_split, self.val_fraction, self.revision = validation_split, val_fraction, revision
        self.center_crop, self.random_flip, self.seed = center_crop, random_flip, seed
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.train_set = self.val_set = None

    def _wrap(self, ds: Any, train: bool) -> CaptionedImages:
        return CaptionedImages(ds, self.image_column, self.caption_column, self.resolution,
                               self.center_crop or not train, self.random_flip and train)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        trainer = self.trainer
        world, accum = (trainer.world_size, trainer.accumulate_grad_batches) if trainer else (1, 1)
        self.batch_size = per_device_batch_size(self.global_batch_size, world, accum)
        kw = {"image_column": self.image_column, "caption_column": self.caption_column,
              "revision": self.revision}
        train = load_captioned(self.path, split=self.split, **kw)
        val = None
        if self.validation_split:
            val = load_captioned(self.path, split=self.validation_split, **kw)
        elif self.val_fraction > 0:
            parts = train.train_test_split(test_size=self.val_fraction, seed=self.seed)
            train, val = parts["train"], parts["test"]
        self.train_set = self._wrap(train, train=True)
        self.val_set = self._wrap(val, train=False) if val is not None else None
        log.info("data: %d train / %d val images from %s, per-device batch %d",
                 len(self.train_set), len(self.val_set or []), self.path, self.batch_size)

    def _loader(self, ds: CaptionedImages, shuffle: bool) -> DataLoader:
        return DataLoader(ds, batch_size=self.batch_size, shuffle=shuffle, collate_fn=collate,
                          num_workers=self.num_workers, pin_memory=self.pin_memory,
                          drop_last=shuffle, persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        return self._loader(self.val_set, shuffle=False) if self.val_set is not None else []


def batch_size(batch: dict[str, Any]) -> int:
    """Images in a batch (for Lightning's ThroughputMonitor)."""
    return len(batch["captions"])
