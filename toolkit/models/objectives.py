"""The denoising objective of latent diffusion, as pure functions.

    DDPM   x_t = sqrt(ᾱ_t)·x_0 + sqrt(1-ᾱ_t)·ε           (scheduler.add_noise)
           target = ε                      (prediction_type = epsilon)
                  = sqrt(ᾱ_t)·ε - sqrt(1-ᾱ_t)·x_0      (prediction_type = v_prediction)
    flow   x_t = (1-σ)·x_0 + σ·ε,  target = ε - x_0      (rectified flow, SD3 §2)
    loss  = mean_i w_i · ρ(f(x_t, t, c) - target),  w_i = min(SNR_i, γ)/SNR_i (ε) or /(SNR_i+1) (v);
            flow: w_i = 1, σ⁻² (sigma_sqrt) or 2 / (π(1 − 2σ + 2σ²)) (cosmap), SD3's weightings

Options, each a pure function below: timestep densities (uniform, logit-normal, mode — diffusers'
``compute_density_for_timestep_sampling``, SD3 §3.1), the zero-terminal-SNR beta rescale (Lin et al.
2024, for v-prediction; diffusers' ``rescale_betas_zero_snr``), input perturbation (Ning et al.
2023: the UNet sees x_t built from ε + γ·ξ, the target stays ε), the per-element penalty ρ (squared
error, Huber, smooth-L1), debiased-estimation weights (Yu et al. 2024: 1/√SNR for ε, 1/(SNR+1) for
v, SNR capped at 1000 as kohya does), and per-pixel masks (weights in latent space).

There is no discriminator: training minimises the denoising loss only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_snr

TIMESTEP_SAMPLING = ("uniform", "logit_normal", "mode")
# SD3's loss weightings: uniform timesteps, the weight on the loss (diffusers' weighting_scheme names)
FLOW_WEIGHTINGS = ("sigma_sqrt", "cosmap")
LOSSES = ("mse", "huber", "smooth_l1")
# One generator for the batch, or one per sample (sample i drawn from its own: toolkit.reproducibility)
Generators = torch.Generator | Sequence[torch.Generator] | None


def per_sample(generator: Generators) -> bool:
    return isinstance(generator, Sequence)


def randn(shape: Sequence[int], generator: Generators = None, device: torch.device | str = "cpu",
          dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard normal draws of ``shape``; with one generator per sample, row i from generator i
    (drawn on the CPU, where the generators live, then moved)."""
    if per_sample(generator):
        if len(generator) != shape[0]:
            raise ValueError(f"{len(generator)} generators for {shape[0]} samples")
        return torch.stack([torch.randn(tuple(shape[1:]), generator=g, dtype=dtype) for g in generator]).to(device)
    return torch.randn(tuple(shape), generator=generator, device=device, dtype=dtype)


def sample_timesteps(
    n: int, num_train_timesteps: int, min_timestep: int = 0, max_timestep: int | None = None,
    device: torch.device | str = "cpu", generator: Generators = None,
) -> torch.Tensor:
    """Uniform integer timesteps in [min_timestep, max_timestep) (default: the whole schedule)."""
    hi = num_train_timesteps if max_timestep is None else max_timestep
    if not 0 <= min_timestep < hi <= num_train_timesteps:
        raise ValueError(
            f"timestep range [{min_timestep}, {hi}) must lie inside [0, {num_train_timesteps})"
        )
    if per_sample(generator):
        return torch.cat([torch.randint(min_timestep, hi, (1,), generator=g) for g in generator]).long().to(device)
    return torch.randint(min_timestep, hi, (n,), device=device, generator=generator).long()


def sample_timesteps_density(
    n: int, num_train_timesteps: int, scheme: str = "uniform", min_timestep: int = 0, max_timestep: int | None = None,
    logit_mean: float = 0.0, logit_std: float = 1.0, mode_scale: float = 1.29,
    device: torch.device | str = "cpu", generator: Generators = None,
) -> torch.Tensor:
    """Integer timesteps in [min, max) drawn from a density over u ∈ [0, 1): ``uniform`` (the
    classic DDPM draw, bit-identical to :func:`sample_timesteps`), ``logit_normal`` (u = σ(N(m, s)),
    mass in the middle of the schedule) or ``mode`` (SD3's mode sampling with ``mode_scale``)."""
    if scheme == "uniform":
        return sample_timesteps(n, num_train_timesteps, min_timestep, max_timestep, device, generator)
    if scheme not in TIMESTEP_SAMPLING:
        raise ValueError(f"timestep sampling {scheme!r}: expected one of {TIMESTEP_SAMPLING}")
    hi = num_train_timesteps if max_timestep is None else max_timestep
    if not 0 <= min_timestep < hi <= num_train_timesteps:
        raise ValueError(f"timestep range [{min_timestep}, {hi}) must lie inside [0, {num_train_timesteps})")
    def density(k: int, g: torch.Generator | None) -> torch.Tensor:
        return compute_density_for_timestep_sampling(scheme, k, logit_mean=logit_mean, logit_std=logit_std,
                                                     mode_scale=mode_scale, device="cpu", generator=g)

    u = torch.cat([density(1, g) for g in generator]) if per_sample(generator) else density(n, generator)
    t = min_timestep + (u.clamp(0, 1 - 1e-7) * (hi - min_timestep)).long()
    return t.to(device)


