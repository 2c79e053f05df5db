"""SD3 / SD3.5 in the original (MMDiT) layout: one-file checkpoints and the module names of kohya /
ComfyUI LoRA files.

    from toolkit.models.single_file import pipeline_to_single_file
    pipeline_to_single_file(sd3_pipe, "sd3.safetensors")     # dispatches here for SD3

Layout of the single file (what Stability's ``sd3.5_medium.safetensors`` / ``*_incl_clips_t5xxl*``
files hold, and what ComfyUI and diffusers' ``from_single_file`` read):

    transformer     model.diffusion_model.   joint_blocks.{i}.{x_block,context_block}.attn.qkv (q, k, v
                                              stacked along the rows), .attn.proj, .mlp.fc1/fc2,
                                              .adaLN_modulation.1; x_embedder, t_embedder, y_embedder,
                                              context_embedder, final_layer, pos_embed
    vae             first_stage_model.       the LDM VAE layout (``single_file.vae_to_ldm``)
    CLIP-L          text_encoders.clip_l.transformer.text_model.*     (its projection is the identity)
    CLIP-G          text_encoders.clip_g.transformer.text_model.*, .text_projection.weight
    T5-XXL          text_encoders.t5xxl.transformer.*

Two original modules store their output rows in the other order than diffusers: the last block's
``context_block.adaLN_modulation.1`` and ``final_layer.adaLN_modulation.1`` hold (shift, scale)
where diffusers' ``AdaLayerNormContinuous`` holds (scale, shift); diffusers' reader swaps the halves
(``swap_scale_shift``), so this writer swaps them back, and a LoRA on those layers has its up rows
swapped too.

Why hand-written: diffusers ships only the reader (``convert_sd3_transformer_checkpoint_to_diffusers``
and the CLIP/T5 readers). This is its inverse; the tests read every file written here back with that
reader (``StableDiffusion3Pipeline.from_single_file``) and compare every tensor.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from toolkit.models.single_file import VAE_PREFIX, vae_to_ldm

PREFIX = "model.diffusion_model."
CLIP_L, CLIP_G, T5 = "text_encoders.clip_l.transformer.", "text_encoders.clip_g.transformer.", \
    "text_encoders.t5xxl.transformer."

_FIXED = {"pos_embed.proj": "x_embedder.proj",
          "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
          "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
          "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
          "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2",
          "context_embedder": "context_embedder", "proj_out": "final_layer.linear",
          "norm_out.linear": "final_layer.adaLN_modulation.1"}
# module of a block -> (original module, part of a fused qkv or None)
_BLOCK = {"norm1.linear": ("x_block.adaLN_modulation.1", None),
          "norm1_context.linear": ("context_block.adaLN_modulation.1", None),
          "attn.to_q": ("x_block.attn.qkv", 0), "attn.to_k": ("x_block.attn.qkv", 1),
          "attn.to_v": ("x_block.attn.qkv", 2),
          "attn.add_q_proj": ("context_block.attn.qkv", 0), "attn.add_k_proj": ("context_block.attn.qkv", 1),
          "attn.add_v_proj": ("context_block.attn.qkv", 2),
          "attn.to_out.0": ("x_block.attn.proj", None), "attn.to_add_out": ("context_block.attn.proj", None),
          "attn2.to_q": ("x_block.attn2.qkv", 0), "attn2.to_k": ("x_block.attn2.qkv", 1),
          "attn2.to_v": ("x_block.attn2.qkv", 2), "attn2.to_out.0": ("x_block.attn2.proj", None),
          "ff.net.0.proj": ("x_block.mlp.fc1", None), "ff.net.2": ("x_block.mlp.fc2", None),
          "ff_context.net.0.proj": ("context_block.mlp.fc1", None), "ff_context.net.2": ("context_block.mlp.fc2", None),
          # qk norms (SD3.5): weights only, no adapters
          "attn.norm_q": ("x_block.attn.ln_q", None), "attn.norm_k": ("x_block.attn.ln_k", None),
          "attn.norm_added_q": ("context_block.attn.ln_q", None),
          "attn.norm_added_k": ("context_block.attn.ln_k", None),
          "attn2.norm_q": ("x_block.attn2.ln_q", None), "attn2.norm_k": ("x_block.attn2.ln_k", None)}
_BLOCK_RE = re.compile(r"transformer_blocks\.(\d+)\.(.+)")


def _target(module: str, config: Mapping[str, Any]) -> tuple[str, int | None, bool] | None:
    """(original module, qkv part or None, rows swapped) of one diffusers module, or None."""
    if module in _FIXED:
        return _FIXED[module], None, module == "norm_out.linear"
    m = _BLOCK_RE.fullmatch(module)
    if m is None or m.group(2) not in _BLOCK:
        return None
    i, rest = int(m.group(1)), m.group(2)
    name, part = _BLOCK[rest]
    last = i == config["num_layers"] - 1
    return f"joint_blocks.{i}.{name}", part, last and rest == "norm1_context.linear"


def mmdit_module_name(module: str, config: Mapping[str, Any]) -> tuple[str, bool]:
    """The original (MMDiT) name of a transformer module, and whether its rows are stored swapped:
    what kohya / ComfyUI LoRA keys spell (``transformer_blocks.0.attn.to_q`` ->
    ``joint_blocks.0.x_block.attn.qkv``, rows 0..d of it)."""
    target = _target(module, config)
    if target is None:
        raise ValueError(f"SD3 transformer module {module!r} has no place in the original (MMDiT) layout")
    return target[0], target[2]


def fused_modules(config: Mapping[str, Any]) -> dict[str, tuple[str, ...]]:
    """Original qkv module -> its diffusers parts (q, k, v) in row order, for every block."""
    out: dict[str, list[str | None]] = {}
    for i in range(config["num_layers"]):
        for rest, (name, part) in _BLOCK.items():
            if part is not None:
                out.setdefault(f"joint_blocks.{i}.{name}", [None] * 3)[part] = f"transformer_blocks.{i}.{rest}"
    return {k: tuple(v) for k, v in out.items()}


def swap_halves(t: torch.Tensor) -> torch.Tensor:
    """(a; b) -> (b; a) along the rows: diffusers' ``swap_scale_shift``, its own inverse."""
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def transformer_to_mmdit(state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """An ``SD3Transformer2DModel`` state dict in the original layout under ``model.diffusion_model.``.

    Raises:
        ValueError: a tensor with no place in the layout, or a fused qkv with a part missing.
    """
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, list[torch.Tensor | None]] = {}
    unplaced = []
    for key, value in state_dict.items():
        if key == "pos_embed.pos_embed":
            out[PREFIX + "pos_embed"] = value
            continue
        module, _, param = key.rpartition(".")
        target = _target(module, config)
        if target is None:
            unplaced.append(key)
            continue
        name, part, swapped = target
        if part is None:
            out[f"{PREFIX}{name}.{param}"] = swap_halves(value) if swapped else value
        else:
            qkv.setdefault(f"{PREFIX}{name}.{param}", [None] * 3)[part] = value
    if unplaced:
        raise ValueError(f"SD3 transformer: {len(unplaced)} tensors have no place in the original layout, e.g. "
                         f"{unplaced[:3]}")
    for key, parts in qkv.items():
        if any(p is None for p in parts):
            raise ValueError(f"SD3 transformer: {key} lacks one of q, k, v")
        out[key] = torch.cat(parts, dim=0)   # type: ignore[arg-type]
    return out


