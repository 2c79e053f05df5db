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
from typing import Any

import torch

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
        compile_check: the largest relative difference (per trained tensor, ‖g_compiled − g_eager‖
            / ‖g_eager‖) allowed between the compiled and the eager UNet's gradients on the first
            training batch, checked once before the first update; None: not checked. Inductor
            miscompiles some UNets (bench/compile_gradients.py: 0.5–1.0 there; a right compile is
            ~1e-6 in fp32, and bf16 rounding stays far below 5e-2): a run fails rather than train
            on wrong gradients.
    """

    gradient_checkpointing: bool = False
    attention: str = "sdpa"
    channels_last: bool = False
    compile: bool | str = False
    compile_cache: str | None = None
    compile_min_steps: Mapping[str, int] = field(default_factory=dict)
    compile_check: float | None = 5e-2

    def __post_init__(self) -> None:
        if self.attention not in ("sdpa", "default"):
            raise ValueError(f"module.speed.attention={self.attention!r}: expected 'sdpa' or 'default'")
        if self.compile not in (True, False, "auto"):
            raise ValueError(f"module.speed.compile={self.compile!r}: expected true, false or auto")

    def before_adapters(self, denoiser: torch.nn.Module, vae: torch.nn.Module, family: Any) -> None:
        """Attention processor (the family's for ``attention``) and memory format: set before the
        adapters are injected."""
        processor = family.sdpa_processor() if self.attention == "sdpa" else None
        if processor is not None:
            denoiser.set_attn_processor(processor)
        if self.channels_last:
            denoiser.to(memory_format=torch.channels_last)
            vae.to(memory_format=torch.channels_last)

    def after_adapters(self, denoiser: torch.nn.Module, trained_text_encoders: list[torch.nn.Module]) -> None:
        """Gradient checkpointing: set on the adapted modules."""
        if self.gradient_checkpointing:
            denoiser.enable_gradient_checkpointing()
            for enc in trained_text_encoders:
                enc.gradient_checkpointing_enable()

    def compiles(self, device_type: str, steps: int | None) -> bool:
        """Whether a run of ``steps`` optimizer steps (None: not known) on ``device_type`` compiles."""
        if self.compile != "auto":
            return bool(self.compile)
        need = self.compile_min_steps.get(device_type)
        return need is not None and steps is not None and steps >= need

    def compile_denoiser(self, denoiser: torch.nn.Module, device_type: str, steps: int | None) -> bool:
        """Compile ``denoiser`` in place if :meth:`compiles` says so (lazily: the first call compiles)."""
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
        denoiser.compile()
        return True

    def check_compiled(self, unet: torch.nn.Module, args: tuple, kwargs: Mapping[str, Any]) -> None:
        """Gradients of the trained parameters through the compiled denoiser ``unet`` (in-place compiled:
        ``unet(...)``) against eager ``unet.forward(...)`` on the same inputs (detached: the check
        touches neither ``.grad`` nor the global RNG); fails above ``compile_check``."""
        if self.compile_check is None:
            return
        dropout = [n for n, m in unet.named_modules() if isinstance(m, torch.nn.Dropout) and m.p > 0 and m.training]
        if dropout:   # eager and compiled draw different masks: their gradients cannot be compared
            log.warning("module.speed.compile_check: not run, the UNet has active dropout (%s, …)", dropout[0])
            return
        names, params = zip(*[(n, p) for n, p in unet.named_parameters() if p.requires_grad])
        detach = lambda v: v.detach() if torch.is_tensor(v) else {k: detach(x) for k, x in v.items()} \
            if isinstance(v, Mapping) else v
        args, kwargs = tuple(detach(a) for a in args), {k: detach(v) for k, v in kwargs.items()}
        grads = []
        for call in (unet.forward, unet):
            out = call(*args, **kwargs).sample
            weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(0)).to(out)
            grads.append(torch.autograd.grad((out.float() * weight.float()).sum(), params, allow_unused=True))
        worst = sorted(((float((c - e).norm() / e.norm()), n) for n, e, c in zip(names, *grads)
                        if e is not None and c is not None and float(e.norm()) > 0), reverse=True)
        if not worst:
            return
        log.info("module.speed.compile_check: compiled vs eager gradients, worst relative difference %.1e (%s)",
                 *worst[0])
        if worst[0][0] > self.compile_check:
            raise RuntimeError(
                "module.speed.compile: the compiled UNet's gradients differ from the eager UNet's on the first "
                f"batch (relative, per tensor: {', '.join(f'{n} {d:.2g}' for d, n in worst[:3])}; allowed "
                f"{self.compile_check:g}): torch.compile {torch.__version__} miscompiles this model here. Nothing "
                "was trained. Set module.speed.compile=false (bench/compile_gradients.py reproduces it without "
                "the toolkit).")
