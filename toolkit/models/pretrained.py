"""Load the components of an SD-1.x/2.x-layout diffusers pipeline and freeze them.

Works for a hub id (``stable-diffusion-v1-5/stable-diffusion-v1-5``) or a local pipeline dir
(the embedded miniature, or a test's tiny random pipeline): both go through ``from_pretrained``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from toolkit.models.families import ModelFamily, family_of

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


@dataclass
class Components:
    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    vae: AutoencoderKL
    unet: UNet2DConditionModel
    noise_scheduler: DDPMScheduler


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype or torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"model.dtype={dtype!r} is not one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def check_model_path(name_or_path: str) -> None:
    """A path-looking model that does not exist fails here, not as a hub lookup error."""
    looks_local = name_or_path.startswith(("/", "./", "../", "~")) or Path(name_or_path).exists()
    if looks_local and not (Path(name_or_path).expanduser() / "model_index.json").is_file():
        raise FileNotFoundError(
            f"model.name_or_path={name_or_path!r} is not a diffusers pipeline directory "
            "(no model_index.json). Pass a hub id or a directory written by save_pretrained."
        )


def skeletons(name_or_path: str, revision: str | None = None) -> tuple[type[ModelFamily], dict[str, torch.nn.Module]]:
    """The family and its UNet / text encoders built from their configs on the meta device: module
    names and shapes without loading (or allocating) any weight."""
    import transformers
    from accelerate import init_empty_weights
    from diffusers import DiffusionPipeline

    check_model_path(name_or_path)
    index = DiffusionPipeline.load_config(name_or_path, revision=revision)
    unet_cfg = UNet2DConditionModel.load_config(name_or_path, subfolder="unet", revision=revision)
    family = family_of(unet_cfg)
    with init_empty_weights():
        models: dict[str, torch.nn.Module] = {"unet": UNet2DConditionModel.from_config(unet_cfg)}
        for comp in family.text_encoders:
            cls = getattr(transformers, index[comp][1])
            models[comp] = cls(cls.config_class.from_pretrained(name_or_path, subfolder=comp, revision=revision))
    return family, models


def vae_factor(name_or_path: str, revision: str | None = None) -> int:
    """Pixels per latent pixel, read from the VAE config (no weights are loaded)."""
    cfg = AutoencoderKL.load_config(name_or_path, subfolder="vae", revision=revision)
    return 2 ** (len(cfg["block_out_channels"]) - 1)


def check_resolution(name_or_path: str, resolution: int, revision: str | None = None) -> None:
    check_model_path(name_or_path)
    factor = vae_factor(name_or_path, revision)
    if resolution % factor:
        lo, hi = resolution // factor * factor, (resolution // factor + 1) * factor
        raise ValueError(f"data.resolution={resolution} is not divisible by the VAE's downsampling factor "
                         f"{factor} ({name_or_path}); use {lo or hi} or {hi}.")


def load_components(
    name_or_path: str,
    revision: str | None = None,
    variant: str | None = None,
    dtype: str | None = "float32",
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
) -> Components:
    """Load tokenizer, text encoder, VAE, UNet and the training noise scheduler, all frozen.

    Args:
        name_or_path: hub id or local diffusers pipeline directory.
        revision: hub revision (branch, tag or commit).
        variant: weight variant, e.g. ``fp16``.
        dtype: dtype of the frozen weights (trainable LoRA weights are kept in float32).
        trust_remote_code: passed to transformers; off unless the user sets it.
        allow_pickle: also accept pickle weight files (``.bin``/``.ckpt``); off: safetensors only,
            so loading a model can never execute code hidden in a pickle.
    """
    check_model_path(name_or_path)
    kw = {"revision": revision, "use_safetensors": not allow_pickle}
    torch_dtype = resolve_dtype(dtype)
    tokenizer = CLIPTokenizer.from_pretrained(name_or_path, subfolder="tokenizer", revision=revision)
    text_encoder = CLIPTextModel.from_pretrained(
        name_or_path, subfolder="text_encoder", variant=variant, dtype=torch_dtype,
        trust_remote_code=trust_remote_code, **kw,
    )
    vae = AutoencoderKL.from_pretrained(
        name_or_path, subfolder="vae", variant=variant, dtype=torch_dtype, **kw
    )
    unet = UNet2DConditionModel.from_pretrained(
        name_or_path, subfolder="unet", variant=variant, dtype=torch_dtype, **kw
    )
    noise_scheduler = DDPMScheduler.from_pretrained(name_or_path, subfolder="scheduler", revision=revision)
    for module in (text_encoder, vae, unet):
        module.requires_grad_(False)
        module.eval()
    return Components(tokenizer, text_encoder, vae, unet, noise_scheduler)
