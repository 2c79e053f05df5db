"""Load the frozen components of a latent-diffusion pipeline of any supported family.

    hub id / diffusers folder     from_pretrained, per component
    one .safetensors file         the family's pipeline ``from_single_file(file, config=model.config)``;
                                  the component configs come from ``model.config`` (a diffusers
                                  folder or hub id of the same architecture), so nothing is fetched
                                  implicitly, and every tensor the loaded model holds is checked
                                  against the file (diffusers' reader silently skips what it does
                                  not know and leaves missing weights at their initial values)

The family (``toolkit.models.families``: SD-1.x/2.x, SDXL, SD3) is read from ``model_index.json`` (which
denoiser component the pipeline has, its class) and the denoiser's config. A replacement VAE can be given
(``model.vae``: a folder or hub id, e.g. the fp16-fix SDXL VAE). A VAE that is not fp16-safe
(``force_upcast`` in its config, as SDXL's) stays float32 when the rest is half precision.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, ConfigMixin, DiffusionPipeline

from toolkit.locate import check_local_or_hub
from toolkit.models import quantize as quantization
from toolkit.models.families import ModelFamily, family_of

log = logging.getLogger(__name__)
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
DENOISERS = ("unet", "transformer")   # the pipeline component names a denoiser has in diffusers' pipelines


class ComponentConfig(ConfigMixin):
    """Reads any component's ``config.json`` (before its family, hence its class, is known)."""

    config_name = "config.json"


@dataclass
class Components:
    family: type[ModelFamily]
    tokenizers: dict[str, Any]                   # pipeline names: tokenizer, tokenizer_2, ...
    text_encoders: dict[str, torch.nn.Module]    # text_encoder, text_encoder_2, ...
    vae: AutoencoderKL
    denoiser: torch.nn.Module                    # the family's denoiser (pipeline name family.denoiser)
    noise_scheduler: Any                         # the family's training scheduler (DDPM or flow matching)
    text_options: dict[str, Any]                 # the family's prompt-encoding options (SD3: T5 length)
    guidance: float | None                       # the embedded guidance training feeds (FLUX.1-dev), else None


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype or torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"model.dtype={dtype!r} is not one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def is_single_file(name_or_path: str) -> bool:
    return str(name_or_path).endswith(SINGLE_FILE_SUFFIXES)


@functools.cache
def located(value: str, key: str, revision: str | None = None) -> str:
    """``local`` or ``hub`` for a configured model location, checked once per process
    (``toolkit.locate``: fails fast naming the missing folder and why it is not a hub id)."""
    return check_local_or_hub(value, key, "model", revision)


def config_root(name_or_path: str, config: str | None = None) -> str:
    """Where the component configs live: ``model.config`` for a single file, else the model itself."""
    if is_single_file(name_or_path):
        if not config:
            raise ValueError(
                f"model.name_or_path={name_or_path!r} is a single-file checkpoint: pass model.config=<a diffusers "
                "folder or hub id of the same architecture> (e.g. the base model it was fine-tuned from), whose "
                "component configs describe it; nothing is guessed or fetched implicitly.")
        located(str(config), "model.config")
        return config
    return name_or_path


def check_model_path(name_or_path: str, config: str | None = None, allow_pickle: bool = False) -> None:
    """A model that cannot mean what the user meant fails here, before any data or weight is read."""
    path = Path(str(name_or_path)).expanduser()
    if is_single_file(name_or_path):
        if not path.is_file():
            raise FileNotFoundError(f"model.name_or_path={name_or_path!r}: no such checkpoint file")
        if path.suffix != ".safetensors" and not allow_pickle:
            raise ValueError(f"model.name_or_path={name_or_path!r} is a pickle checkpoint: loading it can execute "
                             "code. Convert it to .safetensors, or set model.allow_pickle=true for a trusted source.")
        check_model_path(config_root(name_or_path, config))
        return
    located(str(name_or_path), "model.name_or_path")
    looks_local = str(name_or_path).startswith(("/", "./", "../", "~")) or path.exists()
    if looks_local and not (path / "model_index.json").is_file():
        raise FileNotFoundError(
            f"model.name_or_path={name_or_path!r} is not a diffusers pipeline directory "
            "(no model_index.json). Pass a hub id, a directory written by save_pretrained, or a single "
            ".safetensors file with model.config.")


