"""Adapters (peft) on the denoiser and, optionally, the text encoder(s): LoRA, DoRA, LoHa, LoKr.

    y = W x + (α/r) · B A x          W: frozen base weight (d_out × d_in)
          ▲        ▲  ▲              A: r × d_in   (random init)
        frozen     │  └─ trainable   B: d_out × r  (zero init → the adapter starts as a no-op)
                   └──── trainable

The adapter type is the peft config class (``LoraConfig``, with ``use_dora`` for DoRA;
``LoHaConfig``; ``LoKrConfig``), chosen by ``module=lora|dora|loha|lokr``. Adapters are exported
from the trained factors in every format of ``toolkit.adapters.formats`` that can carry them
(diffusers and kohya/LyCORIS), and a training run can start from any adapter file
(``init_from_file``): kind, rank, α and targets come from the file, and its update is verified
to be the one the model now applies.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers.training_utils import cast_training_params
from peft import PeftConfig, inject_adapter_in_model

from toolkit.adapters.formats import (
    FORMATS,
    KOHYA_FILE,
    AdapterFile,
    peft_config,
    save_diffusers,
    save_kohya,
)
from toolkit.adapters.layers import layers_from_model
from toolkit.adapters.loading import read_for, set_factors, verify_loaded
from toolkit.models.families import ModelFamily

log = logging.getLogger(__name__)


ADAPTER_TYPES = ("lora", "dora", "loha", "lokr")


def adapter_config(type: str = "lora", r: int = 4, alpha: float = 4, dropout: float = 0.0,
                   target_modules: Sequence[str] = ("to_q", "to_k", "to_v", "to_out.0"),
                   init: str | bool = "gaussian", decompose_both: bool = False, decompose_factor: int = -1,
                   use_rslora: bool = False) -> PeftConfig:
    """The peft config of one adapter type (the ``module.lora`` config node).

    Args:
        type: ``lora``, ``dora`` (LoRA with a learned magnitude per output row, Liu et al. 2024),
            ``loha`` (Hadamard product of two rank-r products) or ``lokr`` (Kronecker product).
        r: rank. alpha: α; the update is scaled by α / r.
        dropout: LoRA/DoRA dropout; LoHa/LoKr rank dropout.
        target_modules: module name suffixes to adapt (attention, feed-forward, conv ...).
        init: LoRA/DoRA init of A (``gaussian``, ``true`` = kaiming); B starts at zero either way.
        decompose_both / decompose_factor: LoKr's factorisation (peft / LyCORIS meaning).
        use_rslora: scale by α / √r (LoRA/DoRA).
    """
    from peft import LoHaConfig, LoKrConfig, LoraConfig

    targets = list(target_modules)
    if type in ("lora", "dora"):
        return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, init_lora_weights=init,
                          target_modules=targets, use_dora=type == "dora", use_rslora=use_rslora)
    if type == "loha":
        return LoHaConfig(r=r, alpha=alpha, rank_dropout=dropout, target_modules=targets)
    if type == "lokr":
        return LoKrConfig(r=r, alpha=alpha, rank_dropout=dropout, target_modules=targets,
                          decompose_both=decompose_both, decompose_factor=decompose_factor)
    raise ValueError(f"module.lora.type={type!r}: expected one of {ADAPTER_TYPES}")


def add_lora(model: torch.nn.Module, config: PeftConfig) -> list[torch.nn.Parameter]:
    """Attach an adapter (diffusers/transformers ``add_adapter``) and return its parameters.

    The base stays frozen; adapter weights are float32 even when the base is bf16/fp16.
    """
    try:
        model.add_adapter(config)
    except ValueError as err:
        # transformers>=5 refuses peft<0.22 (and non-LoRA configs) in add_adapter even though the
        # injection itself works; do what add_adapter does with peft directly.
        if "PEFT" not in str(err) and "LoRA" not in str(err):
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
    """Add adapter layers shaped like the file's (kind, rank, α, targets per layer) and load its factors.

    Returns the file as read and the trainable parameters per component. Fails if the file has
    layers the base model lacks, or if the update the model applies afterwards is not the file's.
    """
    af = read_for(path, models, family)
    params = {}
    for comp, layers in af.layers.items():
        if not layers:
            continue
        model = models[comp]
        params[comp] = add_lora(model, peft_config(layers, lora_dropout=dropout))
        set_factors(model, "default", layers)
    counts = verify_loaded({c: models[c] for c in af.layers}, "default", af, tol=1e-6)
    log.info("LoRA initialised from %s (%s, sha256 %s…): %s layers", af.path, af.format, af.sha256[:12], counts)
    return af, params


def trained_layers(models: Mapping[str, torch.nn.Module]) -> dict[str, Any]:
    return {c: layers_from_model(m) for c, m in models.items() if has_lora(m)}


def save_adapter(out_dir: str | Path, models: Mapping[str, torch.nn.Module], family: type[ModelFamily],
                 formats: Sequence[str] = FORMATS, metadata: Mapping[str, Any] | None = None) -> dict[str, Path]:
    """Write the trained adapter of ``models`` (component -> model) in each format that can carry it.

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
        out["diffusers"] = save_diffusers(layers, out_dir, family,
                                          {k: str(v) for k, v in (metadata or {}).items() if k.startswith("toolkit_")})
    if "kohya" in formats:
        out["kohya"] = save_kohya(layers, out_dir / KOHYA_FILE, family, models[family.denoiser].config, metadata)
    return out
