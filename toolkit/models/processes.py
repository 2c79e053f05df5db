"""The noise processes a denoiser is trained on, behind the one interface the objective uses.

    DDPM (SD, SDXL)        x_t = sqrt(ᾱ_t)·x₀ + sqrt(1−ᾱ_t)·ε      target ε or v (the scheduler's prediction_type)
    rectified flow (SD3,   x_t = (1−σ_t)·x₀ + σ_t·ε                 target ε − x₀ (the velocity), SD3 §2
    Flux)

``t`` is an integer index into the model's training schedule (``num_train_timesteps`` steps) that
counts up with the noise in both: DDPM's timestep, and for the flow the step whose σ is
``scheduler.sigmas[N−1−t]`` (diffusers stores the flow schedule from σ = 1 down), so
``timesteps.min/max`` and the validation timesteps mean the same on every family. A flow's σ_t
carries the shift its scheduler config declares (SD3: ``shift=3.0``, σ = s·u / (1 + (s−1)·u) with
u = (t+1)/N; Flux: the dynamic shift of the image's size, ``for_latents``); the denoiser sees the
scheduler's own timestep value for it (σ·N).

A family picks its process (``ModelFamily.noise_process``); the objective asks it for x_t, the
target and the model's timesteps, and refuses the options a process gives no meaning to.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch

from toolkit.models import objectives


class DDPM:
    """The DDPM process of ``scheduler`` (a ``DDPMScheduler``): ε- or v-prediction."""

    kind: ClassVar[str] = "ddpm"

    def __init__(self, scheduler: Any) -> None:
        self.scheduler = scheduler

    @property
    def num_train_timesteps(self) -> int:
        return self.scheduler.config.num_train_timesteps

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.scheduler.add_noise(latents, noise, t)

    def target(self, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return objectives.training_target(self.scheduler, latents, noise, t)

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def for_latents(self, latents: torch.Tensor) -> DDPM:
        return self

    def zero_terminal_snr(self) -> DDPM:
        """The same process with its betas rescaled to zero terminal SNR (v-prediction models only)."""
        if self.scheduler.config.prediction_type != "v_prediction":
            raise ValueError("module.objective.zero_terminal_snr=true needs a v-prediction model: at SNR 0 the "
                             "noise is the input, so ε-prediction has nothing to learn at t=T (Lin et al. 2024, §3.2)")
        return DDPM(type(self.scheduler).from_config(self.scheduler.config, rescale_betas_zero_snr=True))


class RectifiedFlow:
    """Rectified flow over a ``FlowMatchEulerDiscreteScheduler``'s schedule (its σ carry the config's shift).

    A scheduler config with ``use_dynamic_shifting`` (FLUX.1-dev) shifts σ by the image size: its
    family gives ``image_seq_len`` (latents' shape -> the denoiser's sequence length), and
    ``for_latents`` returns the process at a batch's size: μ from the scheduler config's line
    (``calculate_shift``, as the pipeline samples) and σ' = the scheduler's own ``time_shift(μ, 1, σ)``.
    """

    kind: ClassVar[str] = "flow"

    def __init__(self, scheduler: Any, image_seq_len: Callable[[Sequence[int]], int] | None = None) -> None:
        dynamic = bool(scheduler.config.get("use_dynamic_shifting"))
        if dynamic and image_seq_len is None:
            raise ValueError("this scheduler shifts σ by the image size (use_dynamic_shifting): its family must "
                             "give the sequence length of a batch; SD3's scheduler has a fixed shift")
        self.scheduler = scheduler
        self.image_seq_len = image_seq_len if dynamic else None
        # the training schedule as built from the config (a scheduler's set_timesteps replaces its arrays)
        self._sigmas, self._timesteps = scheduler.sigmas.clone().cpu(), scheduler.timesteps.clone().cpu()
        if len(self._sigmas) != self.num_train_timesteps:
            raise ValueError(f"a flow schedule of {len(self._sigmas)} steps, not num_train_timesteps="
                             f"{self.num_train_timesteps}: pass the scheduler as loaded, before set_timesteps")

    def for_latents(self, latents: torch.Tensor) -> RectifiedFlow:
        """The process at ``latents``' size: itself for a fixed shift, else σ shifted by μ(sequence length)."""
        if self.image_seq_len is None:
            return self
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        c = self.scheduler.config
        mu = calculate_shift(self.image_seq_len(latents.shape), c.base_image_seq_len, c.max_image_seq_len,
                             c.base_shift, c.max_shift)
        shifted = copy.copy(self)
        shifted.image_seq_len = None
        shifted._sigmas = self.scheduler.time_shift(mu, 1.0, self._sigmas.double()).float()
        shifted._timesteps = shifted._sigmas * self.num_train_timesteps
        return shifted

    @property
    def num_train_timesteps(self) -> int:
        return self.scheduler.config.num_train_timesteps

    def index(self, t: torch.Tensor) -> torch.Tensor:
        """Where step t sits in the scheduler's descending arrays."""
        return (self.num_train_timesteps - 1 - t.long()).cpu()

    def sigmas(self, t: torch.Tensor) -> torch.Tensor:
        return self._sigmas[self.index(t)].to(t.device)

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return objectives.flow_noisy(latents, noise, self.sigmas(t))

    def target(self, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return objectives.flow_target(latents, noise)

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        return self._timesteps[self.index(t)].to(t.device)