def pipeline_index(name_or_path: str, revision: str | None = None, config: str | None = None) -> dict[str, Any]:
    """The pipeline's ``model_index.json`` (component name -> [library, class])."""
    root = config_root(name_or_path, config)
    return dict(DiffusionPipeline.load_config(root, revision=None if config else revision))


def model_family(name_or_path: str, revision: str | None = None, config: str | None = None) -> type[ModelFamily]:
    """The family, read from ``model_index.json`` (the denoiser component and its class) and that
    component's config; anything else (a Flux folder, a video model) is refused naming the
    supported families, before a weight is read."""
    index = pipeline_index(name_or_path, revision, config)
    denoisers = [(c, v[1]) for c, v in index.items() if c in DENOISERS and isinstance(v, list) and v[1]]
    if len(denoisers) != 1:
        from toolkit.models.families import UnsupportedFamily, supported

        raise UnsupportedFamily(f"{name_or_path}: its model_index.json ({index.get('_class_name')}) has no single "
                                f"denoiser component (found {denoisers}); supported families: {supported()}.")
    comp, cls = denoisers[0]
    cfg = ComponentConfig.load_config(config_root(name_or_path, config), subfolder=comp,
                                      revision=None if config else revision)
    return family_of(cls, cfg, f"{name_or_path} ({index.get('_class_name')})")


def denoiser_config(name_or_path: str, revision: str | None = None, config: str | None = None) -> dict[str, Any]:
    """The config of the family's denoiser (UNet or transformer), read without weights."""
    family = model_family(name_or_path, revision, config)
    return dict(family.denoiser_class.load_config(config_root(name_or_path, config), subfolder=family.denoiser,
                                                       revision=None if config else revision))


def skeletons(name_or_path: str, revision: str | None = None, config: str | None = None
              ) -> tuple[type[ModelFamily], dict[str, torch.nn.Module]]:
    """The family and its denoiser / text encoders built from their configs on the meta device:
    module names and shapes without loading (or allocating) any weight."""
    import transformers
    from accelerate import init_empty_weights

    root = config_root(name_or_path, config)
    check_model_path(root)
    index = DiffusionPipeline.load_config(root, revision=revision)
    family = model_family(name_or_path, revision, config)
    dcfg = denoiser_config(name_or_path, revision, config)
    with init_empty_weights():
        models: dict[str, torch.nn.Module] = {family.denoiser: family.denoiser_class.from_config(dcfg)}
        for comp in family.text_encoders:
            cls = getattr(transformers, index[comp][1])
            models[comp] = cls(cls.config_class.from_pretrained(root, subfolder=comp, revision=revision))
    return family, models


def vae_factor(name_or_path: str, revision: str | None = None, config: str | None = None) -> int:
    """Pixels per latent pixel, read from the VAE config (no weights are loaded)."""
    cfg = AutoencoderKL.load_config(config_root(name_or_path, config), subfolder="vae", revision=revision)
    return 2 ** (len(cfg["block_out_channels"]) - 1)


def check_resolution(name_or_path: str, resolution: int, revision: str | None = None, config: str | None = None,
                     bucket_step: int | None = None) -> None:
    """Before any weight loads: the training size (and the aspect buckets' side step) a multiple of the
    VAE's factor x the latent patch a token spans (SD3's transformer, Flux's packing: 2)."""
    check_model_path(name_or_path, config, allow_pickle=True)
    family = model_family(name_or_path, revision, config)
    vae = vae_factor(name_or_path, revision, config)
    patch = family.latent_patch(denoiser_config(name_or_path, revision, config))
    factor = vae * patch
    why = f"the VAE's downsampling factor {vae}" + (f" x the {patch}x{patch} latent patches a token spans"
                                                    if patch > 1 else "")
    if resolution % factor:
        lo, hi = resolution // factor * factor, (resolution // factor + 1) * factor
        raise ValueError(f"data.resolution={resolution} is not divisible by {factor}, {why} ({name_or_path}); "
                         f"use {lo or hi} or {hi}.")
    if bucket_step and bucket_step % factor:
        raise ValueError(f"data.buckets.step={bucket_step}: bucket sides must be multiples of {factor}, {why} "
                         f"({name_or_path}); use a multiple of {factor}.")


