"""The frozen pipeline a config names, as meta skeletons (no weight loaded), and the cost of each
phase that runs it: what the plan prints and what the phases themselves use to choose their batch
from ``memory.budget_gib`` (the same functions, so the plan's batch is the batch that runs).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from toolkit.models import footprints as fp
from toolkit.models.families import ModelFamily
from toolkit.models.memory import Scaled
from toolkit.models.pretrained import config_root, is_single_file, resolve_dtype, skeletons
from toolkit.models.quantize import quantized_bytes


@dataclass
class Parts:
    """A pipeline's skeletons (meta device) and what its weights take where they sit."""

    family: type[ModelFamily]
    unet: torch.nn.Module
    encoders: list[torch.nn.Module]
    vae: torch.nn.Module
    dtype: torch.dtype
    quantize: str | None
    quantize_text: bool

    @property
    def vae_dtype(self) -> torch.dtype:
        return fp.vae_dtype_of(self.vae, self.dtype)

    @property
    def factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def latent(self, height: int, width: int) -> tuple[int, int]:
        return height // self.factor, width // self.factor

    @property
    def native(self) -> int:
        """The family's native size in pixels (Flux's from its pipeline: its transformer config has none)."""
        return self.family.native_size(self.unet.config, self.factor)

    def weights(self) -> dict[str, int]:
        """Bytes per component, as loaded: the denoiser (and trained text encoders) quantized if asked."""
        out = {self.family.denoiser: quantized_bytes(self.unet, self.quantize, self.dtype)}
        for name, enc in zip(self.family.text_encoders, self.encoders):
            out[name] = quantized_bytes(enc, self.quantize if self.quantize_text else None, self.dtype)
        out["vae"] = quantized_bytes(self.vae, None, self.vae_dtype)
        return out


@functools.cache
def _parts(name: str, revision: str | None, config: str | None, vae: str | None, dtype: str, quantize: str | None,
           quantize_text: bool) -> Parts:
    with fp.meta_init():   # no initialiser runs: the skeletons' weights are never read
        family, models = skeletons(name, revision, config)
    root = vae or config_root(name, config)
    vae_skel = fp.vae_skeleton(root, None if vae else revision, _vae_subfolder(root) if vae else "vae",
                               family.vae_class)
    torch_dtype = resolve_dtype(dtype)
    return Parts(family, models[family.denoiser].to(torch_dtype),
                 [models[e].to(torch_dtype) for e in family.text_encoders],
                 vae_skel.to(fp.vae_dtype_of(vae_skel, torch_dtype)), torch_dtype, quantize, quantize_text)


def _vae_subfolder(root: str) -> str | None:
    from pathlib import Path

    local = Path(root).expanduser()
    return None if (local / "config.json").is_file() or not (local / "vae").is_dir() else "vae"


def parts(model: Mapping[str, Any] | DictConfig, quantize_text: bool = False) -> Parts:
    """The skeletons of ``cfg.model`` (cached per process; nothing is loaded)."""
    m = OmegaConf.to_container(model, resolve=True) if isinstance(model, DictConfig) else dict(model)
    return _parts(str(m["name_or_path"]), m.get("revision"), m.get("config"), m.get("vae"), str(m.get("dtype")),
                  m.get("quantize"), quantize_text)


def single_file(model: Mapping[str, Any]) -> bool:
    return is_single_file(str(model["name_or_path"]))


# ------------------------------------------------------------------ phase costs (bytes beyond resident weights)

def generation_cost(p: Parts, height: int, width: int, guidance: float, traces: str | None) -> Any:
    return fp.generation(p.family, p.unet, p.encoders, p.vae, p.latent(height, width), p.dtype, guidance > 1,
                         "cpu", traces)


def encode_costs(p: Parts, size: tuple[int, int], flips: int, traces: str | None) -> tuple[Any, Any]:
    """(latent cache per item: ``flips`` images each; text cache per caption)."""
    text, _ = fp.text_encode(p.family, p.encoders, p.dtype, traces)
    return Scaled(fp.vae_encode(p.vae, size, p.vae_dtype, traces), flips), text


def conditioning(p: Parts, traces: str | None) -> dict[str, list[int]]:
    return fp.text_encode(p.family, p.encoders, p.dtype, traces)[1]
