"""The speed knobs of training (``module.speed``): one group, applied to the frozen pipeline once.
None changes what a step computes beyond floating-point order; ``bench/`` measures each."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.models.attention_processor import AttnProcessor2_0


@dataclass
class Speed:
    """Args:
        gradient_checkpointing: recompute UNet (and trained text encoder) activations in backward.
        attention: ``sdpa`` (PyTorch scaled_dot_product_attention) or ``default``.
        channels_last: UNet/VAE in channels-last memory format (faster convs on GPUs, bf16).
        compile: ``torch.compile`` the UNet in place (parameter names, hence checkpoints and
            adapters, are unchanged).
    """

    gradient_checkpointing: bool = False
    attention: str = "sdpa"
    channels_last: bool = False
    compile: bool = False

    def __post_init__(self) -> None:
        if self.attention not in ("sdpa", "default"):
            raise ValueError(f"module.speed.attention={self.attention!r}: expected 'sdpa' or 'default'")

    def before_adapters(self, unet: torch.nn.Module, vae: torch.nn.Module) -> None:
        """Attention processor and memory format: set before the adapters are injected."""
        if self.attention == "sdpa":
            unet.set_attn_processor(AttnProcessor2_0())
        if self.channels_last:
            unet.to(memory_format=torch.channels_last)
            vae.to(memory_format=torch.channels_last)

    def after_adapters(self, unet: torch.nn.Module, trained_text_encoders: list[torch.nn.Module]) -> None:
        """Checkpointing and compilation: set on the adapted modules."""
        if self.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
            for enc in trained_text_encoders:
                enc.gradient_checkpointing_enable()
        if self.compile:
            unet.compile()