def load_vae(vae: str, dtype: torch.dtype, revision: str | None = None, use_safetensors: bool = True,
             vae_class: type = AutoencoderKL) -> Any:
    """A replacement VAE: a folder/hub id holding the VAE itself, or a pipeline with a ``vae/``, read as
    the family's VAE class (``ModelFamily.vae_class``: FLUX.2's carries its latents' batch-norm statistics)."""
    located(str(vae), "model.vae")
    local = Path(vae).expanduser()
    sub = None if (local / "config.json").is_file() or not (local / "vae").is_dir() else "vae"
    kind = vae_class.load_config(vae, subfolder=sub, revision=revision).get("_class_name")
    if kind and kind != vae_class.__name__:   # diffusers would warn only, filling gaps with defaults
        raise ValueError(f"model.vae={vae}: a {kind}, not the {vae_class.__name__} this model's pipeline uses")
    return vae_class.from_pretrained(vae, subfolder=sub, revision=revision, dtype=dtype,
                                     use_safetensors=use_safetensors)


def vae_dtype(vae: AutoencoderKL, dtype: torch.dtype) -> torch.dtype:
    """float32 for a VAE whose config says it overflows in half precision (SDXL's: ``force_upcast``)."""
    if dtype != torch.float32 and getattr(vae.config, "force_upcast", False):
        log.info("VAE kept in float32: its config says it is not fp16-safe (force_upcast); pass an fp16-safe "
                 "VAE with model.vae=... to run it in %s", dtype)
        return torch.float32
    return dtype


def pipeline_from_single_file(family: type[ModelFamily], path: str, config: str, torch_dtype: torch.dtype) -> Any:
    """The family's pipeline from one checkpoint file, its configs from ``config``; verified equal
    to the file tensor by tensor (``single_file.check_loaded_against_file``)."""
    from toolkit.models.single_file import check_loaded_against_file

    parts: dict[str, Any] = {}
    if not family.single_file_has_all:   # Flux: BFL's file is the transformer; the rest is model.config's
        rest = family.pipeline_class.from_pretrained(config, **{family.denoiser: None}, torch_dtype=torch_dtype,
                                                     local_files_only=True, **family.pretrained_kwargs)
        parts = {k: v for k, v in rest.components.items() if k != family.denoiser and v is not None}
    try:
        pipe = family.pipeline_class.from_single_file(str(Path(path).expanduser()), config=config,
                                                      torch_dtype=torch_dtype, local_files_only=True, **parts)
    except (ValueError, RuntimeError, KeyError) as err:
        raise ValueError(f"{path} could not be read with model.config={config!r} ({family.name} configs): "
                         f"{str(err).splitlines()[0][:300]}. Pass model.config=<the diffusers folder or hub id of the "
                         "architecture this checkpoint has>.") from err
    check_loaded_against_file(pipe, path)
    return pipe


def load_pipeline_components(name_or_path: str, revision: str | None, variant: str | None, torch_dtype: torch.dtype,
                             trust_remote_code: bool, allow_pickle: bool, config: str | None,
                             quantize: str | None = None, quantize_text_encoders: bool = False) -> dict[str, Any]:
    """The family's pipeline components (a dict by pipeline name), from a folder/hub id or a single file;
    ``quantize`` (``toolkit.models.quantize``): the UNet's (and the text encoders') Linear weights
    quantized as they are read."""
    family = model_family(name_or_path, revision, config)
    if is_single_file(name_or_path):
        pipe = pipeline_from_single_file(family, name_or_path, config, torch_dtype)
        return {k: v for k, v in pipe.components.items() if v is not None}
    import transformers

    index = DiffusionPipeline.load_config(name_or_path, revision=revision)
    kw = {"revision": revision, "use_safetensors": not allow_pickle}
    missing = [c for c in (*family.tokenizers, *family.text_encoders) if not (index.get(c) or [None])[0]]
    if missing:
        raise ValueError(f"{name_or_path}: its {family.denoiser} makes it a {family.name} model, which needs the "
                         f"pipeline components {list(missing)}, but its model_index.json has none of that name. Point "
                         "model.name_or_path at a complete pipeline of that family.")
    out: dict[str, Any] = {}
    for tok in family.tokenizers:
        out[tok] = getattr(transformers, index[tok][1]).from_pretrained(name_or_path, subfolder=tok, revision=revision)
    text_q = {"quantization_config": quantization.transformers_config(quantize, torch_dtype)} \
        if quantize and quantize_text_encoders else {}
    for comp in family.text_encoders:
        out[comp] = getattr(transformers, index[comp][1]).from_pretrained(
            name_or_path, subfolder=comp, variant=variant, dtype=torch_dtype, trust_remote_code=trust_remote_code,
            **kw, **text_q)
    out["vae"] = family.vae_class.from_pretrained(name_or_path, subfolder="vae", variant=variant, dtype=torch_dtype,
                                                  **kw)
    out[family.denoiser] = load_denoiser(family, name_or_path, revision, variant, torch_dtype, allow_pickle, quantize)
    return out


