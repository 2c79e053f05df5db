"""Prior preservation (DreamBooth, Ruiz et al. 2023): keep the base model's idea of the class while
the adapter learns the instance.

    loss = mean over instance images + λ · mean over class images

Class images are generated once by the base model (adapters off) from ``class_prompt`` and cached
by (UNet + text encoder weights hash, prompt, negative prompt, seed, count, steps, guidance,
scheduler, size), so later runs and resumes reuse them. Generation is sharded over DDP ranks
(image i on rank i mod world size, then a barrier). Every training item is paired with one class
image chosen from (seed, epoch, item), so a batch holds its instance images followed by as many
class images, and a resumed run pairs them the same way. The class images go through the same
latent and text caches as the instance images.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import diffusers
import lightning as L
import torch

from toolkit.atomic import atomic_open
from toolkit.callbacks.sample_grid import generation_batch, vae_slicing
from toolkit.data.sources import load_captioned
from toolkit.hashing import module_fingerprint, tokenizer_fingerprint
from toolkit.inference.pipeline import generate
from toolkit.models.memory import Memory

log = logging.getLogger(__name__)


class PriorPreservation(L.Callback):
    """Args:
        class_prompt: the prompt of the class images (e.g. "a photo of a dog"); None: off.
        num_images: how many class images.
        loss_weight: λ, the weight of the class-image loss.
        dirpath: cache root of generated class images.
        seed: image i uses seed ``seed·10⁶ + i``.
        steps / guidance_scale / scheduler / negative_prompt: generation settings.
        batch_size: the most images generated at once; fewer where ``memory`` says so.
        memory: the budget (``toolkit.models.memory.Memory``); None: ``batch_size`` as given.
    """

    def __init__(self, class_prompt: str | None, dirpath: str, num_images: int = 100, loss_weight: float = 1.0,
                 seed: int = 0, steps: int = 25, guidance_scale: float = 5.0, scheduler: str = "DDIMScheduler",
                 negative_prompt: str | None = None, batch_size: int = 8, memory: Memory | None = None) -> None:
        self.class_prompt, self.dirpath, self.num_images = class_prompt, Path(dirpath), num_images
        self.loss_weight, self.seed, self.steps, self.guidance = loss_weight, seed, steps, guidance_scale
        self.scheduler, self.negative_prompt, self.batch_size = scheduler, negative_prompt, batch_size
        self.memory = memory

    @property
    def active(self) -> bool:
        return bool(self.class_prompt)

    def folder(self, module: L.LightningModule, size: int) -> Path:
        # every part that shapes a class image: UNet, text encoders, tokenizers and the VAE that decodes it
        parts = [*module.models.values(), module.vae]
        weights = "-".join([*map(module_fingerprint, parts), *map(tokenizer_fingerprint, module.tokenizers)])
        spec = [weights, self.class_prompt, self.negative_prompt, self.seed, self.num_images, self.steps,
                self.guidance, self.scheduler, size, *([module.text_options] if module.text_options else [])]
        return self.dirpath / hashlib.sha256(json.dumps(spec, default=str).encode()).hexdigest()[:20]

    @torch.no_grad()
    def generate(self, trainer: L.Trainer, module: L.LightningModule, out: Path, size: int) -> None:
        # One list for the job, rank zero's (broadcast): listed on every rank, a fast rank's new files
        # shrank a slow rank's list, and another job filling the same folder meanwhile made the
        # ranks' lists differ, leaving images nobody generated. What that job writes meanwhile is
        # written again here, identically (same seeds), and atomically.
        todo = trainer.strategy.broadcast(
            [i for i in range(self.num_images) if not (out / f"{i:05d}.png").is_file()] if trainer.is_global_zero
            else None, 0)
        mine = todo[trainer.global_rank:: trainer.world_size]
        if mine:
            sched = getattr(diffusers, self.scheduler).from_config(module.noise_scheduler.config)
            pipe = module.family.pipeline(module.pipeline_components, sched)
            pipe.set_progress_bar_config(disable=True)
            modes = {m: m.training for m in module.modules()}
            module.eval()
            for model in module.models.values():   # the base model's prior, whatever the adapter holds
                if getattr(model, "peft_config", None):
                    model.disable_adapters()
            batch = generation_batch(module, self.memory, self.batch_size, size, self.guidance, "class images")
            try:
                with vae_slicing(module.vae):
                    images = generate(pipe, [self.class_prompt] * len(mine), [self.seed * 10**6 + i for i in mine],
                                      self.steps, self.guidance, self.negative_prompt, size, size, batch,
                                      desc=f"class images (rank {trainer.global_rank})",
                                      call_kwargs=module.family.call_kwargs(module.text_options))
            finally:
                for model in module.models.values():
                    if getattr(model, "peft_config", None):
                        model.enable_adapters()
                for m, mode in modes.items():
                    m.training = mode
            for i, img in zip(mine, images):
                with atomic_open(out / f"{i:05d}.png") as f:
                    img.save(f, format="PNG")
        trainer.strategy.barrier()
        if trainer.is_global_zero:
            rows = "".join(json.dumps({"file_name": f"{i:05d}.png", "text": self.class_prompt}) + "\n"
                           for i in range(self.num_images))
            with atomic_open(out / "metadata.jsonl", "w") as f:
                f.write(rows)
        trainer.strategy.barrier()

    def on_fit_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if not self.active:
            return
        dm = trainer.datamodule
        if dm.train_set.latents is not None:
            raise RuntimeError("callbacks.prior must come before callbacks.encoded_cache: the class images have to "
                               "exist before the latent cache encodes the training sets")
        out = self.folder(module, dm.resolution)
        n_before = len(list(out.glob("*.png")))
        self.generate(trainer, module, out, dm.resolution)
        ds = load_captioned(str(out), split="train")
        dm.attach_prior(ds, self.loss_weight)
        log.info("prior preservation: %d class images of %r (%d generated now) in %s, loss weight %g",
                 self.num_images, self.class_prompt, self.num_images - n_before, out, self.loss_weight)

    def state_dict(self) -> dict[str, Any]:
        return {}
