"""Train a ``UNet2DConditionModel`` from scratch on cached latents (full, not LoRA).

The objective is the one LoRA fine-tuning uses (``toolkit.models.objectives``): noise the
scaled latents with the DDPM schedule, predict the target named by the scheduler's
``prediction_type``, (min-SNR-weighted) MSE. Prompts are replaced by the empty prompt with
probability ``caption_dropout`` so the model also learns the unconditional score that
classifier-free guidance needs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import lightning as L
import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor2_0

from toolkit.models import objectives
from toolkit.training.optimizers import optimizers


class UNetPretraining(L.LightningModule):
    """Args:
        unet: ``UNet2DConditionModel`` constructor kwargs (the saved ``config.json``).
        noise_scheduler: ``DDPMScheduler`` kwargs (the pipeline's scheduler config).
        scaling_factor: the VAE's ``config.scaling_factor`` (latents · s have unit variance).
        optimizer: partial optimizer, called with the parameters.
        lr_scheduler: partial ``diffusers.optimization.get_scheduler``, or None (constant LR).
        caption_dropout: probability of conditioning on the empty prompt.
        snr_gamma: min-SNR-γ weighting; None for the plain MSE.
    """

    def __init__(self, unet: Mapping[str, Any], noise_scheduler: Mapping[str, Any], scaling_factor: float,
                 optimizer: Callable[..., torch.optim.Optimizer],
                 lr_scheduler: Callable[..., Any] | None = None, caption_dropout: float = 0.1,
                 snr_gamma: float | None = None) -> None:
        super().__init__()
        self.unet = UNet2DConditionModel(**unet)
        self.unet.set_attn_processor(AttnProcessor2_0())
        self.noise_scheduler = DDPMScheduler(**noise_scheduler)
        self.scaling_factor = scaling_factor
        self.optimizer_fn, self.lr_scheduler_fn = optimizer, lr_scheduler
        self.caption_dropout, self.snr_gamma = caption_dropout, snr_gamma

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        mean, std = batch["latent_mean"], batch["latent_std"]
        latents = (mean + std * torch.randn_like(mean)) * self.scaling_factor
        n = len(latents)
        cond = batch["encoder_hidden_states"]
        drop = torch.rand(n, device=cond.device) < self.caption_dropout
        cond = torch.where(drop[:, None, None], batch["null_hidden_states"].expand_as(cond), cond)
        noise = torch.randn_like(latents)
        t = objectives.sample_timesteps(n, self.noise_scheduler.config.num_train_timesteps,
                                        device=latents.device)
        noisy = self.noise_scheduler.add_noise(latents, noise, t)
        pred = self.unet(noisy, t, encoder_hidden_states=cond).sample
        target = objectives.training_target(self.noise_scheduler, latents, noise, t)
        loss = objectives.weighted_mse(pred, target,
                                       objectives.min_snr_weights(self.noise_scheduler, t, self.snr_gamma))
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> Any:
        return optimizers(self.parameters(), self.optimizer_fn, self.lr_scheduler_fn, self.trainer.max_steps)
