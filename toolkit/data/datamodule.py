"""LightningDataModule over a captioned image dataset (hub, imagefolder or sidecar captions).

Batch size is stated globally: ``global_batch_size = per_device × world_size × accumulation``;
the per-device size is derived at setup and a non-divisible setting fails with what to change.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

from toolkit.data.buckets import BucketBatchSampler, make_buckets, nearest_bucket
from toolkit.data.captions import TagPolicy, tag_caption
from toolkit.data.masks import load_mask
from toolkit.data.prepared import PreparedDataset
from toolkit.data.sampler import ResumableLoader, ResumableSampler, ShardBatches
from toolkit.data.sources import CAPTION_PROBLEM, fingerprint_listing, split_train_val
from toolkit.data.transforms import train_transform
from toolkit.data.validate import (
    BadItem,
    DataPolicy,
    ScanResult,
    check_caption,
    decode_image,
    item_name,
    load_scan,
    require_items,
    save_scan,
    scan,
)

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
    """Wraps an HF dataset: decodes (under ``policy``), transforms and returns
    ``{pixel_values, caption}``; an item that fails to decode returns None (logged; dropped by
    ``collate``). Index with ``(epoch, i)`` (``ResumableSampler``) for augmentation drawn from a
    generator seeded with ``(seed, epoch, i)``, or with ``i``. Each item carries its ``key``
    ``(epoch, i, role)`` (role 0: the item, 1: its paired class image), from which the training
    step seeds the item's own random draws (``toolkit.reproducibility.SampleDraws``)."""

    def __init__(self, ds: Any, image_column: str, caption_column: str, resolution: int,
                 center_crop: bool, random_flip: bool, policy: DataPolicy, seed: int = 0,
                 indices: list[int] | None = None, tags: TagPolicy | None = None, masks: str | None = None) -> None:
        self.ds, self.image_column, self.caption_column = ds, image_column, caption_column
        self.resolution, self.center_crop, self.random_flip = resolution, center_crop, random_flip
        self.policy, self.seed, self.tags, self.masks = policy, seed, tags or TagPolicy(), masks
        self.prior: CaptionedImages | None = None   # class images (prior preservation), one per item
        self.prior_weight = 1.0
        self.indices = list(range(len(ds))) if indices is None else indices
        # (latent store, micro-conditioning store, mask store or None, key per kept row): EncodedCache
        self.latents: tuple[Any, Any, Any, dict[int, str]] | None = None
        self.sizes: list[tuple[int, int]] | None = None     # bucket (width, height) per kept item

    def __len__(self) -> int:
        return len(self.indices)

    def raw(self, i: int) -> tuple[Any, Any, str | None]:
        """(image item, caption, caption problem) of underlying row ``i`` (for the scan)."""
        row = self.ds[i]
        return row[self.image_column], row[self.caption_column], row.get(CAPTION_PROBLEM)

    def target_size(self, i: int) -> int | tuple[int, int]:
        """Training size of kept item ``i``: its bucket's (width, height), or the resolution."""
        return self.sizes[i] if self.sizes is not None else self.resolution

    def captions(self) -> list[str]:
        """The training captions of the kept rows."""
        rows = self.ds.select_columns([c for c in (self.caption_column, CAPTION_PROBLEM) if c in self.ds.column_names])
        out = []
        for i in self.indices:
            row = rows[i]
            with contextlib.suppress(BadItem):   # rejected by the scan already
                out.append(check_caption(row[self.caption_column], row.get(CAPTION_PROBLEM), self.policy))
        return out

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any] | None:
        epoch, i = key if isinstance(key, tuple) else (0, key)
        row = self.indices[i]
        rng = np.random.default_rng([self.seed, epoch, i])
        item = self._item(row, i, rng)
        if item is not None:
            item["key"] = (epoch, i, 0)
        if item is not None and self.tags.varies:   # own generator: independent of the image draws
            tag_rng = np.random.default_rng([self.seed, epoch, i, 1])
            item["caption"] = tag_caption(item["caption"], self.tags, tag_rng)
        if item is not None and self.prior is not None:   # the paired class image, from (seed, epoch, item)
            j = int(np.random.default_rng([self.seed, epoch, i, 2]).integers(len(self.prior)))
            item["prior"] = {**self.prior[(epoch, j)], "weight": self.prior_weight, "key": (epoch, i, 1)}
        return item

    def _item(self, row: int, i: int, rng: np.random.Generator) -> dict[str, Any] | None:
        if self.latents is not None:   # cached posterior parameters: the same flip draw as below
            store, micro, masks, keys = self.latents
            _, caption, problem = self.raw(row)
            text = check_caption(caption, problem, self.policy)
            flip = int(self.random_flip and rng.random() < 0.5)
            item = {"latent_params": torch.from_numpy(np.array(store.get(keys[row])[flip], np.float32)),
                    "micro": torch.from_numpy(np.array(micro.get(keys[row])[flip], np.float32)), "caption": text}
            if masks is not None:   # stored on the latent grid
                item["mask"] = torch.from_numpy(np.array(masks.get(keys[row])[flip], np.float32))
            return item
        image, caption, problem = self.raw(row)
        try:
            text = check_caption(caption, problem, self.policy)
            img, _ = decode_image(image, self.policy, self.policy.min_side or self.resolution)
            mask = load_mask(image, self.masks, self.policy, img.size) if self.masks else None
        except BadItem as bad:   # changed since the scan (or no scan): skip it, loudly
            log.warning("skipping %s: %s", item_name(image, i), bad)
            return None
        # the mask gets the same crop and flip draws as its image (a copy costs ~0.1 ms: only with a mask)
        mask_rng = copy.deepcopy(rng) if mask is not None else None
        pixels, micro = train_transform(img, self.target_size(i), self.center_crop, self.random_flip, rng)
        item = {"pixel_values": pixels, "micro": torch.tensor(micro, dtype=torch.float32), "caption": text}
        if mask is not None:
            m, _ = train_transform(mask.convert("RGB"), self.target_size(i), self.center_crop, self.random_flip,
                                   mask_rng)
            item["mask"] = (m[:1] + 1) / 2
        return item