def _prefixed(state_dict: Mapping[str, torch.Tensor], prefix: str, text_model: bool) -> dict[str, torch.Tensor]:
    # transformers >= 5 drops CLIPTextModel's text_model. level; single files always have it
    def name(k: str) -> str:
        return k if not text_model or k.startswith(("text_model.", "text_projection.")) else f"text_model.{k}"
    return {prefix + name(k): v for k, v in state_dict.items()}


def sd3_pipeline_to_single_file(pipe: Any) -> dict[str, torch.Tensor]:
    """Every tensor of an SD3 pipeline's transformer, VAE and text encoders under its single-file key.

    Raises:
        ValueError: a missing component, or CLIP-L with a projection other than the identity
            (diffusers' reader sets it to the identity: a trained one would not load back).
    """
    missing = [n for n in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")
               if getattr(pipe, n, None) is None]
    if missing:
        raise ValueError(f"an SD3 single file needs {missing}")
    out = transformer_to_mmdit(pipe.transformer.state_dict(), pipe.transformer.config)
    out.update(vae_to_ldm(pipe.vae.state_dict(), pipe.vae.config))
    clip_l = dict(pipe.text_encoder.state_dict())
    proj = clip_l.pop("text_projection.weight", None)
    if proj is not None and not torch.equal(proj, torch.eye(*proj.shape, dtype=proj.dtype, device=proj.device)):
        raise ValueError("SD3's CLIP-L (text_encoder) has a text projection other than the identity, which the "
                         "single-file layout cannot carry (diffusers' reader sets it to the identity)")
    out.update(_prefixed(clip_l, CLIP_L, True))
    out.update(_prefixed(pipe.text_encoder_2.state_dict(), CLIP_G, True))
    out.update(_prefixed(pipe.text_encoder_3.state_dict(), T5, False))
    n_in = sum(len(getattr(pipe, c).state_dict()) for c in ("transformer", "vae", "text_encoder", "text_encoder_2",
                                                              "text_encoder_3"))
    fused = 2 * sum(1 for k in out if k.startswith(PREFIX) and k.endswith((".qkv.weight", ".qkv.bias")))
    if len(out) + fused + (proj is not None) != n_in or not all(k.startswith((PREFIX, VAE_PREFIX, CLIP_L, CLIP_G, T5))
                                                                for k in out):
        raise ValueError(f"SD3 single file: {n_in} tensors in, {len(out)} (+{fused} fused) out")
    return out
