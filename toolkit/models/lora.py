"""LoRA adapters (peft) on the UNet and, optionally, the text encoder.

    y = W x + (α/r) · B A x          W: frozen base weight (d_out × d_in)
          ▲        ▲  ▲              A: r × d_in   (random init)
        frozen     │  └─ trainable   B: d_out × r  (zero init → the adapter starts as a no-op)
                   └──── trainable

Adapters are exported in the diffusers format (``pytorch_lora_weights.safetensors``) that a
stock ``StableDiffusionPipeline.load_lora_weights(dir)`` reads; the peft config (rank, alpha,
targets) travels in the safetensors metadata so alpha ≠ rank loads with the right scale.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from diffusers.training_utils import cast_training_params
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig, inject_adapter_in_model
from peft.utils import get_peft_model_state_dict

WEIGHT_NAME = "pytorch_lora_weights.safetensors"


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


def save_adapter(out_dir: str | Path, unet: torch.nn.Module,
                 text_encoder: torch.nn.Module | None = None) -> Path:
    """Write ``out_dir/pytorch_lora_weights.safetensors`` atomically (temp file, then rename)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    layers, meta = {}, {}
    for name, model in (("unet", unet), ("text_encoder", text_encoder)):
        if has_lora(model):
            sd = get_peft_model_state_dict(model)
            layers[f"{name}_lora_layers"] = convert_state_dict_to_diffusers(
                {k: v.detach().float().cpu() for k, v in sd.items()}
            )
            meta[f"{name}_lora_adapter_metadata"] = model.peft_config["default"].to_dict()
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".tmp-") as tmp:
        StableDiffusionPipeline.save_lora_weights(tmp, **layers, **meta)
        os.replace(Path(tmp) / WEIGHT_NAME, out_dir / WEIGHT_NAME)
    return out_dir / WEIGHT_NAME
