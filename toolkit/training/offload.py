"""Frozen encoders off the accelerator once the caches hold everything they would compute.

With the latent and text caches filled, a step runs the UNet alone: the VAE and the text
encoders only sit in GPU memory (SDXL: 1.8 GiB in bf16 with its float32 VAE). They move to host
memory (``offload``) and come back only around the phases that run them: the sample grid and
class images (``on_device``). On a CPU run the device is host memory: nothing moves.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch

log = logging.getLogger(__name__)
HOST = torch.device("cpu")


def frozen_encoders(module: Any) -> dict[str, torch.nn.Module]:
    """The VAE and the text encoders that are not trained, by pipeline name."""
    out = {"vae": module.vae}
    if not module.text_lora_params:
        out.update({n: getattr(module, n) for n in module.family.text_encoders})
    return out


def offload(module: Any, names: list[str]) -> int:
    """Move the named frozen encoders to host memory; returns the bytes that left the device."""
    if module.device.type == "cpu":
        return 0
    moved = 0
    for name, m in frozen_encoders(module).items():
        if name in names:
            moved += sum(t.numel() * t.element_size() for t in (*m.parameters(), *m.buffers()))
            m.to(HOST)
    if moved:
        if module.device.type == "cuda":
            torch.cuda.empty_cache()
        log.info("frozen %s moved off %s (%.2f GiB): the caches hold all they compute; back only for sample grids "
                 "and class images", ", ".join(names), module.device, moved / 2**30)
    return moved


@contextlib.contextmanager
def on_device(module: Any) -> Iterator[None]:
    """The frozen encoders on the module's device for the block (the pipeline runs them), then
    back where they were."""
    away = {n: m for n, m in frozen_encoders(module).items() if next(m.parameters()).device != module.device}
    for m in away.values():
        m.to(module.device)
    try:
        yield
    finally:
        for m in away.values():
            m.to(HOST)
        if away and module.device.type == "cuda":
            torch.cuda.empty_cache()