def flow_noisy(latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """The rectified-flow sample x_t = (1 − σ)·x₀ + σ·ε (one σ per sample)."""
    s = sigmas.reshape(-1, *[1] * (latents.ndim - 1)).to(latents)
    return (1.0 - s) * latents + s * noise


def flow_target(latents: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The rectified-flow target: the velocity ε − x₀ (d x_t / dσ)."""
    return noise - latents


def flow_weights(sigmas: torch.Tensor, scheme: str) -> torch.Tensor | None:
    """SD3's loss weightings (SD3 §3.1, diffusers' ``compute_loss_weighting_for_sd3``): σ⁻² for
    ``sigma_sqrt``, 2 / (π(1 − 2σ + 2σ²)) for ``cosmap``; None (all 1) for the density schemes."""
    s = sigmas.float()
    if scheme == "sigma_sqrt":
        return s ** -2.0
    if scheme == "cosmap":
        return 2 / (torch.pi * (1 - 2 * s + 2 * s ** 2))
    return None


def perturb_noise(noise: torch.Tensor, gamma: float, generator: Generators = None) -> torch.Tensor:
    """Input perturbation: the noise the sample is built from is ε + γ·ξ (the target stays ε)."""
    if gamma == 0:
        return noise
    return noise + gamma * randn(noise.shape, generator, noise.device, noise.dtype)


def debiased_weights(scheduler: DDPMScheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """Debiased estimation (Yu et al. 2024) as kohya's sd-scripts apply it: 1/√SNR (ε), 1/(SNR+1) (v),
    SNR capped at 1000 so the weight of t≈0 stays finite."""
    snr = torch.clamp(compute_snr(scheduler, timesteps), max=1000.0)
    return 1 / (snr + 1) if scheduler.config.prediction_type == "v_prediction" else 1 / snr.sqrt()


def prior_weights(is_prior: torch.Tensor, loss_weight: float) -> torch.Tensor:
    """Per-sample weights that make the batch mean equal mean(instance) + λ·mean(prior) (DreamBooth)."""
    n, n_prior = len(is_prior), is_prior.sum()
    return torch.where(is_prior.bool(), loss_weight * n / n_prior.clamp_min(1), n / (n - n_prior).clamp_min(1))


def offset_noise(noise: torch.Tensor, strength: float, generator: Generators = None) -> torch.Tensor:
    """Add a per-sample, per-channel constant (Guttenberg's noise offset) to Gaussian noise."""
    if strength == 0:
        return noise
    return noise + strength * randn((noise.shape[0], noise.shape[1], 1, 1), generator, noise.device, noise.dtype)


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


def elementwise_loss(pred: torch.Tensor, target: torch.Tensor, kind: str = "mse", delta: float = 1.0) -> torch.Tensor:
    """ρ per element in float32: squared error, Huber (quadratic below ``delta``, linear above,
    scaled as 2·Huber so it equals the squared error for small residuals), or smooth-L1."""
    p, t = pred.float(), target.float()
    if kind == "mse":
        return (p - t).pow(2)
    if kind == "huber":
        return 2 * torch.nn.functional.huber_loss(p, t, reduction="none", delta=delta)
    if kind == "smooth_l1":
        return torch.nn.functional.smooth_l1_loss(p, t, reduction="none", beta=delta)
    raise ValueError(f"loss {kind!r}: expected one of {LOSSES}")


def latent_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A (n, 1, H, W) pixel mask in [0, 1] averaged down to the latent grid (area weights)."""
    return torch.nn.functional.adaptive_avg_pool2d(mask.float(), size)


def weighted_loss(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None,
                  mask: torch.Tensor | None = None, kind: str = "mse", delta: float = 1.0) -> torch.Tensor:
    """Per-sample mean of ρ (over the masked area when a latent-grid mask is given), optionally
    weighted per sample, averaged over the batch (in float32). Masked-out elements contribute
    nothing, whatever their values."""
    err = elementwise_loss(pred, target, kind, delta)
    if mask is None:
        per_sample = err.flatten(1).mean(1)
    else:
        m = mask.to(err).expand_as(err)
        per_sample = (err * m).flatten(1).sum(1) / m.flatten(1).sum(1).clamp_min(1e-8)
    if weights is not None:
        per_sample = per_sample * weights.to(per_sample)
    return per_sample.mean()


def weighted_mse(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None
                 ) -> torch.Tensor:
    """Per-sample MSE, optionally weighted, averaged over the batch (in float32)."""
    return weighted_loss(pred, target, weights)


def drop_captions(captions: Sequence[str], p: float, generator: Generators = None) -> list[str]:
    """Replace each caption with "" with probability p, so classifier-free guidance keeps working."""
    if p <= 0:
        return list(captions)
    if per_sample(generator):
        keep = torch.cat([torch.rand(1, generator=g) for g in generator]) >= p
    else:
        keep = torch.rand(len(captions), generator=generator) >= p
    return [c if k else "" for c, k in zip(captions, keep.tolist())]
