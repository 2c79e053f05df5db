"""Train a diffusers ``AutoencoderKL`` from scratch (SD's first stage, in miniature).

    loss = ||x̂ - x||² + l1_weight·|x̂ - x| + kl_weight·KL(q(z|x) || N(0, I))

with x̂ decoded from a posterior *sample* (so the decoder tolerates the sampling noise the
UNet's latents will have). No perceptual or GAN loss: at 32 px, L1+L2 is enough for flat
colours and stripes, and neither LPIPS nor a discriminator is available offline.
After training, ``scaling_factor = 1 / std(z)`` is measured on data (SD's recipe), so that
``z · scaling_factor`` has unit variance as the noise schedule assumes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import lightning as L
import torch
from diffusers import AutoencoderKL

from toolkit.training.optimizers import optimizers


def reconstruction_losses(x: torch.Tensor, x_hat: torch.Tensor) -> dict[str, torch.Tensor]:
    """Batch-mean L2, L1 and image-gradient L1 (edges and stripes) between images in [-1, 1]."""
    grad = lambda t: (t[..., 1:, :] - t[..., :-1, :], t[..., :, 1:] - t[..., :, :-1])
    edge = sum((a - b).abs().mean() for a, b in zip(grad(x_hat), grad(x), strict=True))
    return {"mse": (x_hat - x).pow(2).mean(), "l1": (x_hat - x).abs().mean(), "grad": edge}


@torch.no_grad()
def reconstruct(vae: AutoencoderKL, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Decode the posterior mode of ``x`` (how a pipeline round-trips an image)."""
    out = [vae.decode(vae.encode(b).latent_dist.mode()).sample for b in x.split(batch_size)]
    return torch.cat(out).clamp(-1, 1)


@torch.no_grad()
def latent_std(vae: AutoencoderKL, x: torch.Tensor, batch_size: int = 256, seed: int = 0) -> float:
    """Std of posterior samples over ``x``: SD sets ``scaling_factor`` to its inverse."""
    g = torch.Generator().manual_seed(seed)
    z = [vae.encode(b).latent_dist.sample(generator=g) for b in x.split(batch_size)]
    return float(torch.cat(z).std())


class AutoencoderPretraining(L.LightningModule):
    """Args:
        vae: ``AutoencoderKL`` constructor kwargs (the saved ``config.json``).
        optimizer: partial optimizer, called with the parameters.
        lr_scheduler: partial ``diffusers.optimization.get_scheduler`` (called with the
            optimizer and ``num_training_steps``), or None for a constant LR.
        kl_weight: weight of the KL term (small: SD's f=8 VAE uses 1e-6).
        l1_weight: weight of the L1 term, added to the MSE.
        init_from: an AutoencoderKL directory to start from (a second stage on other data);
            its weights must fit ``vae`` exactly. None: random initialisation.
        grad_weight: weight of the image-gradient L1 term (sharp edges; 0: off).
        train_encoder: False trains the decoder alone, so the latent space (and a UNet trained
            on it) stays valid: SD's own ``ft-MSE`` VAE was made this way.
    """

    def __init__(self, vae: Mapping[str, Any], optimizer: Callable[..., torch.optim.Optimizer],
                 lr_scheduler: Callable[..., Any] | None = None, kl_weight: float = 1e-6,
                 l1_weight: float = 1.0, init_from: str | None = None, grad_weight: float = 0.0,
                 train_encoder: bool = True) -> None:
        super().__init__()
        self.vae = AutoencoderKL(**vae)
        if init_from is not None:   # strict: a config that differs from the saved model fails here
            self.vae.load_state_dict(AutoencoderKL.from_pretrained(init_from).state_dict())
        self.optimizer_fn, self.lr_scheduler_fn = optimizer, lr_scheduler
        self.kl_weight, self.l1_weight, self.grad_weight = kl_weight, l1_weight, grad_weight
        if not train_encoder:
            for part in (self.vae.encoder, self.vae.quant_conv):
                part.requires_grad_(False)

    def training_step(self, batch: tuple[torch.Tensor], batch_idx: int) -> torch.Tensor:
        (x,) = batch
        posterior = self.vae.encode(x).latent_dist
        x_hat = self.vae.decode(posterior.sample()).sample
        rec = reconstruction_losses(x, x_hat)
        kl = posterior.kl().mean() / x[0].numel()   # per pixel, comparable to the MSE
        loss = rec["mse"] + self.l1_weight * rec["l1"] + self.grad_weight * rec["grad"] + self.kl_weight * kl
        self.log_dict({"train/loss": loss, "train/mse": rec["mse"], "train/l1": rec["l1"],
                       "train/grad": rec["grad"], "train/kl": kl}, prog_bar=True)
        return loss

    def configure_optimizers(self) -> Any:
        trainable = [p for p in self.parameters() if p.requires_grad]
        return optimizers(trainable, self.optimizer_fn, self.lr_scheduler_fn, self.trainer.max_steps)