def scan_split(ds: CaptionedImages, path: str, where: list[Any], cache_dir: str | None, name: str) -> ScanResult:
    """The data policy over every row of ``ds`` (``toolkit.data.validate.scan``), cached under a key of
    the rows' source and their place in it (``where``: revision, split, held-out definition, part
    name), the columns, the resolution, the policy and the source's file listing or fingerprint. The
    training run's scan of its held-out part and an evaluation of that part against it share it."""
    if isinstance(ds.ds, PreparedDataset):   # the policy ran when it was prepared (its report lists why)
        return ds.ds.scan_result()
    local = Path(str(path)).expanduser()
    settings = [str(path), *where, len(ds), ds.image_column, ds.caption_column, ds.resolution, repr(ds.policy),
                fingerprint_listing(local) if local.is_dir() else ds.ds._fingerprint]
    key = hashlib.sha256(json.dumps(settings, default=str).encode()).hexdigest()[:16]
    cache = Path(cache_dir) / f"{key}.json" if cache_dir else None
    if cache is not None and (hit := load_scan(cache)) is not None:
        log.debug("data scan (%s): cached %s", name, cache)
        return hit
    result = scan(len(ds), ds.raw, ds.policy, ds.policy.min_side or ds.resolution or 1, desc=f"scanning {name} data")
    if cache is not None:
        save_scan(result, cache)
    return result