def load_denoiser(family: type[ModelFamily], name_or_path: str, revision: str | None, variant: str | None,
                  torch_dtype: torch.dtype, allow_pickle: bool, quantize: str | None = None) -> Any:
    """The family's denoiser of a folder / hub id, its Linear weights quantized while read when
    ``quantize`` is set."""
    q = {"quantization_config": quantization.diffusers_config(quantize, torch_dtype)} if quantize else {}
    return family.denoiser_class.from_pretrained(name_or_path, subfolder=family.denoiser, variant=variant,
                                                 revision=revision, dtype=torch_dtype,
                                                 use_safetensors=not allow_pickle, **q)


def load_components(
    name_or_path: str,
    revision: str | None = None,
    variant: str | None = None,
    dtype: str | None = "float32",
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    config: str | None = None,
    vae: str | None = None,
    max_sequence_length: int | None = None,
    guidance: float | None = None,
    quantize: str | None = None,
    quantize_text_encoders: bool = False,
) -> Components:
    """Load tokenizer(s), text encoder(s), VAE, the denoiser and the training noise scheduler, all frozen.

    Args:
        name_or_path: hub id, local diffusers pipeline directory, or one ``.safetensors`` checkpoint.
        revision: hub revision (branch, tag or commit).
        variant: weight variant, e.g. ``fp16``.
        dtype: dtype of the frozen weights (trainable LoRA weights are kept in float32).
        trust_remote_code: passed to transformers; off unless the user sets it.
        allow_pickle: also accept pickle weight files (``.bin``/``.ckpt``); off: safetensors only,
            so loading a model can never execute code hidden in a pickle.
        config: for a single-file checkpoint, a diffusers folder or hub id with its component configs.
        vae: a replacement VAE (folder or hub id), e.g. ``madebyollin/sdxl-vae-fp16-fix``.
        max_sequence_length: T5's prompt length (SD3; None: the pipeline's default, 256). Only the
            ``model=sd3`` preset declares it; the other families refuse it.
        guidance: the embedded guidance a guidance-distilled transformer (FLUX.1-dev) is trained
            with; None: the family's (Flux: its pipeline's sampling default, 3.5); refused where the
            denoiser embeds none (SD, SDXL, SD3, FLUX.1-schnell).
        quantize: ``null | int8 | fp8 | nf4``: the denoiser's Linear weights quantized while loading
            (``toolkit.models.quantize``); adapters stay in float32 on top.
        quantize_text_encoders: the text encoders' too (when they are trained, hence run every step).
    """
    check_model_path(name_or_path, config, allow_pickle)
    # the weights are quantized where they are read: on the GPU when there is one (diffusers' choice)
    quantization.check(quantize, "cuda" if torch.cuda.is_available() else "cpu", is_single_file(name_or_path))
    torch_dtype = resolve_dtype(dtype)
    family = model_family(name_or_path, revision, config)
    text_options = family.text_options(max_sequence_length)
    parts = load_pipeline_components(name_or_path, revision, variant, torch_dtype, trust_remote_code, allow_pickle,
                                     config, quantize, quantize_text_encoders)
    if vae:
        parts["vae"] = load_vae(vae, torch_dtype, use_safetensors=not allow_pickle, vae_class=family.vae_class)
    parts["vae"] = parts["vae"].to(vae_dtype(parts["vae"], torch_dtype))
    root = config_root(name_or_path, config)
    noise_scheduler = family.scheduler_class.from_pretrained(root, subfolder="scheduler",
                                                                  revision=None if config else revision)
    for name in ("vae", family.denoiser, *family.text_encoders):
        parts[name].requires_grad_(False)
        parts[name].eval()
    return Components(family, {t: parts[t] for t in family.tokenizers}, {e: parts[e] for e in family.text_encoders},
                      parts["vae"], parts[family.denoiser], noise_scheduler, text_options,
                      family.training_guidance(parts[family.denoiser].config, guidance))
