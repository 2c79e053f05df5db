"""Encode the training data once with the frozen VAE / text encoder (``toolkit.data.encoded_cache``)
and train from the cache: no image decoding, no VAE encoder and no text encoder in the step.

Runs at ``on_fit_start``: the model is on its device and DDP is up, so the encoding is sharded
over ranks (each encodes every world_size-th missing item of the list rank 0 decided, then all
read every shard).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.fabric.utilities.distributed import is_shared_filesystem

from toolkit.data.encoded_cache import ArrayStore, fill, to_rows
from toolkit.data.masks import load_mask
from toolkit.data.prepared import PreparedDataset
from toolkit.data.sources import fingerprint_listing, image_bytes
from toolkit.data.transforms import train_transform
from toolkit.data.validate import decode_image
from toolkit.hashing import bytes_key, module_fingerprint, text_key, tokenizer_fingerprint
from toolkit.models.footprints import skeleton_of, text_encode, traced, untraced, vae_encode
from toolkit.models.memory import Memory, Scaled, weight_bytes
from toolkit.models.objectives import latent_mask
from toolkit.run.lifecycle import all_ranks

log = logging.getLogger(__name__)


def _hw(size: int | tuple[int, int]) -> tuple[int, int]:
    """(height, width) of a training size: the resolution, or a bucket's (width, height)."""
    return (size, size) if isinstance(size, int) else (int(size[1]), int(size[0]))


def settings_key(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:20]


def text_settings(module: Any, dtype: np.dtype) -> dict[str, Any]:
    """What decides a caption's embedding: the family, every text encoder and tokenizer, the dtype,
    and the family's encoding options (SD3: T5's ``max_sequence_length``)."""
    options = {"options": module.text_options} if module.text_options else {}
    return {"kind": "text", "family": module.family.name, "dtype": str(dtype),
            "text_encoders": "-".join(module_fingerprint(e) for e in module.text_encoders),
            "tokenizers": "-".join(tokenizer_fingerprint(t) for t in module.tokenizers), **options}


def field_dtype(field: str, family: Any, dtype: np.dtype) -> str:
    """How one conditioning field is stored: the configured dtype, except that a field float16
    cannot hold (``family.wide_fields``: T5's states, whose values overflow it) is stored as
    bfloat16 bits when float16 is configured. bfloat16 rather than float32: float32's range in half
    the bytes (a 256-token T5-XXL caption is 2 MiB instead of 4), and exact for the bfloat16 encoders
    these models run in; float32 (``callbacks.encoded_cache.dtype=float32``) stays exact for any."""
    return "bfloat16" if dtype == np.float16 and field in family.wide_fields else str(dtype)


def latent_settings(module: Any, dm: Any, dtype: np.dtype) -> dict[str, Any]:
    """What decides an image's cached posterior: the VAE (config + weights) and the preprocessing."""
    return {"kind": "latents", "vae": module_fingerprint(module.vae), "resolution": dm.resolution,
            "flips": 2 if dm.random_flip else 1, "buckets": str(dm.buckets),
            "alpha_background": str(dm.policy.alpha_background), "dtype": str(dtype)}


