"""The denoising objective of latent diffusion, as pure functions.

    x_t = sqrt(ᾱ_t)·x_0 + sqrt(1-ᾱ_t)·ε           (scheduler.add_noise)
    target = ε                      (prediction_type = epsilon)
           = sqrt(ᾱ_t)·ε - sqrt(1-ᾱ_t)·x_0      (prediction_type = v_prediction)
    loss  = mean_i w_i · ||f(x_t, t, c) - target||²,  w_i = min(SNR_i, γ)/SNR_i (ε) or /(SNR_i+1) (v)

There is no discriminator: training minimises the denoising loss only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr


def sample_timesteps(
    n: int, num_train_timesteps: int, min_timestep: int = 0, max_timestep: int | None = None,
    device: torch.device | str = "cpu", generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Uniform integer timesteps in [min_timestep, max_timestep) (default: the whole schedule)."""
    hi = num_train_timesteps if max_timestep is None else max_timestep
    if not 0 <= min_timestep < hi <= num_train_timesteps:
        raise ValueError(
            f"timestep range [{min_timestep}, {hi}) must lie inside [0, {num_train_timesteps})"
        )
    return torch.randint(min_timestep, hi, (n,), device=device, generator=generator).long()


def offset_noise(noise: torch.Tensor, strength: float, generator: torch.Generator | None = None
                 ) -> torch.Tensor:
    """Add a per-sample, per-channel constant (Guttenberg's noise offset) to Gaussian noise."""
    if strength == 0:
        return noise
    shift = torch.randn(noise.shape[0], noise.shape[1], 1, 1, device=noise.device,
                        dtype=noise.dtype, generator=generator)
    return noise + strength * shift


def training_target(scheduler: DDPMScheduler, latents: torch.Tensor, noise: torch.Tensor,
                    timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet must predict, read from ``scheduler.config.prediction_type``."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unsupported prediction_type {kind!r} (expected epsilon or v_prediction)")


def min_snr_weights(scheduler: DDPMScheduler, timesteps: torch.Tensor, gamma: float | None
                    ) -> torch.Tensor | None:
    """Min-SNR-γ loss weights (Hang et al. 2023); None when γ is unset."""
    if gamma is None:
        return None
    snr = compute_snr(scheduler, timesteps)
    clipped = torch.clamp(snr, max=gamma)
    if scheduler.config.prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return clipped / snr


def weighted_mse(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None
                 ) -> torch.Tensor:
    """Per-sample MSE, optionally weighted, averaged over the batch (in float32)."""
    per_sample = (pred.float() - target.float()).pow(2).flatten(1).mean(1)
    if weights is not None:
        per_sample = per_sample * weights.to(per_sample)
    return per_sample.mean()


def drop_captions(captions: Sequence[str], p: float, generator: torch.Generator | None = None
                  ) -> list[str]:
    """Replace each caption with "" with probability p, so classifier-free guidance keeps working."""
    if p <= 0:
        return list(captions)
    keep = torch.rand(len(captions), generator=generator) >= p
    return [c if k else "" for c, k in zip(captions, keep.tolist())]
