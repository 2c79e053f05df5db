"""In-training validation images: fixed prompts × fixed seeds every N steps → a grid.

The grid is saved to ``<dirpath>/step=N.png`` and logged to wandb (``samples``). Same prompts,
seeds and scheduler every time, so grids are comparable across steps, runs and checkpoints.
Rank zero only.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

from toolkit.inference.pipeline import generate, make_grid
from toolkit.inference.schedule import sampling_scheduler, training_schedule


class SampleGrid(L.Callback):
    """Args:
        prompts: fixed validation prompts (one grid row each).
        seeds: fixed seeds (one grid column each).
        every_n_steps: sampling period in optimizer steps (0: only at the end).
        dirpath: where grids are written.
        steps / guidance_scale / scheduler: generation settings.
    """

    def __init__(self, prompts: list[str], seeds: list[int], every_n_steps: int, dirpath: str,
                 steps: int = 20, guidance_scale: float = 5.0, scheduler: str = "DDIMScheduler") -> None:
        self.prompts, self.seeds, self.every = list(prompts), list(seeds), every_n_steps
        self.dirpath, self.steps, self.guidance, self.scheduler = Path(dirpath), steps, guidance_scale, scheduler
        self._last = -1

    @torch.no_grad()
    def sample(self, trainer: L.Trainer, module: L.LightningModule) -> Path | None:
        step = trainer.global_step
        if not trainer.is_global_zero or step == self._last:
            return None
        self._last = step
        # the schedule being trained (zero terminal SNR: rescaled betas, trailing timesteps), as sampling will use
        sched = sampling_scheduler(self.scheduler, module.noise_scheduler.config,
                                   training_schedule(module.noise_scheduler.config))
        pipe = module.family.pipeline(module.pipeline_components, sched)
        pipe.set_progress_bar_config(disable=True)
        modes = {m: m.training for m in module.modules()}
        module.eval()  # LoRA dropout off while sampling; each submodule's mode restored after
        pairs = [(p, s) for p in self.prompts for s in self.seeds]
        with module.text_encoders_on_device():
            images = generate(pipe, [p for p, _ in pairs], [s for _, s in pairs], self.steps, self.guidance,
                              batch_size=len(pairs), progress=False, call_kwargs=module.family.call_kwargs(
                                  module.text_options))
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
        return path

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if self.every and trainer.global_step % self.every == 0 and trainer.global_step > 0:
            self.sample(trainer, module)

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.sample(trainer, module)
