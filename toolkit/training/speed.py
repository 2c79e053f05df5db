"""The speed knobs of training (``module.speed``): one group, applied to the frozen pipeline once.
None changes what a step computes beyond floating-point order; ``bench/`` measures each."""

from __future__ import annotations

import logging
import os
import platform
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers.models.attention_processor import AttnProcessor2_0

log = logging.getLogger(__name__)


def compile_namespace() -> str:
    """The folder of one torch build on one kind of machine inside ``compile_cache``.

    torch keys each cached graph itself (the graph, input shapes/strides/dtypes, the Inductor
    config, torch's version and source hash, the device and compiler); the namespace keeps builds
    and machines apart on top of that, so a cache shared over NFS or copied to another machine
    is never even looked up by the wrong torch or instruction set."""
    parts = [f"torch-{torch.__version__}", f"py{sys.version_info.major}{sys.version_info.minor}", platform.machine(),
             torch.backends.cpu.get_cpu_capability()]
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        parts.append(f"cuda{torch.version.cuda}-sm{major}{minor}")
    return "-".join(p.replace("/", "_").replace(" ", "_") for p in parts)


@dataclass
class Speed:
    """Args:
        gradient_checkpointing: recompute UNet (and trained text encoder) activations in backward.
        attention: ``sdpa`` (PyTorch scaled_dot_product_attention) or ``default``.
        channels_last: UNet/VAE in channels-last memory format (faster convs on GPUs, bf16).
        compile: ``torch.compile`` the UNet in place (parameter names, hence checkpoints and
            adapters, are unchanged): ``true``, ``false`` or ``auto`` (on when the run has at least
            ``compile_min_steps[device type]`` optimizer steps: long enough to pay for compiling).
        compile_cache: where torch keeps compiled graphs between runs (Inductor's FX graph cache
            and the AOTAutograd cache, in :func:`compile_namespace`); None: torch's default
            (``/tmp/torchinductor_<user>``, lost with /tmp).
        compile_min_steps: ``auto``'s threshold per device type (``cpu``, ``cuda``, …); a device
            type not listed is never compiled by ``auto``.
    """

    gradient_checkpointing: bool = False
    attention: str = "sdpa"
    channels_last: bool = False
    compile: bool | str = False
    compile_cache: str | None = None
    compile_min_steps: Mapping[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.attention not in ("sdpa", "default"):
            raise ValueError(f"module.speed.attention={self.attention!r}: expected 'sdpa' or 'default'")
        if self.compile not in (True, False, "auto"):
            raise ValueError(f"module.speed.compile={self.compile!r}: expected true, false or auto")

    def before_adapters(self, unet: torch.nn.Module, vae: torch.nn.Module) -> None:
        """Attention processor and memory format: set before the adapters are injected."""
        if self.attention == "sdpa":
            unet.set_attn_processor(AttnProcessor2_0())
        if self.channels_last:
            unet.to(memory_format=torch.channels_last)
            vae.to(memory_format=torch.channels_last)

    def after_adapters(self, unet: torch.nn.Module, trained_text_encoders: list[torch.nn.Module]) -> None:
        """Gradient checkpointing: set on the adapted modules."""
        if self.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
            for enc in trained_text_encoders:
                enc.gradient_checkpointing_enable()

    def compiles(self, device_type: str, steps: int | None) -> bool:
        """Whether a run of ``steps`` optimizer steps (None: not known) on ``device_type`` compiles."""
        if self.compile != "auto":
            return bool(self.compile)
        need = self.compile_min_steps.get(device_type)
        return need is not None and steps is not None and steps >= need

    def compile_unet(self, unet: torch.nn.Module, device_type: str, steps: int | None) -> bool:
        """Compile ``unet`` in place if :meth:`compiles` says so (lazily: the first call compiles)."""
        on = self.compiles(device_type, steps)
        if self.compile == "auto":
            log.info("module.speed.compile=auto: %s (trainer.max_steps=%s; compile_min_steps.%s=%s)",
                     "on" if on else "off", steps, device_type, self.compile_min_steps.get(device_type))
        if not on:
            return False
        if self.compile_cache:
            where = Path(self.compile_cache) / compile_namespace()
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(where)   # read by torch each time it looks a graph up
            log.info("torch.compile cache: %s", where)
        unet.compile()
        return True
