"""Flux.1 in the original (Black Forest Labs) layout: the transformer as one file, and the module
names of kohya / musubi / ComfyUI LoRA files.

    from toolkit.models.single_file import pipeline_to_single_file
    pipeline_to_single_file(flux_pipe, "flux.safetensors")    # dispatches here for Flux

Layout (BFL's ``flux1-dev.safetensors``: the transformer only, no prefix; what ComfyUI's UNet loader
and diffusers' ``FluxTransformer2DModel.from_single_file`` read):

    img_in, txt_in, time_in / vector_in / guidance_in .{in_layer,out_layer}, final_layer.linear,
    final_layer.adaLN_modulation.1 (rows (shift, scale): diffusers' norm_out holds (scale, shift))
    double_blocks.{i}.{img,txt}_attn.qkv (q, k, v stacked along the rows), .{img,txt}_attn.proj,
        .{img,txt}_attn.norm.{query,key}_norm.scale, .{img,txt}_mlp.{0,2}, .{img,txt}_mod.lin
    single_blocks.{i}.linear1 (q, k, v and the MLP's input stacked along the rows), .linear2,
        .modulation.lin, .norm.{query,key}_norm.scale

kohya's sd-scripts (``networks/lora_flux.py``) and musubi-tuner name LoRA layers after these modules
(``lora_unet_double_blocks_0_img_attn_qkv``), as ComfyUI reads them.

Why hand-written: diffusers ships only the reader (``convert_flux_transformer_checkpoint_to_diffusers``
and, for LoRA files, ``_convert_kohya_flux_lora_to_diffusers``). This is their inverse; the tests read
what is written here back with those readers. Both readers assume FLUX.1's widths (3072, MLP 4x) for
the single blocks' ``linear1``, so a narrower test model is checked with them at FLUX.1's widths.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Mapping
from typing import Any

import torch

_FIXED = {"x_embedder": "img_in", "context_embedder": "txt_in",
          "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
          "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
          "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
          "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
          "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
          "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
          "proj_out": "final_layer.linear", "norm_out.linear": "final_layer.adaLN_modulation.1"}
# module of a double block -> (original module, part of a fused projection or None)
_DOUBLE = {"norm1.linear": ("img_mod.lin", None), "norm1_context.linear": ("txt_mod.lin", None),
           "attn.to_q": ("img_attn.qkv", 0), "attn.to_k": ("img_attn.qkv", 1), "attn.to_v": ("img_attn.qkv", 2),
           "attn.add_q_proj": ("txt_attn.qkv", 0), "attn.add_k_proj": ("txt_attn.qkv", 1),
           "attn.add_v_proj": ("txt_attn.qkv", 2), "attn.to_out.0": ("img_attn.proj", None),
           "attn.to_add_out": ("txt_attn.proj", None), "ff.net.0.proj": ("img_mlp.0", None),
           "ff.net.2": ("img_mlp.2", None), "ff_context.net.0.proj": ("txt_mlp.0", None),
           "ff_context.net.2": ("txt_mlp.2", None),
           # qk norms: weights only (stored as .scale), no adapters
           "attn.norm_q": ("img_attn.norm.query_norm", None), "attn.norm_k": ("img_attn.norm.key_norm", None),
           "attn.norm_added_q": ("txt_attn.norm.query_norm", None),
           "attn.norm_added_k": ("txt_attn.norm.key_norm", None)}
_SINGLE = {"norm.linear": ("modulation.lin", None), "attn.to_q": ("linear1", 0), "attn.to_k": ("linear1", 1),
           "attn.to_v": ("linear1", 2), "proj_mlp": ("linear1", 3), "proj_out": ("linear2", None),
           "attn.norm_q": ("norm.query_norm", None), "attn.norm_k": ("norm.key_norm", None)}
_BLOCK_RE = re.compile(r"(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)")
_NORMS = ("query_norm", "key_norm")   # RMSNorm weights are called scale in the original layout


def mlp_ratio() -> float:
    """The single blocks' MLP width over the attention width: diffusers' own default (FLUX.1's 4)."""
    from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock

    return float(inspect.signature(FluxSingleTransformerBlock.__init__).parameters["mlp_ratio"].default)


def _target(module: str) -> tuple[str, int | None, bool] | None:
    """(original module, fused part or None, rows swapped) of one diffusers module, or None."""
    if module in _FIXED:
        return _FIXED[module], None, module == "norm_out.linear"
    m = _BLOCK_RE.fullmatch(module)
    if m is None:
        return None
    kind, i, rest = m.groups()
    table, block = (_DOUBLE, "double_blocks") if kind == "transformer_blocks" else (_SINGLE, "single_blocks")
    if rest not in table:
        return None
    name, part = table[rest]
    return f"{block}.{i}.{name}", part, False


def bfl_module_name(module: str) -> tuple[str, bool]:
    """The original name of a Flux transformer module and whether its rows are stored swapped: what
    kohya / ComfyUI LoRA keys spell (``transformer_blocks.0.attn.to_q`` -> ``double_blocks.0.img_attn.qkv``,
    its first third)."""
    target = _target(module)
    if target is None:
        raise ValueError(f"Flux transformer module {module!r} has no place in the original (BFL) layout")
    return target[0], target[2]


def fused_modules(config: Mapping[str, Any]) -> dict[str, tuple[str, ...]]:
    """Original fused module -> its diffusers parts in row order, for every block."""
    out: dict[str, list[str | None]] = {}
    for kind, block, table, n in (("transformer_blocks", "double_blocks", _DOUBLE, config["num_layers"]),
                                  ("single_transformer_blocks", "single_blocks", _SINGLE, config["num_single_layers"])):
        for i in range(n):
            for rest, (name, part) in table.items():
                if part is not None:
                    parts = out.setdefault(f"{block}.{i}.{name}", [None] * (4 if name == "linear1" else 3))
                    parts[part] = f"{kind}.{i}.{rest}"
    return {k: tuple(v) for k, v in out.items()}


def fused_rows(original: str, config: Mapping[str, Any]) -> tuple[int, ...] | None:
    """Rows of each part of a fused module: the single blocks' linear1 is q, k, v (the attention width
    each) then the MLP input (mlp_ratio x that); the double blocks' qkv splits equally (None)."""
    if not original.endswith(".linear1"):
        return None
    inner = int(config["num_attention_heads"]) * int(config["attention_head_dim"])
    return (inner, inner, inner, int(inner * mlp_ratio()))


def swap_halves(t: torch.Tensor) -> torch.Tensor:
    """(a; b) -> (b; a) along the rows: diffusers' ``swap_scale_shift``, its own inverse."""
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def transformer_to_bfl(state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """A ``FluxTransformer2DModel`` state dict in BFL's layout (no prefix, as ``flux1-dev.safetensors``).

    Raises:
        ValueError: a tensor with no place in the layout, or a fused projection with a part missing.
    """
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, list[torch.Tensor | None]] = {}
    unplaced = []
    for key, value in state_dict.items():
        module, _, param = key.rpartition(".")
        target = _target(module)
        if target is None:
            unplaced.append(key)
            continue
        name, part, swapped = target
        if name.rsplit(".", 1)[-1] in _NORMS and param == "weight":
            param = "scale"
        if part is None:
            out[f"{name}.{param}"] = swap_halves(value) if swapped else value
        else:
            fused.setdefault(f"{name}.{param}", [None] * (4 if name.endswith("linear1") else 3))[part] = value
    if unplaced:
        raise ValueError(f"{len(unplaced)} Flux transformer tensors have no place in the BFL layout, e.g. "
                         f"{unplaced[:3]}")
    for key, parts in fused.items():
        if any(p is None for p in parts):
            raise ValueError(f"{key}: a part of the fused projection is missing")
        out[key] = torch.cat(parts, dim=0)   # type: ignore[arg-type]
    return out
