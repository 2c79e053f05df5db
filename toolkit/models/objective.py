"""The denoising objective as one object built from config (``module.objective``), in the manner
of sgm's loss and sigma-sampler configs: the module asks it for the noisy input, the target and
the weights of a batch, and for the loss of a prediction; it never reads an objective option
itself. The maths are the pure functions of ``toolkit.models.objectives``; the noise process
(DDPM for the UNet families, rectified flow for SD3) is the family's (``toolkit.models.processes``),
and an option that means nothing for it is refused by ``prepare``, naming why.

    module.objective:
      snr_gamma, noise_offset, caption_dropout, input_perturbation, zero_terminal_snr,
      debiased_estimation, masked_loss,
      timesteps: {min, max, scheme: uniform | logit_normal | mode | sigma_sqrt | cosmap,
                  logit_mean, logit_std, mode_scale}
      loss: {kind: mse | huber | smooth_l1, huber_delta}

``scheme`` is diffusers' ``weighting_scheme`` of its SD3/Flux training examples: the densities
(logit_normal, mode) draw the timesteps, ``sigma_sqrt`` / ``cosmap`` draw them uniformly and
weight the loss (flow models only).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import DDPMScheduler

from toolkit.models import objectives
from toolkit.models.processes import DDPM, RectifiedFlow

Process = DDPM | RectifiedFlow
# Options that mean nothing for a flow model, and why (refused rather than silently ignored).
NOT_FOR_FLOW = {
    "snr_gamma": "min-SNR-γ reweights DDPM's ε/v losses by SNR(t); a flow model's loss weighting is "
                 "timesteps.scheme (sigma_sqrt / cosmap, SD3's weightings)",
    "noise_offset": "the noise offset lets a DDPM model, whose last step keeps some signal, learn overall "
                    "brightness; rectified flow's σ=1 is pure noise already",
    "zero_terminal_snr": "it rescales DDPM betas for v-prediction; rectified flow has zero terminal SNR by "
                         "construction and predicts the velocity ε − x₀, not ε or v",
    "debiased_estimation": "its weights are functions of DDPM's SNR (1/√SNR for ε, 1/(SNR+1) for v)",
}

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
    timesteps: torch.Tensor   # what the denoiser is given (DDPM: t; flow: the scheduler's σ·N)
    target: torch.Tensor      # ε or v (the scheduler's prediction_type), or the flow's ε − x₀
    weights: torch.Tensor | None   # per-sample loss weights (None: all 1)
    mask: torch.Tensor | None      # per-pixel loss weights in latent space (None: all 1)


class Objective:
    """The denoising objective (predict ε or v, as the scheduler's config says; the velocity for flow models).

    Args:
        snr_gamma: min-SNR-γ weighting; None for the plain loss (DDPM only).
        noise_offset: noise-offset strength (0 disables it; DDPM only).
        caption_dropout: probability of training on the empty prompt (keeps CFG working).
        input_perturbation: γ of input perturbation (Ning et al. 2023; 0: off).
        zero_terminal_snr: rescale the betas to zero terminal SNR (v-prediction models only).
        debiased_estimation: multiply the loss weights by the debiased-estimation weights (DDPM only).
        masked_loss: weight the loss by each image's mask (``data.masks``), in latent space.
        timesteps: the training timestep range ``[min, max)`` (None: the whole schedule) and its
            density (``objectives.sample_timesteps_density``), or SD3's loss weighting.
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
        schemes = (*objectives.TIMESTEP_SAMPLING, *objectives.FLOW_WEIGHTINGS)
        if self.timesteps["scheme"] not in schemes:
            raise ValueError(f"module.objective.timesteps.scheme={self.timesteps['scheme']!r}: expected one of "
                             f"{schemes}")

    def prepare(self, process: Process) -> Process:
        """The training process: the family's, checked against the options (an option that means
        nothing for it is refused, naming why) and rescaled to zero terminal SNR when asked."""
        scheme = self.timesteps["scheme"]
        if process.kind == "flow":
            set_ = {"snr_gamma": self.snr_gamma is not None, "noise_offset": self.noise_offset != 0,
                    "zero_terminal_snr": self.zero_terminal_snr, "debiased_estimation": self.debiased_estimation}
            bad = [k for k, on in set_.items() if on]
            if bad:
                raise ValueError("this model is trained by rectified flow (flow matching), for which "
                                 + "; ".join(f"module.objective.{k} means nothing: {NOT_FOR_FLOW[k]}" for k in bad)
                                 + ". Leave them at their defaults.")
            return process
        if scheme in objectives.FLOW_WEIGHTINGS:
            raise ValueError(f"module.objective.timesteps.scheme={scheme}: SD3's loss weighting of the flow's σ; this "
                             "model is a DDPM one (use snr_gamma for a timestep weighting, or a density: uniform, "
                             "logit_normal, mode)")
        return process.zero_terminal_snr() if self.zero_terminal_snr else process

    def schedule(self, scheduler: DDPMScheduler) -> DDPMScheduler:
        """The training noise schedule of a DDPM model: the model's, rescaled to zero terminal SNR when asked."""
        return self.prepare(DDPM(scheduler)).scheduler

    def captions(self, captions: Sequence[str], generator: objectives.Generators = None) -> list[str]:
        """The batch's captions with caption dropout applied (training only)."""
        return objectives.drop_captions(captions, self.caption_dropout, generator)

    def noised(self, process: Process, latents: torch.Tensor, batch: Mapping[str, Any], training: bool,
               timesteps: torch.Tensor | None = None,
               draws: Callable[[str], objectives.Generators] | None = None) -> Noised:
        """Draw noise (and timesteps, unless given) for ``latents``; the denoiser's input, target and
        weights. ``draws(kind)`` gives the generators of each kind of draw
        (``toolkit.reproducibility.SampleDraws``: one per sample, so a sample's draws depend on the
        sample only); None: torch's global generator."""
        gen = draws or (lambda kind: None)
        process = process.for_latents(latents)   # Flux: σ shifted by the image size
        noise = objectives.randn(latents.shape, gen("noise"), latents.device)
        noise = objectives.offset_noise(noise, self.noise_offset, gen("offset"))
        if timesteps is None:
            t = self.timesteps
            density = "uniform" if t["scheme"] in objectives.FLOW_WEIGHTINGS else t["scheme"]
            timesteps = objectives.sample_timesteps_density(
                latents.shape[0], process.num_train_timesteps, density, t["min"], t["max"],
                t["logit_mean"], t["logit_std"], t["mode_scale"], latents.device, gen("timestep"))
        seen = objectives.perturb_noise(noise, self.input_perturbation, gen("perturbation")) if training else noise
        noisy = process.add_noise(latents, seen, timesteps)
        target = process.target(latents, noise, timesteps)
        return Noised(noisy, process.model_timesteps(timesteps), target,
                      self.weights(process, timesteps, batch, latents.device), self.mask(batch, latents))

    def weights(self, process: Process, timesteps: torch.Tensor, batch: Mapping[str, Any],
                device: torch.device) -> torch.Tensor | None:
        """Per-sample weights: min-SNR-γ × debiased estimation (DDPM) or SD3's weighting (flow) ×
        prior preservation (those switched on)."""
        if process.kind == "flow":
            weights = objectives.flow_weights(process.sigmas(timesteps), self.timesteps["scheme"])
        else:
            weights = objectives.min_snr_weights(process.scheduler, timesteps, self.snr_gamma)
        if self.debiased_estimation:
            debias = objectives.debiased_weights(process.scheduler, timesteps)
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
