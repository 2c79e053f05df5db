"""In-training validation images: fixed prompts × fixed seeds every N steps → a grid.

The grid is saved to ``<dirpath>/step=N.png`` and logged to wandb (``samples``). Same prompts,
seeds and scheduler every time, so grids are comparable across steps, runs and checkpoints.
Rank zero only. The prompts are the user's own captions unless set: ``validation`` takes the
first ``num_prompts`` distinct captions of the run's held-out images (of its training images when
it holds none out); ``run.py`` sets the embedded miniature's shape prompts (a prompts file) for
the embedded model only (``toolkit.model_defaults``); a list or a prompts file is used as given.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import MLFlowLogger, TensorBoardLogger, WandbLogger

from toolkit.evaluation.protocol import read_prompts
from toolkit.inference.pipeline import generate, make_grid
from toolkit.inference.schedule import sampling_scheduler, training_schedule
from toolkit.models.footprints import generation, skeleton_of, traced, untraced
from toolkit.models.memory import Memory, weight_bytes

log = logging.getLogger(__name__)
OWN_CAPTIONS = ("validation", "auto")   # auto: run.py chose nothing (composed by hand): the user's captions


def generation_batch(module: L.LightningModule, memory: Memory | None, cap: int, size: int | None, guidance: float,
                     what: str) -> int:
    """The largest batch ≤ ``cap`` whose traced peak, with the whole module on the device, fits
    ``memory.budget_gib`` (``cap`` itself without a budget), at ``size`` px (None: the native size,
    as the pipeline generates). Images do not depend on it beyond float rounding: each has its own
    seeded generator, and the VAE decodes one image at a time (slicing)."""
    if memory is None:
        return cap
    if not traced(module.family):
        log.warning(untraced(module.family, what))
        return cap
    unet, vae = skeleton_of(module.denoiser), skeleton_of(module.vae)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    size = size or int(unet.config.sample_size) * factor
    cost = generation(module.family, unet, [skeleton_of(e) for e in module.text_encoders], vae,
                      (size // factor, size // factor), module.denoiser_dtype, guidance > 1, cache_dir=memory.traces)
    return memory.batch(cost, weight_bytes(module), cap, what,
                        "Raise memory.budget_gib (below the device's memory) or lower data.resolution.")


@contextlib.contextmanager
def vae_slicing(vae: torch.nn.Module) -> Iterator[None]:
    """The VAE decodes (and encodes) one image at a time for the block: a batch's decode then holds
    one image's activations, and each image is decoded as at batch 1."""
    before = vae.use_slicing
    vae.use_slicing = True
    try:
        yield
    finally:
        vae.use_slicing = before



class SampleGrid(L.Callback):
    """Args:
        prompts: one grid row each: ``validation`` (the run's own held-out captions), a list, or a
            prompts file (one per line).
        seeds: fixed seeds (one grid column each).
        every_n_steps: sampling period in optimizer steps (0: only at the end).
        dirpath: where grids are written.
        steps / guidance_scale / scheduler: generation settings.
        num_prompts: how many captions ``validation`` takes.
        batch_size: the most images generated at once; fewer where ``memory`` says so.
        memory: the budget (``toolkit.models.memory.Memory``); None: ``batch_size`` as given.
    """

    def __init__(self, prompts: str | list[str], seeds: list[int], every_n_steps: int, dirpath: str,
                 steps: int = 20, guidance_scale: float = 5.0, scheduler: str = "DDIMScheduler",
                 num_prompts: int = 4, batch_size: int = 16, memory: Memory | None = None) -> None:
        own = isinstance(prompts, str) and prompts in OWN_CAPTIONS
        self.prompts = [] if own else read_prompts(prompts, "callbacks.sample_grid.prompts")
        self.own, self.num_prompts, self.seeds, self.every = own, num_prompts, list(seeds), every_n_steps
        self.dirpath, self.steps, self.guidance, self.scheduler = Path(dirpath), steps, guidance_scale, scheduler
        self.batch_size, self.memory = batch_size, memory
        self._last = -1

    def setup(self, trainer: L.Trainer, module: L.LightningModule, stage: str) -> None:
        if not self.own or self.prompts:
            return
        dm = trainer.datamodule
        for part in (dm.val_set, dm.train_set):   # the held-out captions, else the training ones
            captions = list(dict.fromkeys(c for c in (part.captions() if part is not None else []) if c))
            if captions:
                self.prompts = captions[: self.num_prompts]
                break
        if not self.prompts:
            raise ValueError("callbacks.sample_grid.prompts=validation, but the run's images have no captions: "
                             "give prompts (a list or a prompts file)")
        log.info("sample grid: %d captions of the run's %s images × %d seeds", len(self.prompts),
                 "held-out" if dm.val_set is not None and len(dm.val_set) else "training", len(self.seeds))

    @torch.no_grad()
    def sample(self, trainer: L.Trainer, module: L.LightningModule) -> Path | None:
        step = trainer.global_step
        if not trainer.is_global_zero or step == self._last:
            return None
        self._last = step
        # the schedule being trained (zero terminal SNR: rescaled betas, trailing timesteps), as sampling will use
        sched = sampling_scheduler(self.scheduler, module.noise_scheduler.config,
                                   training_schedule(module.noise_scheduler.config))
        pairs = [(p, s) for p in self.prompts for s in self.seeds]
        batch = generation_batch(module, self.memory, min(self.batch_size, len(pairs)), None, self.guidance,
                                 f"sample grid ({len(pairs)} images)")
        modes = {m: m.training for m in module.modules()}
        module.eval()  # LoRA dropout off while sampling; each submodule's mode restored after
        with module.text_encoders_on_device(), vae_slicing(module.vae):   # released encoders back for the prompts
            pipe = module.family.pipeline(module.pipeline_components, sched)
            pipe.set_progress_bar_config(disable=True)
            images = generate(pipe, [p for p, _ in pairs], [s for _, s in pairs], self.steps, self.guidance,
                              batch_size=batch, progress=False,
                              call_kwargs=module.family.call_kwargs(module.text_options))
        for m, mode in modes.items():
            m.training = mode
        grid = make_grid(images, cols=len(self.seeds))
        self.dirpath.mkdir(parents=True, exist_ok=True)
        path = self.dirpath / f"step={step}.png"
        grid.save(path)
        for lg in trainer.loggers:
            if isinstance(lg, WandbLogger):
                lg.log_image("samples", [grid], step=step, caption=[f"step {step}: rows=prompts, cols=seeds"])
            elif isinstance(lg, TensorBoardLogger):
                lg.experiment.add_image("samples", np.asarray(grid), step, dataformats="HWC")
            elif isinstance(lg, MLFlowLogger):   # the run's artifacts: samples/step=N.png
                lg.experiment.log_artifact(lg.run_id, str(path), "samples")
        return path

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if self.every and trainer.global_step % self.every == 0 and trainer.global_step > 0:
            self.sample(trainer, module)

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.sample(trainer, module)
