"""Write a diffusers SD-1.x / SD-2.x / SDXL pipeline as one ``.safetensors`` checkpoint in the
original LDM/sgm layout, the single file A1111 and ComfyUI load.

    from toolkit.models.single_file import pipeline_to_single_file
    pipeline_to_single_file(pipe, "model.safetensors", dtype=torch.float16)

Layouts (key prefix per component):

    unet            model.diffusion_model.    (all; SDXL adds label_emb.0.{0,2} for the size/crop embedding)
    vae             first_stage_model.        (all)
    text encoder    SD-1.x  cond_stage_model.transformer.text_model.*       (HF CLIP, OpenAI ViT-L)
                    SD-2.x  cond_stage_model.model.*                        (OpenCLIP ViT-H)
                    SDXL    conditioner.embedders.0.transformer.text_model.* (HF CLIP, OpenAI ViT-L)
                            conditioner.embedders.1.model.*                 (OpenCLIP bigG)

The layout is chosen from the pipeline (:func:`single_file_layout`): SDXL when the UNet's
``addition_embed_type`` is ``"text_time"`` (its size/crop conditioning exists only there; both
text encoders are then required); otherwise SD-2.x when the text encoder's ``hidden_act`` is
``"gelu"`` -- the OpenCLIP family (SD-2.x's ViT-H, hidden size 1024) uses exact GELU, OpenAI's CLIP
ViT-L of SD-1.x uses ``quick_gelu``, and the layout tells A1111/ComfyUI which of the two text
models to build, so the activation is the property that has to match; otherwise SD-1.x.

Why this is hand-written: diffusers ships only the reader
(``diffusers.loaders.single_file_utils.convert_ldm_*``); its writer,
``scripts/convert_diffusers_to_original_stable_diffusion.py``, is not in the package and hard-codes
SD's 4 levels x 2 layers, so it mis-numbers any other UNet (this project's miniature has
2 levels x 1 layer). The functions here are the exact inverse of that reader for any number of
levels and ``layers_per_block``; anything the reader could not map back (a UNet with class
embeddings, a mid block without attention, per-level ``layers_per_block``, ...) is refused with a
``ValueError`` before a byte is written, and every source tensor must land in exactly one key.

Reading the file back with diffusers, fully offline::

    StableDiffusionPipeline.from_single_file(path, config=<the diffusers folder>, local_files_only=True)

With ``config`` a local directory diffusers reads the pipeline, scheduler and tokenizer configs
from there and opens no connection (checked with ``HF_HUB_OFFLINE`` unset: no socket is opened,
with or without ``local_files_only``); without ``config`` it guesses a hub repo from the keys
(SD-1.5, SD-2.1, SDXL base) and downloads that repo's configs, which are the wrong sizes for any
other model. ``local_files_only=True`` keeps a missing local file from turning into a hub lookup.
Note that the reader silently ignores keys it does not know and leaves weights it does not find at
their initial values, so only a tensor-by-tensor comparison proves a file complete
(``tests/test_single_file.py``).

One reader quirk shapes what is accepted: under ``cond_stage_model.model.`` (SD-2.x) it skips
``text_projection`` and ``transformer.resblocks.23`` (SD-2's unused last layer), so an SD-2.x text
encoder with a projection or with 24 or more layers is refused. diffusers' own SD-2 text encoder
has neither (23 layers, ``CLIPTextModel``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save

from toolkit.atomic import atomic_open

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."

# (ldm key, part, number of parts): parts > 1 are concatenated along dim 0 in part order.
Target = tuple[str, int, int]

_UNET_FIXED = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
}
_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
                "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
_UNET_DOWN_TYPES = {"DownBlock2D", "CrossAttnDownBlock2D"}
_UNET_UP_TYPES = {"UpBlock2D", "CrossAttnUpBlock2D"}

_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_VAE_FIXED = {"conv_norm_out": "norm_out", "conv_in": "conv_in", "conv_out": "conv_out"}

_OPEN_CLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                    "self_attn.out_proj": "attn.out_proj"}
_OPEN_CLIP_FIXED = {"text_model.embeddings.token_embedding.weight": "token_embedding.weight",
                    "text_model.embeddings.position_embedding.weight": "positional_embedding",
                    "text_model.final_layer_norm.weight": "ln_final.weight",
                    "text_model.final_layer_norm.bias": "ln_final.bias",
                    "text_projection.weight": "text_projection"}


def _remap(state_dict: Mapping[str, torch.Tensor], name_of: Callable[[str], Target | None], what: str,
           prefix: str) -> dict[str, torch.Tensor]:
    """Apply ``name_of`` to every key; refuse unnamed keys, two keys on one slot, incomplete groups."""
    groups: dict[str, dict[int, str]] = {}
    sizes: dict[str, int] = {}
    unmapped = []
    for key in state_dict:
        target = name_of(key)
        if target is None:
            unmapped.append(key)
            continue
        ldm_key, part, n_parts = target
        slots = groups.setdefault(ldm_key, {})
        if part in slots:
            raise ValueError(f"{what}: {slots[part]!r} and {key!r} both map to {ldm_key!r}")
        slots[part] = key
        sizes[ldm_key] = n_parts
    if unmapped:
        raise ValueError(f"{what}: {len(unmapped)} tensor(s) have no place in the LDM layout, "
                         f"e.g. {unmapped[:4]}")
    out = {}
    for ldm_key, slots in groups.items():
        if sorted(slots) != list(range(sizes[ldm_key])):
            raise ValueError(f"{what}: {ldm_key!r} needs {sizes[ldm_key]} parts, got {sorted(slots.values())}")
        parts = [state_dict[slots[i]] for i in range(sizes[ldm_key])]
        out[prefix + ldm_key] = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
    return out


def _split(key: str, *heads: str) -> tuple[str, str] | None:
    """``("a.b", "weight")`` for ``key="a.b.weight"`` when ``a.b`` is one of ``heads``."""
    for head in heads:
        if key.startswith(head + "."):
            return head, key[len(head) + 1:]
    return None


def _unet_problems(unet_config: Mapping[str, Any]) -> list[str]:
    """What in a ``UNet2DConditionModel`` config the LDM layout (as diffusers reads it) cannot express."""
    cfg = unet_config
    problems = []
    if not isinstance(cfg["layers_per_block"], int):
        problems.append(f"layers_per_block={cfg['layers_per_block']!r} (one int for all levels: the reader "
                        "numbers input/output blocks by layers_per_block + 1)")
    if set(cfg["down_block_types"]) - _UNET_DOWN_TYPES or set(cfg["up_block_types"]) - _UNET_UP_TYPES:
        problems.append(f"block types {list(cfg['down_block_types'])} / {list(cfg['up_block_types'])} "
                        f"(supported: {sorted(_UNET_DOWN_TYPES | _UNET_UP_TYPES)})")
    if cfg.get("mid_block_type", "UNetMidBlock2DCrossAttn") != "UNetMidBlock2DCrossAttn":
        problems.append(f"mid_block_type={cfg['mid_block_type']!r} (the reader takes middle_block.1 for an "
                        "attention layer)")
    if cfg.get("addition_embed_type") not in (None, "text_time"):
        problems.append(f"addition_embed_type={cfg['addition_embed_type']!r}")
    for name in ("class_embed_type", "num_class_embeds", "encoder_hid_dim_type", "time_cond_proj_dim"):
        if cfg.get(name) is not None:
            problems.append(f"{name}={cfg[name]!r}")
    if cfg.get("dual_cross_attention"):
        problems.append("dual_cross_attention=True")
    if cfg.get("time_embedding_type", "positional") != "positional":
        problems.append(f"time_embedding_type={cfg['time_embedding_type']!r}")
    return problems


def unet_to_ldm(state_dict: Mapping[str, torch.Tensor], unet_config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """A ``UNet2DConditionModel`` state dict under ``model.diffusion_model.`` (the inverse of diffusers'
    ``convert_ldm_unet_checkpoint``, for any number of levels and layers per block).

    Down level ``b``, layer ``l`` is ``input_blocks.{1 + b(L+1) + l}`` (``.0`` resnet, ``.1``
    attention) and its downsampler the level's last slot ``input_blocks.{1 + b(L+1) + L}.0.op``;
    up level ``b`` has L+1 layers at ``output_blocks.{b(L+1) + l}`` and its upsampler sits after the
    last one (``.2.conv`` behind an attention, else ``.1.conv``); ``L = layers_per_block``.

    Args:
        state_dict: the UNet's ``state_dict()``.
        unet_config: its ``config`` (``layers_per_block`` and block types are read from it).

    Raises:
        ValueError: the config or a tensor has no place in the layout (the message lists what).
    """
    problems = _unet_problems(unet_config)
    if problems:
        raise ValueError("unet: the LDM single-file layout cannot express " + "; ".join(problems))
    return _remap(state_dict, lambda key: _unet_target(key, unet_config), "unet", UNET_PREFIX)


def ldm_unet_module_name(module: str, unet_config: Mapping[str, Any]) -> str:
    """The LDM/sgm name of one UNet module (``down_blocks.1.attentions.0.proj_in`` ->
    ``input_blocks.4.1.proj_in`` for SDXL): what kohya/A1111 files spell for SDXL LoRA layers."""
    target = _unet_target(f"{module}.weight", unet_config)
    if target is None:
        raise ValueError(f"unet module {module!r} has no place in the LDM layout")
    return target[0][: -len(".weight")]


def _unet_target(key: str, unet_config: Mapping[str, Any]) -> Target | None:
    n_levels = len(unet_config["down_block_types"])
    step = unet_config["layers_per_block"] + 1
    # Which up levels hold attentions decides the upsampler's slot; read from the config so a single
    # module name maps the same way as a whole state dict.
    up_has_attn = {b for b, t in enumerate(unet_config["up_block_types"]) if t.startswith("CrossAttn")}
    block = re.compile(r"(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)")

    def resnet(rest: str) -> str | None:
        head = _split(rest, *_UNET_RESNET)
        return f"{_UNET_RESNET[head[0]]}.{head[1]}" if head else None

    if head := _split(key, *_UNET_FIXED):
        return f"{_UNET_FIXED[head[0]]}.{head[1]}", 0, 1
    if m := re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", key):
        kind, j, rest = m.group(1), int(m.group(2)), m.group(3)
        # The reader maps middle_block.{0,1,2} to resnet 0, attention 0, resnet 1 and nothing else.
        if kind == "resnets" and j < 2 and (r := resnet(rest)):
            return f"middle_block.{2 * j}.{r}", 0, 1
        if kind == "attentions" and j == 0:
            return f"middle_block.1.{rest}", 0, 1
        return None
    m = block.fullmatch(key)
    if m is None:
        return None
    side, b, kind, j, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
    last = step - 1 if side == "down_blocks" else step  # layers per level: L down, L+1 up
    if b >= n_levels:
        return None
    if kind in ("resnets", "attentions") and j < last:
        base = f"input_blocks.{1 + b * step + j}" if side == "down_blocks" else f"output_blocks.{b * step + j}"
        if kind == "attentions":
            return f"{base}.1.{rest}", 0, 1
        r = resnet(rest)
        return (f"{base}.0.{r}", 0, 1) if r else None
    if kind == "downsamplers" and j == 0 and b < n_levels - 1 and (h := _split(rest, "conv")):
        return f"input_blocks.{1 + b * step + step - 1}.0.op.{h[1]}", 0, 1
    if kind == "upsamplers" and j == 0 and b < n_levels - 1 and (h := _split(rest, "conv")):
        slot = 2 if b in up_has_attn else 1
        return f"output_blocks.{b * step + step - 1}.{slot}.conv.{h[1]}", 0, 1
    return None


def vae_to_ldm(state_dict: Mapping[str, torch.Tensor], vae_config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """An ``AutoencoderKL`` state dict under ``first_stage_model.`` (the inverse of diffusers'
    ``convert_ldm_vae_checkpoint``). Decoder up block ``i`` is ``decoder.up.{n-1-i}`` (LDM counts
    from the lowest resolution); the mid attention's linear q/k/v/proj_out weights are stored as
    1x1 convolutions (4-D), as in the original checkpoints.

    Args:
        state_dict: the VAE's ``state_dict()``.
        vae_config: its ``config`` (the number of up blocks is read from it).
    """
    n_down, n_up = len(vae_config["down_block_types"]), len(vae_config["up_block_types"])
    coder = re.compile(r"(encoder|decoder)\.(.+)")

    def resnet(rest: str) -> str | None:
        head = _split(rest, "norm1", "conv1", "norm2", "conv2", "conv_shortcut")
        return None if head is None else f"{'nin_shortcut' if head[0] == 'conv_shortcut' else head[0]}.{head[1]}"

    def name_of(key: str) -> Target | None:
        if key.split(".")[0] in ("quant_conv", "post_quant_conv"):
            return key, 0, 1
        m = coder.fullmatch(key)
        if m is None:
            return None
        side, rest = m.groups()
        if head := _split(rest, *_VAE_FIXED):
            return f"{side}.{_VAE_FIXED[head[0]]}.{head[1]}", 0, 1
        if (m := re.fullmatch(r"mid_block\.resnets\.([01])\.(.+)", rest)) and (r := resnet(m.group(2))):
            return f"{side}.mid.block_{int(m.group(1)) + 1}.{r}", 0, 1
        if (m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", rest)) and (head := _split(m.group(1), *_VAE_ATTN)):
            return f"{side}.mid.attn_1.{_VAE_ATTN[head[0]]}.{head[1]}", 0, 1
        if side == "encoder" and (m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets\.\d+|downsamplers\.0)\.(.+)", rest)):
            i, part, tail = m.groups()
            if int(i) >= n_down:
                return None
            if part.startswith("resnets"):
                r = resnet(tail)
                return (f"encoder.down.{i}.block.{part.split('.')[1]}.{r}", 0, 1) if r else None
            return (f"encoder.down.{i}.downsample.{tail}", 0, 1) if tail.startswith("conv.") else None
        if side == "decoder" and (m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets\.\d+|upsamplers\.0)\.(.+)", rest)):
            i, part, tail = m.groups()
            if int(i) >= n_up:
                return None
            up = n_up - 1 - int(i)
            if part.startswith("resnets"):
                r = resnet(tail)
                return (f"decoder.up.{up}.block.{part.split('.')[1]}.{r}", 0, 1) if r else None
            return (f"decoder.up.{up}.upsample.{tail}", 0, 1) if tail.startswith("conv.") else None
        return None

    out = _remap(state_dict, name_of, "vae", VAE_PREFIX)
    attn_weight = re.compile(re.escape(VAE_PREFIX) + r"(encoder|decoder)\.mid\.attn_1\.(q|k|v|proj_out)\.weight")
    return {k: v[:, :, None, None] if attn_weight.fullmatch(k) and v.ndim == 2 else v for k, v in out.items()}


def _text_model_keys(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers >= 5 drops the ``text_model.`` level from ``CLIPTextModel`` (not from
    ``CLIPTextModelWithProjection``); single files always have it."""
    return {k if k.startswith(("text_model.", "text_projection.")) else f"text_model.{k}": v
            for k, v in state_dict.items()}