class EncodedCache(L.Callback):
    """Args:
        dirpath: cache root (shared by runs; one folder per encoder + preprocessing).
        latents: cache VAE posterior parameters (needs ``data.center_crop=true``).
        text: cache prompt embeddings (skipped when the text encoder is trained).
        batch_size: the largest encoding batch (items; with flips the VAE sees twice as many images).
        dtype: storage dtype of the cached arrays (``float16`` halves the disk; ``float32`` exact).
        from_prepared: take the rows a prepared set carries (``prepare.encode=true``); false: encode here.
        memory: the budget (``toolkit.models.memory.Memory``): each encoder takes the largest batch
            ≤ ``batch_size`` whose traced peak, with all weights on the device, fits it; None:
            ``batch_size`` as given.
    """

    def __init__(self, dirpath: str, latents: bool = True, text: bool = True, batch_size: int = 64,
                 dtype: str = "float16", from_prepared: bool = True, memory: Memory | None = None) -> None:
        self.dirpath, self.latents, self.text, self.from_prepared = Path(dirpath), latents, text, from_prepared
        self.batch_size, self.dtype, self.memory = batch_size, np.dtype(dtype), memory

    def batch(self, module: Any, cost: Any, what: str) -> int:
        """``batch_size``, or fewer where the budget says so (the same on every rank and node: from
        the configs and the budget alone)."""
        if self.memory is None:
            return self.batch_size
        n = self.memory.batch(cost, weight_bytes(module), self.batch_size, what,
                              "Raise memory.budget_gib (below the device's memory) or lower data.resolution.")
        if n < self.batch_size:
            log.info("%s: batch %d (memory.budget_gib=%g; at most %d asked)", what, n, self.memory.budget_gib,
                     self.batch_size)
        return n

    def latent_batch(self, module: Any, vae: Any, size: tuple[int, int], flips: int) -> int:
        cost = Scaled(vae_encode(vae, size, module.vae.dtype, self.traces), flips)
        return self.batch(module, cost, f"latent cache encoding ({size[0]}x{size[1]}, {flips} variant(s) an image)")

    @property
    def traces(self) -> str | None:
        return self.memory.traces if self.memory is not None else None

    def sharding(self, trainer: L.Trainer) -> dict[str, Any]:
        """Who encodes what. On storage every rank sees (one cache for the job) the missing items are
        split over all ranks. On node-local disks (``paths.cache_dir`` on local NVMe, as clusters
        have it; found with Lightning's ``is_shared_filesystem``) each node builds its own complete
        copy, split over its own ranks: every rank then reads only its node's disk, nothing is sent
        between nodes, and the copy serves later runs on that node. The cost is the encoding done
        once per node instead of once per job; it runs at the node's full speed (all its GPUs), and
        at any size it is one pass of the frozen encoders over the data, small next to training.
        The to-do list comes from one rank per copy (rank 0, or each node's first): ``fill``."""
        self.dirpath.mkdir(parents=True, exist_ok=True)
        barrier = trainer.strategy.barrier
        shared = trainer.num_nodes == 1 or is_shared_filesystem(trainer.strategy, self.dirpath)
        leader = 0 if shared else trainer.node_rank * trainer.num_devices   # its first rank: Lightning's numbering
        agree = (lambda todo: todo) if trainer.world_size == 1 else (lambda todo: all_ranks(todo)[leader])
        if shared:
            return {"rank": trainer.global_rank, "world_size": trainer.world_size, "barrier": barrier, "agree": agree}
        if trainer.is_global_zero:
            log.info("encoded cache %s is node-local: each of the %d nodes builds its own copy over its %d ranks",
                     self.dirpath, trainer.num_nodes, trainer.num_devices)
        return {"rank": trainer.local_rank, "world_size": trainer.num_devices, "barrier": barrier, "agree": agree}

    @torch.no_grad()
    def on_fit_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.encode(module, trainer.datamodule, self.sharding(trainer),
                    f"rank {trainer.global_rank} of {trainer.world_size}, node {trainer.node_rank}")

    def root(self, dm: Any) -> Path:
        """Where this run's stores live: the shared cache, or, when the training set is a prepared
        set carrying encoded rows (taken: ``from_prepared``), a folder of that set's own,
        ``prepared-<its identity>``, that only runs training from that set read. A set is data from
        someone else: its rows in the shared folder (first key wins) could stand in for rows other
        runs encode themselves, such as the empty caption every run's caption dropout uses or a
        public image's latents. ``fetch_encoded`` also refuses keys other than the set's own
        captions and images, so in its folder it cannot pre-empt other sources' rows (a prior set)."""
        ds = getattr(dm.train_set, "ds", None)
        if self.from_prepared and isinstance(ds, PreparedDataset) and ds.encoded:
            return self.dirpath / f"prepared-{ds.identity[:20]}"
        return self.dirpath

    def prepared(self, dm: Any, name: str, settings: dict[str, Any], dest: Path) -> None:
        """Rows a ``task=prepare`` with ``prepare.encode=true`` stored for this store: fetched into
        ``dest`` (verified), so nothing is encoded here; refused when they were made otherwise."""
        ds = getattr(dm.train_set, "ds", None)
        if self.from_prepared and isinstance(ds, PreparedDataset):
            ds.fetch_encoded(name, settings, dest)

    @torch.no_grad()
    def encode(self, module: Any, dm: Any, shard: dict[str, Any], who: str = "rank 0") -> dict[str, dict[str, Any]]:
        """Fill the stores ``module`` (its VAE, text encoders, family) and ``dm`` (its sets and
        preprocessing) need; ``shard`` splits the work (``fill``). Returns {store folder: settings}."""
        sets = [s for s in (dm.train_set, dm.val_set, dm.train_set.prior) if s is not None]
        used: dict[str, dict[str, Any]] = {}
        root = self.root(dm)

        def open_store(name: str, settings: dict[str, Any]) -> ArrayStore:
            self.prepared(dm, name, settings, root / name)
            used[name] = settings
            return ArrayStore(root / name)

        if self.text and module.text_lora_params:
            log.info("text-embedding cache off: the text encoder is being trained")
        elif self.text and dm.tags.varies:
            log.info("text-embedding cache off: tag shuffling/dropout changes the captions every step")
        elif self.text:
            captions = sorted({""} | {c for s in sets for c in s.captions()})   # "" for caption dropout
            settings = text_settings(module, self.dtype)
            module.text_cache = {}
            if traced(module.family) and self.memory is not None:
                cost, _ = text_encode(module.family, [skeleton_of(e) for e in module.text_encoders],
                                      module.text_encoders[0].dtype, self.traces)
                text_batch = self.batch(module, cost, "text cache encoding")
            else:   # no budget, or a family the tracer does not cover: the configured batch
                if self.memory is not None:
                    log.warning(untraced(module.family, "text cache encoding"))
                text_batch = self.batch_size
            for field in module.family.cache_fields:   # one store per conditioning tensor (SDXL: + pooled)
                stored = field_dtype(field, module.family, self.dtype)
                extra = {"stored": stored} if stored != str(self.dtype) else {}
                store = open_store(f"text-{settings_key(settings)}-{field}", {**settings, "field": field, **extra})
                enc = lambda batch, f=field, d=stored: to_rows(module.encode_text(batch, cached=False)[f], d)
                n = fill(store, [text_key(c) for c in captions], captions, enc, text_batch,
                         desc=f"text cache ({field})", **shard)
                module.text_cache[field] = store
                log.info("text cache (%s, %s): %d prompts (%d encoded now by %s) in %s", field, stored, len(captions),
                         n, who, store.root)
            module.release_text_encoders()
        if self.latents and not dm.center_crop:
            log.warning("latent cache off: random crops are not cacheable (set data.center_crop=true)")
        elif self.latents:
            flips = 2 if dm.random_flip else 1
            settings = latent_settings(module, dm, self.dtype)
            folder = settings_key(settings)
            store = open_store(f"latents-{folder}", settings)
            # What each cached variant was cut at (original size, crop top-left, target size): SDXL's
            # micro-conditioning travels with the latents, from the same transform that cuts the pixels.
            micro_store = open_store(f"micro-{folder}", {**settings, "kind": "micro"})
            min_side = dm.policy.min_side or dm.resolution
            # Loss masks, averaged to the latent grid, per variant; keyed by the mask source too.
            masks = dm.masks
            mask_src = str(masks if masks in (None, "alpha") else fingerprint_listing(masks))
            mask_key = hashlib.sha256(mask_src.encode()).hexdigest()[:12]
            mask_store = (open_store(f"masks-{folder}-{mask_key}", {**settings, "kind": "masks", "masks": mask_src})
                          if masks else None)
            factor = 2 ** (len(module.vae.config.block_out_channels) - 1)
            vae = skeleton_of(module.vae)

            def mask_rows(items: list[Any], size: int | tuple[int, int]) -> np.ndarray:
                rng, rows = np.random.default_rng(0), []
                for it in items:
                    img = decode_image(it, dm.policy, min_side)[0]
                    mask = load_mask(it, masks, dm.policy, img.size).convert("RGB")
                    for flip in (False, True)[:flips]:
                        m = (train_transform(mask, size, True, False, rng, flip=flip)[0][:1] + 1) / 2
                        rows.append(latent_mask(m[None], (m.shape[1] // factor, m.shape[2] // factor))[0].numpy())
                return np.asarray(rows, self.dtype).reshape(len(items), flips, *rows[0].shape)

            def variants(items: list[Any], size: int | tuple[int, int]) -> tuple[list[torch.Tensor], np.ndarray]:
                rng = np.random.default_rng(0)   # unused: centre crop, the flip is forced
                out = [train_transform(decode_image(it, dm.policy, min_side)[0], size, True, False, rng, flip=flip)
                       for it in items for flip in (False, True)[:flips]]
                micro = np.asarray([mc for _, mc in out], np.float32).reshape(len(items), flips, 6)
                return [px for px, _ in out], micro

            def encoder(size: int | tuple[int, int]) -> Any:
                def enc(items: list[Any]) -> np.ndarray:
                    pixels, _ = variants(items, size)
                    params = module.vae.encode(torch.stack(pixels).to(module.device, module.vae.dtype)
                                               ).latent_dist.parameters
                    if not torch.isfinite(params).all():
                        raise FloatingPointError(
                            f"the VAE encoder produced NaN/inf in {module.vae.dtype} (a VAE that overflows in half "
                            "precision, as SDXL's does): keep the VAE in float32, or pass an fp16-safe VAE "
                            "(model.vae=madebyollin/sdxl-vae-fp16-fix)")
                    return params.float().cpu().numpy().astype(self.dtype).reshape(len(items), flips, *params.shape[1:])
                return enc

            for s in sets:
                items = {r: s.raw(r)[0] for r in s.indices}   # rejected rows are never read
                keys = {r: bytes_key(image_bytes(it)) for r, it in items.items()}
                groups: dict[Any, list[int]] = {}   # one encoding shape per bucket
                for pos, row in enumerate(s.indices):
                    groups.setdefault(s.target_size(pos), []).append(row)
                n = sum(fill(store, [keys[r] for r in rows], [items[r] for r in rows], encoder(size),
                             self.latent_batch(module, vae, _hw(size), flips), desc="latent cache", **shard)
                        for size, rows in groups.items())
                for size, rows in groups.items():
                    fill(micro_store, [keys[r] for r in rows], [items[r] for r in rows],
                         lambda its, size=size: variants(its, size)[1], self.batch_size, desc="micro-conditioning",
                         **shard)
                    if mask_store is not None and s.masks:
                        fill(mask_store, [keys[r] for r in rows], [items[r] for r in rows],
                             lambda its, size=size: mask_rows(its, size), self.batch_size, desc="loss masks", **shard)
                s.latents = (store, micro_store, mask_store if s.masks else None, keys)
                log.info("latent cache: %d images (%d encoded now by %s) in %s", len(s.indices), n, who, store.root)
        return used

