"""The denoising objective as one object built from config (``module.objective``).

    noisy, target, t = objective.corrupt(latents)          # x_t from x_0, the target, the timesteps
    loss = objective.loss(unet(noisy, t, cond), target, t, batch)

It holds every objective option and the pure functions of ``toolkit.models.objectives``; the
LightningModule asks it for ``(noisy, target, timesteps)`` and the loss, and never reads an
option itself (sgm's ``loss_fn_config`` / ``sigma_sampler_config`` are the model). ``bind``
attaches the model's noise schedule (rescaled to zero terminal SNR when asked).

    python run.py module.objective.snr_gamma=5 module.objective.loss.kind=huber \\
        module.objective.timesteps.density=logit_normal
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from diffusers import DDPMScheduler

from toolkit.models import objectives

TIMESTEPS = {"min": 0, "max": None, "density": "uniform", "logit_mean": 0.0, "logit_std": 1.0, "mode_scale": 1.29}
LOSS = {"kind": "mse", "huber_delta": 1.0}


class Objective:
    """Args:
        snr_gamma: min-SNR-γ weighting (Hang et al. 2023); None for the plain loss.
        noise_offset: noise-offset strength (0 disables it).
        timesteps: ``{min, max, density, logit_mean, logit_std, mode_scale}``: the training timestep
            range [min, max) (max None: the whole schedule) and its density (``uniform``,
            ``logit_normal``, ``mode``; ``objectives.sample_timesteps_density``).
        loss: ``{kind, huber_delta}``: the per-element penalty ``mse``, ``huber`` or ``smooth_l1``.
        zero_terminal_snr: rescale the betas to zero terminal SNR (v-prediction models only).
        input_perturbation: γ of input perturbation (0: off).
        debiased_estimation: multiply the loss weights by the debiased-estimation weights.
        masked_loss: weight the loss by each image's mask (``data.masks``), in latent space.
    """

    def __init__(self, snr_gamma: float | None = None, noise_offset: float = 0.0,
                 timesteps: Mapping[str, Any] | None = None, loss: Mapping[str, Any] | None = None,
                 zero_terminal_snr: bool = False, input_perturbation: float = 0.0,
                 debiased_estimation: bool = False, masked_loss: bool = False) -> None:
        unknown = set(timesteps or {}) - set(TIMESTEPS) | set(loss or {}) - set(LOSS)
        if unknown:
            raise ValueError(f"module.objective: unknown keys {sorted(unknown)} (timesteps: {list(TIMESTEPS)}, "
                             f"loss: {list(LOSS)})")
        self.timesteps, self.loss_cfg = {**TIMESTEPS, **(timesteps or {})}, {**LOSS, **(loss or {})}
        if self.loss_cfg["kind"] not in objectives.LOSSES:
            raise ValueError(f"module.objective.loss.kind={self.loss_cfg['kind']!r}: expected one of "
                             f"{objectives.LOSSES}")
        self.snr_gamma, self.noise_offset, self.zero_terminal_snr = snr_gamma, noise_offset, zero_terminal_snr
        self.input_perturbation, self.debiased_estimation = input_perturbation, debiased_estimation
        self.masked_loss = masked_loss
        self.scheduler: DDPMScheduler | None = None

    def bind(self, scheduler: DDPMScheduler) -> DDPMScheduler:
        """Use the model's training noise schedule (zero-terminal-SNR rescaled when asked); returns it."""
        if self.zero_terminal_snr:
            if scheduler.config.prediction_type != "v_prediction":
                raise ValueError("module.objective.zero_terminal_snr=true needs a v-prediction model: at SNR 0 the "
                                 "noise is the input, so ε-prediction has nothing to learn at t=T (Lin et al. 2024, "
                                 "§3.2)")
            scheduler = type(scheduler).from_config(scheduler.config, rescale_betas_zero_snr=True)
        self.scheduler = scheduler
        return scheduler

    def corrupt(self, latents: torch.Tensor, timesteps: torch.Tensor | None = None,
                generator: torch.Generator | None = None, perturb: bool = True
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(x_t, target, t)`` for clean latents: noise (with offset), timesteps from the density
        unless given, input perturbation when ``perturb`` (training), target by prediction type."""
        s, ts = self.scheduler, self.timesteps
        noise = torch.randn(latents.shape, generator=generator, device=latents.device)
        noise = objectives.offset_noise(noise, self.noise_offset, generator)
        if timesteps is None:
            timesteps = objectives.sample_timesteps_density(
                latents.shape[0], s.config.num_train_timesteps, ts["density"], ts["min"], ts["max"],
                ts["logit_mean"], ts["logit_std"], ts["mode_scale"], latents.device, generator)
        seen = objectives.perturb_noise(noise, self.input_perturbation, generator) if perturb else noise
        noisy = s.add_noise(latents, seen, timesteps)
        return noisy, objectives.training_target(s, latents, noise, timesteps), timesteps

    def loss(self, pred: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor,
             batch: Mapping[str, Any]) -> torch.Tensor:
        """The weighted loss: min-SNR and debiased weights, prior-preservation weights (``batch["prior"]``)
        and the latent-grid mask (``batch["mask"]``, with ``masked_loss``)."""
        s = self.scheduler
        weights = objectives.min_snr_weights(s, timesteps, self.snr_gamma)
        if self.debiased_estimation:
            debias = objectives.debiased_weights(s, timesteps)
            weights = debias if weights is None else weights * debias
        if "prior" in batch:   # loss = mean over instance images + λ · mean over class images
            prior = objectives.prior_weights(batch["prior"].to(pred.device), batch["prior_weight"])
            weights = prior if weights is None else weights * prior
        mask = objectives.latent_mask(batch["mask"].to(pred.device), pred.shape[-2:]) \
            if self.masked_loss and "mask" in batch else None
        return objectives.weighted_loss(pred, target, weights, mask, self.loss_cfg["kind"],
                                        self.loss_cfg["huber_delta"])