def clip_text_to_ldm(state_dict: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """A ``CLIPTextModel`` state dict in the HF-CLIP layout A1111 uses for OpenAI CLIP ViT-L:
    ``{prefix}text_model.*`` (SD-1.x: ``cond_stage_model.transformer.``, SDXL encoder 1:
    ``conditioner.embedders.0.transformer.``). Inverse of diffusers' ``convert_ldm_clip_checkpoint``."""
    heads = ("text_model.embeddings.", "text_model.encoder.layers.", "text_model.final_layer_norm.")
    return _remap(_text_model_keys(state_dict), lambda k: (k, 0, 1) if k.startswith(heads) else None,
                  f"text encoder ({prefix})", prefix)


def open_clip_text_to_ldm(state_dict: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """A ``CLIPTextModel[WithProjection]`` state dict in OpenCLIP's layout under ``prefix`` (SD-2.x:
    ``cond_stage_model.model.``, SDXL encoder 2: ``conditioner.embedders.1.model.``):
    ``transformer.resblocks.{i}`` with ``attn.in_proj_{weight,bias}`` = concat(q, k, v), ``ln_1/2``,
    ``mlp.c_fc/c_proj``; ``text_projection`` transposed (OpenCLIP multiplies ``x @ P``). Inverse of
    diffusers' ``convert_open_clip_checkpoint``."""
    qkv = {"q_proj": 0, "k_proj": 1, "v_proj": 2}

    def name_of(key: str) -> Target | None:
        if key in _OPEN_CLIP_FIXED:
            return _OPEN_CLIP_FIXED[key], 0, 1
        m = re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", key)
        if m is None:
            return None
        layer, module, param = m.groups()
        base = f"transformer.resblocks.{layer}"
        if module.startswith("self_attn.") and module[len("self_attn."):] in qkv:
            return f"{base}.attn.in_proj_{param}", qkv[module[len("self_attn."):]], 3
        return (f"{base}.{_OPEN_CLIP_LAYER[module]}.{param}", 0, 1) if module in _OPEN_CLIP_LAYER else None

    out = _remap(_text_model_keys(state_dict), name_of, f"text encoder ({prefix})", prefix)
    if (proj := prefix + "text_projection") in out:
        out[proj] = out[proj].T.contiguous()
    return out


# Per layout: (pipeline attribute, key prefix, mapping) for each text encoder.
TEXT_ENCODERS = {
    "sd1": (("text_encoder", "cond_stage_model.transformer.", clip_text_to_ldm),),
    "sd2": (("text_encoder", "cond_stage_model.model.", open_clip_text_to_ldm),),
    "sdxl": (("text_encoder", "conditioner.embedders.0.transformer.", clip_text_to_ldm),
             ("text_encoder_2", "conditioner.embedders.1.model.", open_clip_text_to_ldm)),
}


def single_file_layout(pipe: Any) -> str:
    """``"sdxl"``, ``"sd2"`` or ``"sd1"``: the rule in the module docstring."""
    if pipe.unet.config.get("addition_embed_type") == "text_time":
        return "sdxl"
    return "sd2" if pipe.text_encoder.config.hidden_act == "gelu" else "sd1"


def pipeline_to_ldm(pipe: Any) -> dict[str, torch.Tensor]:
    """Every tensor of the pipeline's unet, vae and text encoder(s) under its single-file key.

    Raises:
        ValueError: a component is missing, or something cannot be expressed in the layout.
    """
    missing = [n for n in ("unet", "vae", "text_encoder") if getattr(pipe, n, None) is None]
    if missing:
        raise ValueError(f"a single file needs {missing}")
    layout = single_file_layout(pipe)
    if layout == "sdxl" and getattr(pipe, "text_encoder_2", None) is None:
        raise ValueError("sdxl single file needs ['text_encoder_2']")
    if layout == "sd2":
        # Two things diffusers' reader skips under cond_stage_model.model.: resblocks.23 (SD-2's unused last
        # layer) and text_projection. Written anyway, they would not load back.
        if pipe.text_encoder.config.num_hidden_layers >= 24:
            raise ValueError("sd2 text encoder with >= 24 layers: diffusers' reader drops resblocks.23")
        if any(k.startswith("text_projection.") for k in pipe.text_encoder.state_dict()):
            raise ValueError("sd2 text encoder with a text_projection: diffusers' reader drops it")
    sources = {"unet": pipe.unet.state_dict(), "vae": pipe.vae.state_dict()}
    mapped = {"unet": unet_to_ldm(sources["unet"], pipe.unet.config),
              "vae": vae_to_ldm(sources["vae"], pipe.vae.config)}
    for name, prefix, to_ldm in TEXT_ENCODERS[layout]:
        sources[name] = getattr(pipe, name).state_dict()
        mapped[name] = to_ldm(sources[name], prefix)

    out: dict[str, torch.Tensor] = {}
    for name, tensors in mapped.items():
        # Whatever the renames did, every element of every source tensor lands exactly once (q, k and v of an
        # OpenCLIP layer fuse into one in_proj tensor, so counts are compared in elements as well as keys).
        n_in, n_out = sum(t.numel() for t in sources[name].values()), sum(t.numel() for t in tensors.values())
        fused = sum(2 for k in tensors if k.endswith(".attn.in_proj_weight") or k.endswith(".attn.in_proj_bias"))
        if n_in != n_out or len(sources[name]) != len(tensors) + fused:
            raise ValueError(f"{name}: {len(sources[name])} tensors ({n_in} values) in, {len(tensors)} "
                             f"(+{fused} fused) ({n_out} values) out")
        out.update(tensors)
    if len(out) != sum(map(len, mapped.values())):
        raise ValueError("two components wrote the same key")
    return out


def single_file_state_dict(pipe: Any) -> dict[str, torch.Tensor]:
    """The pipeline's tensors in its family's single-file layout (``ModelFamily.single_file_state_dict``:
    this module's LDM/sgm layout for SD/SDXL, ``single_file_sd3``'s for SD3)."""
    from toolkit.models.families import family_of_pipeline

    return family_of_pipeline(pipe).single_file_state_dict(pipe)


def pipeline_to_single_file(
    pipe: Any,
    path: str | Path,
    dtype: torch.dtype = torch.float16,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write ``pipe`` (SD-1.x, SD-2.x, SDXL or SD3) as one ``.safetensors`` file in its original layout
    (the one A1111 and ComfyUI load), atomically.

    Args:
        pipe: a diffusers pipeline with ``unet``, ``vae``, ``text_encoder`` (and ``text_encoder_2``
            for SDXL; SD3: ``transformer``, ``vae`` and its three text encoders). Its scheduler and
            tokenizers are not part of a single file.
        path: the ``.safetensors`` file to write (parents are created; an existing file is
            replaced only once the new one is complete).
        dtype: float16, bfloat16 or float32 for every tensor.
        metadata: string key/values for the safetensors header.

    Returns:
        ``path``.

    Raises:
        ValueError: the pipeline cannot be expressed in the layout (nothing is written).
    """
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"dtype must be float16, bfloat16 or float32, got {dtype}")
    metadata = dict(metadata or {})
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise ValueError("safetensors metadata must map str to str")
    tensors, seen = {}, set()
    for k, v in single_file_state_dict(pipe).items():
        t = (v.detach().to(device="cpu", dtype=dtype) if v.is_floating_point() else v.detach().cpu()).contiguous()
        # tied weights (T5's shared / embed_tokens) are written as two copies: a reader may look for either
        t = t.clone() if t.untyped_storage().data_ptr() in seen else t
        seen.add(t.untyped_storage().data_ptr())
        tensors[k] = t
    path = Path(path)
    # atomic_open takes bytes, so the serialized file is held in memory once (about its size on disk).
    with atomic_open(path) as f:
        f.write(save(tensors, metadata=metadata or None))
    return path


def check_loaded_against_file(pipe: Any, path: str | Path) -> None:
    """Prove a pipeline loaded with ``from_single_file`` holds exactly the file's weights.

    diffusers' reader silently skips keys it does not know and leaves weights it does not find at
    their initial values, so a checkpoint read with the wrong ``model.config`` can load "fine" with
    random layers. Here every tensor of the loaded denoiser, vae and text encoder(s), mapped back to its
    single-file key, must exist in the file and be equal (compared in the lower of the two dtypes).

    Raises:
        ValueError: naming how many tensors are missing from the file or differ, with examples.
    """
    from safetensors import safe_open

    expected = single_file_state_dict(pipe)
    missing, differ = [], []
    with safe_open(str(path), framework="pt", device="cpu") as f:
        keys = set(f.keys())
        for key, loaded in expected.items():
            if key not in keys:
                missing.append(key)
                continue
            stored = f.get_tensor(key)
            low = stored.dtype if stored.element_size() <= loaded.element_size() else loaded.dtype
            if stored.shape != loaded.shape or not torch.equal(stored.to(low), loaded.detach().cpu().to(low)):
                differ.append(key)
    if missing or differ:
        raise ValueError(
            f"{path} does not match model.config: of the {len(expected)} tensors the configured architecture "
            f"needs, {len(missing)} are not in the file (e.g. {missing[:3]}) and {len(differ)} differ in shape or "
            f"value (e.g. {differ[:3]}). Pass model.config=<the diffusers folder or hub id of the model this "
            "checkpoint was made from>.")
