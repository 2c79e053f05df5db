"""The denoising objective as one object built from config (``module.objective``), in the manner
of sgm's loss and sigma-sampler configs: the module asks it for the noisy input, the target and
the weights of a batch, and for the loss of a prediction; it never reads an objective option
itself. The maths are the pure functions of ``toolkit.models.objectives``.

    module.objective:
      snr_gamma, noise_offset, caption_dropout, input_perturbation, zero_terminal_snr,
      debiased_estimation, masked_loss,
      timesteps: {min, max, scheme: uniform | logit_normal | mode, logit_mean, logit_std, mode_scale}
      loss: {kind: mse | huber | smooth_l1, huber_delta}
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import DDPMScheduler

from toolkit.models import objectives

TIMESTEP_DEFAULTS = {"min": 0, "max": None, "scheme": "uniform", "logit_mean": 0.0, "logit_std": 1.0,
                     "mode_scale": 1.29}
LOSS_DEFAULTS = {"kind": "mse", "huber_delta": 1.0}


def with_defaults(name: str, given: Mapping[str, Any] | None, defaults: Mapping[str, Any]) -> dict[str, Any]:
    """``given`` over ``defaults``; an unknown key is an error (a typo would otherwise be ignored)."""
    unknown = set(given or {}) - set(defaults)
    if unknown:
        raise ValueError(f"module.objective.{name}: unknown keys {sorted(unknown)}; expected {list(defaults)}")
    return {**defaults, **(given or {})}


@dataclass
class Noised:
    """What the UNet sees and what it is scored against, for one batch."""

    noisy: torch.Tensor       # x_t (built from the perturbed noise when input perturbation is on)
    timesteps: torch.Tensor
    target: torch.Tensor      # ε or v, from the scheduler's prediction_type
    weights: torch.Tensor | None   # per-sample loss weights (None: all 1)
    mask: torch.Tensor | None      # per-pixel loss weights in latent space (None: all 1)


class Objective:
    """The denoising objective (predict ε or v, as the scheduler's config says).

    Args:
        snr_gamma: min-SNR-γ weighting; None for the plain loss.
        noise_offset: noise-offset strength (0 disables it).
        caption_dropout: probability of training on the empty prompt (keeps CFG working).
        input_perturbation: γ of input perturbation (Ning et al. 2023; 0: off).
        zero_terminal_snr: rescale the betas to zero terminal SNR (v-prediction models only).
        debiased_estimation: multiply the loss weights by the debiased-estimation weights.
        masked_loss: weight the loss by each image's mask (``data.masks``), in latent space.
        timesteps: the training timestep range ``[min, max)`` (None: the whole schedule) and its
            density (``objectives.sample_timesteps_density``).
        loss: the per-element penalty ``kind`` (``mse``, ``huber``, ``smooth_l1``) and Huber's δ.
    """

    def __init__(self, snr_gamma: float | None = None, noise_offset: float = 0.0, caption_dropout: float = 0.0,
                 input_perturbation: float = 0.0, zero_terminal_snr: bool = False,
                 debiased_estimation: bool = False, masked_loss: bool = False,
                 timesteps: Mapping[str, Any] | None = None, loss: Mapping[str, Any] | None = None) -> None:
        self.snr_gamma, self.noise_offset, self.caption_dropout = snr_gamma, noise_offset, caption_dropout
        self.input_perturbation, self.zero_terminal_snr = input_perturbation, zero_terminal_snr
        self.debiased_estimation, self.masked_loss = debiased_estimation, masked_loss
        self.timesteps = with_defaults("timesteps", timesteps, TIMESTEP_DEFAULTS)
        self.penalty = with_defaults("loss", loss, LOSS_DEFAULTS)
        if self.penalty["kind"] not in objectives.LOSSES:
            raise ValueError(f"module.objective.loss.kind={self.penalty['kind']!r}: expected one of "
                             f"{objectives.LOSSES}")

    def schedule(self, scheduler: DDPMScheduler) -> DDPMScheduler:
        """The training noise schedule: the model's, rescaled to zero terminal SNR when asked."""
        if not self.zero_terminal_snr:
            return scheduler
        if scheduler.config.prediction_type != "v_prediction":
            raise ValueError("module.objective.zero_terminal_snr=true needs a v-prediction model: at SNR 0 the "
                             "noise is the input, so ε-prediction has nothing to learn at t=T (Lin et al. 2024, §3.2)")
        return type(scheduler).from_config(scheduler.config, rescale_betas_zero_snr=True)

    def captions(self, captions: Sequence[str], generator: objectives.Generators = None) -> list[str]:
        """The batch's captions with caption dropout applied (training only)."""
        return objectives.drop_captions(captions, self.caption_dropout, generator)

    def noised(self, scheduler: DDPMScheduler, latents: torch.Tensor, batch: Mapping[str, Any], training: bool,
               timesteps: torch.Tensor | None = None,
               draws: Callable[[str], objectives.Generators] | None = None) -> Noised:
        """Draw noise (and timesteps, unless given) for ``latents``; the UNet's input, target and weights.
        ``draws(kind)`` gives the generators of each kind of draw (``toolkit.reproducibility.SampleDraws``:
        one per sample, so a sample's draws depend on the sample only); None: torch's global generator."""
        gen = draws or (lambda kind: None)
        noise = objectives.randn(latents.shape, gen("noise"), latents.device)
        noise = objectives.offset_noise(noise, self.noise_offset, gen("offset"))
        if timesteps is None:
            t = self.timesteps
            timesteps = objectives.sample_timesteps_density(
                latents.shape[0], scheduler.config.num_train_timesteps, t["scheme"], t["min"], t["max"],
                t["logit_mean"], t["logit_std"], t["mode_scale"], latents.device, gen("timestep"))
        seen = objectives.perturb_noise(noise, self.input_perturbation, gen("perturbation")) if training else noise
        noisy = scheduler.add_noise(latents, seen, timesteps)
        target = objectives.training_target(scheduler, latents, noise, timesteps)
        return Noised(noisy, timesteps, target, self.weights(scheduler, timesteps, batch, latents.device),
                      self.mask(batch, latents))

    def weights(self, scheduler: DDPMScheduler, timesteps: torch.Tensor, batch: Mapping[str, Any],
                device: torch.device) -> torch.Tensor | None:
        """Per-sample weights: min-SNR-γ × debiased estimation × prior preservation (those switched on)."""
        weights = objectives.min_snr_weights(scheduler, timesteps, self.snr_gamma)
        if self.debiased_estimation:
            debias = objectives.debiased_weights(scheduler, timesteps)
            weights = debias if weights is None else weights * debias
        if "prior" in batch:   # loss = mean over instance images + λ · mean over class images
            prior = objectives.prior_weights(batch["prior"].to(device), batch["prior_weight"])
            weights = prior if weights is None else weights * prior
        return weights

    def mask(self, batch: Mapping[str, Any], latents: torch.Tensor) -> torch.Tensor | None:
        if not (self.masked_loss and "mask" in batch):
            return None
        return objectives.latent_mask(batch["mask"].to(latents.device), latents.shape[-2:])

    def loss(self, pred: torch.Tensor, noised: Noised) -> torch.Tensor:
        """The weighted loss of a prediction against ``noised``'s target."""
        return objectives.weighted_loss(pred, noised.target, noised.weights, noised.mask, self.penalty["kind"],
                                        self.penalty["huber_delta"])