def collate(items: list[dict[str, Any] | None]) -> dict[str, Any]:
    items = [it for it in items if it is not None]
    if not items:
        raise RuntimeError("every item of a batch failed to decode; see the warnings above")
    if "prior" in items[0]:   # instance images first, then their class images (prior preservation)
        priors = [it.pop("prior") for it in items]
        batch = collate(items + priors)
        batch["prior"] = torch.tensor([0.0] * len(items) + [1.0] * len(priors))
        batch["prior_weight"] = float(priors[0]["weight"])
        return batch
    field = "latent_params" if "latent_params" in items[0] else "pixel_values"
    batch = {field: torch.stack([it[field] for it in items]), "micro": torch.stack([it["micro"] for it in items]),
             "captions": [it["caption"] for it in items], "keys": torch.tensor([it["key"] for it in items])}
    if "mask" in items[0]:
        batch["mask"] = torch.stack([it["mask"] for it in items])
    return batch


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
        seed: seed of the train/validation split, the data order and the augmentation.
        policy: ``DataPolicy`` fields (bad files, small images, captions, alpha, scan).
        buckets: aspect-ratio buckets ``{step, max_aspect}`` (``toolkit.data.buckets``); None:
            every image is cropped to a ``resolution`` square. Needs ``policy.scan`` (image sizes).
        report_dir: where ``data_report.json`` (rejected and converted items) is written.
        scan_cache_dir: scan results, keyed by dataset fingerprint + policy (None: no cache).
        tags: tag-style captions (``toolkit.data.captions.TagPolicy``: shuffle, keep_tokens,
            dropout, separator), applied to training captions only.
        masks: per-image loss masks for training images: ``alpha`` or a folder of masks
            (``toolkit.data.masks``); None: no masks.
        local: node-local folder a prepared dataset's shards are fetched to (``data.path`` a
            ``task=prepare`` output: a folder or ``s3://``).
        remote: ``data=streaming``'s name for that output (``data.path`` follows it).
    """

    def __init__(self, path: str, resolution: int | None = None, global_batch_size: int = 16,
                 image_column: str = "image", caption_column: str = "text", split: str = "train",
                 validation_split: str | None = None, val_fraction: float = 0.0,
                 center_crop: bool = True, random_flip: bool = False, num_workers: int = 0,
                 pin_memory: bool = False, revision: str | None = None, seed: int = 0,
                 policy: DataPolicy | dict | None = None, buckets: dict | None = None,
                 report_dir: str | None = None, scan_cache_dir: str | None = None,
                 tags: TagPolicy | dict | None = None, masks: str | None = None, local: str | None = None,
                 remote: str | None = None) -> None:
        super().__init__()
        if remote is not None and str(remote) != str(path):   # data=streaming: path interpolates remote
            raise ValueError(f"data.remote={remote!r} and data.path={path!r}: give one (data=streaming reads remote)")
        self.path, self.resolution, self.global_batch_size = path, resolution, global_batch_size
        self.image_column, self.caption_column, self.split = image_column, caption_column, split
        self.validation_split, self.val_fraction, self.revision = validation_split, val_fraction, revision
        self.center_crop, self.random_flip, self.seed = center_crop, random_flip, seed
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.policy = policy if isinstance(policy, DataPolicy) else DataPolicy(**(policy or {}))
        self.report_dir, self.scan_cache_dir, self.local = report_dir, scan_cache_dir, local
        self.buckets = dict(buckets) if buckets else None
        self.tags = tags if isinstance(tags, TagPolicy) else TagPolicy(**(tags or {}))
        if masks not in (None, "alpha") and not Path(str(masks)).expanduser().is_dir():
            raise FileNotFoundError(f"data.masks={masks!r}: expected alpha or a folder of masks (one per image, same "
                                    "file stem); no such folder")
        self.masks = masks
        if self.buckets and not self.policy.scan:
            raise ValueError("data.buckets needs data.policy.scan=true (the scan measures every image's size)")
        self.train_set = self.val_set = None
        self.rank, self.world_size, self.accumulation = 0, 1, 1

    def _wrap(self, ds: Any, train: bool) -> CaptionedImages:
        return CaptionedImages(ds, self.image_column, self.caption_column, self.resolution,
                               self.center_crop or not train, self.random_flip and train,
                               self.policy, self.seed, tags=self.tags if train else None,
                               masks=self.masks if train else None)

    def _scan(self, ds: CaptionedImages, name: str) -> ScanResult:
        return scan_split(ds, self.path, [self.revision, self.split, self.validation_split, self.val_fraction,
                                          self.seed, name], self.scan_cache_dir, name)

    def _scan_once(self) -> dict[str, ScanResult]:
        """The scans of the train and val sets, run once per job: processes that already share a
        process group (torchrun, srun: ``training.trainer.join_job``) take rank zero's results, and an
        error there is raised on every rank."""
        import torch.distributed as dist

        sets = [(name, ds) for name, ds in (("train", self.train_set), ("val", self.val_set)) if ds is not None]
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return {name: self._scan(ds, name) for name, ds in sets}
        outcome: tuple[dict[str, ScanResult] | None, Exception | None] = (None, None)
        if dist.get_rank() == 0:
            try:
                outcome = ({name: self._scan(ds, name) for name, ds in sets}, None)
            except Exception as err:   # noqa: BLE001 - re-raised below, on every rank
                outcome = (None, err)
        results, error = self.trainer.strategy.broadcast(outcome, 0)
        if error is not None:
            raise error
        return results

    def setup(self, stage: str | None = None) -> None:
        """Load, split and scan the data; fails (before any model is loaded, when the task calls
        it first) on a bad setting or on a dataset with too few usable items."""
        if self.train_set is not None:
            return
        trainer = self.trainer
        world, accum = (trainer.world_size, trainer.accumulate_grad_batches) if trainer else (1, 1)
        self.rank, self.world_size = (trainer.global_rank, world) if trainer else (0, 1)
        self.accumulation = accum
        self.batch_size = per_device_batch_size(self.global_batch_size, world, accum)
        if self.resolution is None:
            raise ValueError("data.resolution is null: run.py sets it to the model's native size "
                             "(toolkit.model_defaults); composed by hand, set it.")
        train, val = split_train_val(self.path, self.split, self.validation_split, self.val_fraction, self.seed,
                                     self.image_column, self.caption_column, self.revision, self.local)
        self.train_set = self._wrap(train, train=True)
        self.val_set = self._wrap(val, train=False) if val is not None else None
        if isinstance(train, PreparedDataset):   # never rescanned: its prepare's policy must be this run's
            train.check_plan(self.policy.min_side or self.resolution, self.policy)
        if self.policy.scan:
            report = self._scan_once()
            for name, ds in (("train", self.train_set), ("val", self.val_set)):
                if ds is not None:
                    result = report[name]
                    ds.indices = result.keep
                    if self.buckets:
                        sizes = make_buckets(self.resolution, **self.buckets)
                        ds.sizes = [sizes[nearest_bucket(w, h, sizes)] for w, h in result.sizes]
                    (log.warning if result.rejected else log.info)("data scan (%s): %s", name, result.summary())
            if self.report_dir and self.rank == 0:
                for name, result in report.items():
                    save_scan(result, Path(self.report_dir) / f"data_report_{name}.json")
            require_items(report["train"], self.path, [self.global_batch_size])
        log.info("data: %d train / %d val images from %s, per-device batch %d",
                 len(self.train_set), len(self.val_set or []), self.path, self.batch_size)

    def attach_prior(self, ds: Any, weight: float) -> None:
        """Class images (a generated image folder) paired with every training item."""
        if self.buckets:
            raise ValueError("prior preservation with aspect-ratio buckets is not supported (the class images are "
                             "square and a batch must be one shape): set data.buckets=null")
        if self.masks:
            raise ValueError("prior preservation with loss masks (data.masks) is not supported (the class images "
                             "have no masks): set data.masks=null or drop callbacks.prior.class_prompt")
        self.train_set.prior = CaptionedImages(ds, "image", "text", self.resolution, self.center_crop,
                                               self.random_flip, self.policy, self.seed)
        self.train_set.prior_weight = weight

    def _bucket_sampler(self, ds: CaptionedImages, shuffle: bool, accumulation: int) -> BucketBatchSampler:
        bucket_of = [sorted(set(ds.sizes)).index(s) for s in ds.sizes]
        return BucketBatchSampler(bucket_of, self.batch_size, self.seed, shuffle, self.rank, self.world_size,
                                  accumulation)

    def train_dataloader(self) -> DataLoader:
        kw = {"collate_fn": collate, "num_workers": self.num_workers, "pin_memory": self.pin_memory,
              "persistent_workers": self.num_workers > 0}
        if self.train_set.sizes is not None:
            order = self._bucket_sampler(self.train_set, True, self.accumulation)
        else:
            order = ResumableSampler(len(self.train_set), self.batch_size, self.seed, True, self.rank,
                                     self.world_size, self.accumulation)
        return ResumableLoader(self.train_set, order, **kw)

    def val_dataloader(self) -> DataLoader | list:
        if self.val_set is None or len(self.val_set) < self.world_size:
            return []
        kw = {"collate_fn": collate, "num_workers": self.num_workers, "pin_memory": self.pin_memory}
        if self.val_set.sizes is not None:
            return DataLoader(self.val_set, batch_sampler=self._bucket_sampler(self.val_set, False, 1), **kw)
        return DataLoader(self.val_set, batch_sampler=ShardBatches(len(self.val_set), self.batch_size, self.rank,
                                                                  self.world_size), **kw)


def batch_size(batch: dict[str, Any]) -> int:
    """Images in a batch (for Lightning's ThroughputMonitor)."""
    return len(batch["captions"])
