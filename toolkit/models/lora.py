"""LoRA adapters (peft) on the UNet and, optionally, the text encoder(s).

    y = W x + (α/r) · B A x          W: frozen base weight (d_out × d_in)
          ▲        ▲  ▲              A: r × d_in   (random init)
        frozen     │  └─ trainable   B: d_out × r  (zero init → the adapter starts as a no-op)
                   └──── trainable

Adapters are exported from the trained factors in every format of ``toolkit.adapters.formats``
(diffusers and kohya/A1111 by default), and a training run can start from any LoRA file
(``init_from_file``): rank, α and targets come from the file, and its update is verified to be
the one the model now applies.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers.training_utils import cast_training_params
from peft import LoraConfig, inject_adapter_in_model

from toolkit.adapters.formats import (
    FORMATS,
    KOHYA_FILE,
    AdapterFile,
    lora_config,
    save_diffusers,
    save_kohya,
)
from toolkit.adapters.layers import lora_from_model
from toolkit.adapters.loading import read_for, verify_loaded
from toolkit.models.families import ModelFamily

log = logging.getLogger(__name__)


def add_lora(model: torch.nn.Module, config: LoraConfig) -> list[torch.nn.Parameter]:
    """Attach a LoRA adapter (diffusers/transformers ``add_adapter``) and return its parameters.

    The base stays frozen; adapter weights are float32 even when the base is bf16/fp16.
    """
    try:
        model.add_adapter(config)
    except ValueError as err:
        # transformers>=5 refuses peft<0.22 in add_adapter even though the injection itself
        # works; do what add_adapter does with peft directly so text-encoder LoRA still trains.
        if "PEFT" not in str(err):
            raise
        inject_adapter_in_model(config, model, adapter_name="default")
        model.peft_config = {"default": config}
        model._hf_peft_config_loaded = True
    cast_training_params(model, dtype=torch.float32)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(
            f"LoRA target_modules={sorted(config.target_modules)} matched no layer of "
            f"{type(model).__name__}; check the module names (e.g. to_q, to_k, to_v, to_out.0)."
        )
    return params


def has_lora(model: torch.nn.Module | None) -> bool:
    return model is not None and bool(getattr(model, "peft_config", None))


def init_from_file(models: Mapping[str, torch.nn.Module], family: type[ModelFamily], path: str | Path,
                   dropout: float = 0.0) -> tuple[AdapterFile, dict[str, list[torch.nn.Parameter]]]:
    """Add LoRA layers shaped like the file's (rank, α, targets per layer) and load its factors.

    Returns the file as read and the trainable parameters per component. Fails if the file has
    layers the base model lacks, or if the update the model applies afterwards is not the file's.
    """
    af = read_for(path, models, family)
    params = {}
    for comp, layers in af.layers.items():
        if not layers:
            continue
        model = models[comp]
        params[comp] = add_lora(model, lora_config(layers, lora_dropout=dropout, init_lora_weights=True))
        with torch.no_grad():
            for name, w in layers.items():
                mod = model.get_submodule(name)
                mod.lora_A["default"].weight.copy_(w.down.reshape(mod.lora_A["default"].weight.shape))
                mod.lora_B["default"].weight.copy_(w.up.reshape(mod.lora_B["default"].weight.shape))
    counts = verify_loaded({c: models[c] for c in af.layers}, "default", af, tol=1e-6)
    log.info("LoRA initialised from %s (%s, sha256 %s…): %s layers", af.path, af.format, af.sha256[:12], counts)
    return af, params


def trained_layers(models: Mapping[str, torch.nn.Module]) -> dict[str, Any]:
    return {c: lora_from_model(m) for c, m in models.items() if has_lora(m)}


def save_adapter(out_dir: str | Path, models: Mapping[str, torch.nn.Module], family: type[ModelFamily],
                 formats: Sequence[str] = FORMATS, metadata: Mapping[str, Any] | None = None) -> dict[str, Path]:
    """Write the trained adapter of ``models`` (component -> model) in each format.

    ``out_dir/pytorch_lora_weights.safetensors`` (diffusers) and ``out_dir/lora_kohya.safetensors``
    (kohya/A1111/ComfyUI, with ``metadata`` as its ``ss_*`` entries), each written atomically.
    """
    unknown = set(formats) - set(FORMATS)
    if unknown:
        raise ValueError(f"adapter formats {sorted(unknown)} unknown; choose from {list(FORMATS)}")
    layers = trained_layers(models)
    out_dir = Path(out_dir)
    out = {}
    if "diffusers" in formats:
        out["diffusers"] = save_diffusers(layers, out_dir, family)
    if "kohya" in formats:
        out["kohya"] = save_kohya(layers, out_dir / KOHYA_FILE, family, models["unet"].config, metadata)
    return out
