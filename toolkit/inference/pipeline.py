"""A base pipeline plus zero or more LoRA adapters, and seeded, batch-invariant generation.

Each image i is generated from its own ``torch.Generator`` seeded with ``seeds[i]``, so an
image depends only on (settings, prompt, seed): not on the batch size, the batch it fell in,
or the rank that made it. That is what makes sharded evaluation equal single-process runs.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers import DiffusionPipeline
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from toolkit.adapters.loading import load_adapters, resolve_adapter
from toolkit.config import as_list
from toolkit.hashing import file_sha256
from toolkit.inference.schedule import sampling_scheduler
from toolkit.logs import progress as progress_bar
from toolkit.models import quantize as quantization
from toolkit.models.families import family_of_pipeline
from toolkit.models.pretrained import (
    check_model_path,
    is_single_file,
    load_denoiser,
    load_vae,
    model_family,
    pipeline_from_single_file,
    resolve_dtype,
)

log = logging.getLogger(__name__)


def adapter_sha256(path: str | Path, variant: str = "raw") -> str:
    return file_sha256(resolve_adapter(path, variant))


def load_pipeline(name_or_path: str, revision: str | None = None, variant: str | None = None,
                  dtype: str | None = "float32", trust_remote_code: bool = False, allow_pickle: bool = False,
                  config: str | None = None, vae: str | None = None, adapters: Sequence[str] = (),
                  lora_scales: Sequence[float] = (), adapter_variant: str = "raw", scheduler: str | None = None,
                  fuse_adapters: bool = False, device: str | torch.device = "cpu",
                  max_sequence_length: int | None = None, guidance: float | None = None, quantize: str | None = None,
                  vae_slicing: bool = True) -> DiffusionPipeline:
    """Load the base (its family's pipeline class), swap the scheduler (any diffusers scheduler
    class name), and add adapters through the verified loader (``toolkit.adapters.loading``).

    Args:
        name_or_path, revision, variant, dtype, trust_remote_code, allow_pickle, config, vae: the
            ``model`` config (see ``toolkit.models.pretrained.load_components``).
        adapters: adapter paths (see :func:`resolve_adapter`).
        lora_scales: one scale per adapter (a single value applies to all).
        adapter_variant: ``raw`` (the trained weights) or ``ema`` (their moving average).
        fuse_adapters: bake the verified adapters (with their scales) into the weights after loading:
            the same model, without the adapter layers' cost at every step (images equal to the
            unfused pipeline's within 1 uint8 level: float rounding of W + ΔW).
        scheduler: e.g. ``DDIMScheduler``, ``EulerDiscreteScheduler``; None keeps the model's.
        device: where to run.
        max_sequence_length: checked here (a family without T5 refuses it); the images use it through
            :func:`call_kwargs`.
        guidance: the embedded guidance training feeds (``model.guidance``): checked against the model
            here; sampling's own is the generation block's ``guidance_scale``.
        quantize: ``model.quantize``: the denoiser's Linear weights quantized while loading
            (``toolkit.models.quantize``); adapters are then never fused (fusing would re-quantize W + ΔW).
        vae_slicing: decode one image at a time (diffusers' ``enable_vae_slicing``): a batch's decode
            holds one image's activations, and each image is decoded as at batch 1.
    """
    del trust_remote_code  # diffusers pipelines here are the stock classes: no remote code
    check_model_path(name_or_path, config, allow_pickle)
    quantization.check(quantize, torch.device(device).type, is_single_file(name_or_path))
    if quantize and fuse_adapters and adapters:
        raise ValueError(f"generation.fuse_adapters=true with model.quantize={quantize}: fusing would re-quantize "
                         "W + ΔW into the base's format (other images than the adapter applied on top); set "
                         "generation.fuse_adapters=false")
    family = model_family(name_or_path, revision, config)
    family.text_options(max_sequence_length)
    torch_dtype = resolve_dtype(dtype)
    if is_single_file(name_or_path):
        pipe = pipeline_from_single_file(family, name_or_path, config, torch_dtype)
    else:
        extra = {family.denoiser: load_denoiser(family, name_or_path, revision, variant, torch_dtype, allow_pickle,
                                                quantize)} if quantize else {}
        pipe = family.pipeline_class.from_pretrained(name_or_path, revision=revision, variant=variant,
                                                     dtype=torch_dtype, use_safetensors=not allow_pickle,
                                                     **family.pretrained_kwargs, **extra)
    family.training_guidance(getattr(pipe, family.denoiser).config, guidance)
    if vae:
        pipe.vae = load_vae(vae, torch_dtype, use_safetensors=not allow_pickle, vae_class=family.vae_class)
    if scheduler:
        pipe.scheduler = sampling_scheduler(scheduler, pipe.scheduler.config, None)
    loaded = load_adapters(pipe, family, list(adapters), list(lora_scales), adapter_variant)
    apply_schedule(pipe, loaded)
    if loaded and fuse_adapters:
        pipe.fuse_lora(components=list(family.lora_components()), adapter_names=[a.name for a in loaded])
        pipe.unload_lora_weights()
    pipe.set_progress_bar_config(disable=True)
    if vae_slicing:
        pipe.vae.enable_slicing()
    return pipe.to(device)


def apply_schedule(pipe: DiffusionPipeline, loaded: Sequence[Any]) -> None:
    """Sample with the schedule the adapters were trained with (their ``toolkit_schedule``
    metadata; ``toolkit.inference.schedule``). Adapters that disagree are refused, naming both."""
    import json

    schedules = {json.dumps(a.schedule, sort_keys=True): a for a in loaded if a.schedule}
    if len(schedules) > 1:
        a, b = list(schedules.values())[:2]
        raise ValueError(f"adapters trained with different noise schedules cannot be sampled together: {a.path} "
                         f"{a.schedule} vs {b.path} {b.schedule}")
    if schedules:
        adapter = next(iter(schedules.values()))
        pipe.scheduler = sampling_scheduler(type(pipe.scheduler), pipe.scheduler.config, adapter.schedule,
                                            f"adapter {adapter.path}")
        if adapter.schedule["rescale_betas_zero_snr"]:
            log.info("sampling with the adapter's schedule: zero terminal SNR, trailing timesteps (%s)", adapter.path)


def default_size(pipe: DiffusionPipeline) -> int:
    """Native resolution: the denoiser's sample size × VAE factor (both read from the configs)."""
    family = family_of_pipeline(pipe)
    return family.native_size(getattr(pipe, family.denoiser).config, pipe.vae_scale_factor)


def call_kwargs(model: Any) -> dict[str, Any]:
    """The pipeline call's extra keyword arguments that the ``model`` config fixes (SD3: T5's length)."""
    family = model_family(model["name_or_path"], model.get("revision"), model.get("config"))
    return family.call_kwargs(family.text_options(model.get("max_sequence_length")))


def generate(pipe: DiffusionPipeline, prompts: Sequence[str], seeds: Sequence[int], steps: int,
             guidance_scale: float, negative_prompt: str | None = None, height: int | None = None,
             width: int | None = None, batch_size: int = 16, progress: bool = True,
             desc: str = "generate", call_kwargs: dict[str, Any] | None = None) -> list[Image.Image]:
    """One PIL image per (prompt, seed) pair, each from its own seeded generator (``call_kwargs``:
    the family's extra pipeline arguments, e.g. SD3's ``max_sequence_length``)."""
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    size = default_size(pipe)
    negative = {}
    if negative_prompt:   # FLUX.2 [klein]'s pipeline takes none (its CFG runs against "")
        if "negative_prompt" not in inspect.signature(type(pipe).__call__).parameters:
            raise ValueError(f"negative_prompt={negative_prompt!r}: {type(pipe).__name__} takes no negative prompt; "
                             "leave it null")
        negative = {"negative_prompt": [negative_prompt]}
    images: list[Image.Image] = []
    bar = progress_bar(total=len(prompts), desc=desc, unit="img", disable=not progress)
    for i in range(0, len(prompts), batch_size):
        p, s = list(prompts[i : i + batch_size]), list(seeds[i : i + batch_size])
        gens = [torch.Generator("cpu").manual_seed(int(x)) for x in s]
        # prompt by name: Flux2KleinPipeline's first argument is a reference image
        out = pipe(prompt=p, generator=gens, num_inference_steps=steps, guidance_scale=guidance_scale,
                   **{k: v * len(p) for k, v in negative.items()}, height=height or size, width=width or size,
                   output_type="pil", **(call_kwargs or {}))
        images.extend(out.images)
        bar.update(len(p))
    bar.close()
    return images


def make_grid(images: Sequence[Image.Image], cols: int) -> Image.Image:
    w, h = images[0].size
    rows = (len(images) + cols - 1) // cols
    grid = Image.new("RGB", (cols * w, rows * h), (255, 255, 255))
    for i, im in enumerate(images):
        grid.paste(im, ((i % cols) * w, (i // cols) * h))
    return grid


def pipeline_from_cfg(cfg: DictConfig, gen: DictConfig, device: Any = "cpu"):
    """The pipeline of ``cfg.model`` + ``cfg.adapter`` set up as the generation block ``gen`` says."""
    return load_pipeline(**OmegaConf.to_container(cfg.model, resolve=True), adapters=as_list(cfg.adapter),
                         lora_scales=[float(s) for s in as_list(gen.lora_scale)], adapter_variant=cfg.adapter_variant,
                         scheduler=gen.scheduler, fuse_adapters=gen.fuse_adapters, device=device)


def generation_record(cfg: DictConfig, gen: DictConfig) -> dict[str, Any]:
    """Everything that determines a generated image, besides its prompt and seed."""
    m = cfg.model
    return {"model": OmegaConf.to_container(m, resolve=True),
            "family": model_family(m.name_or_path, m.revision, m.get("config")).name,
            "adapters": [{"path": str(a), "variant": cfg.adapter_variant,
                          "sha256": adapter_sha256(a, cfg.adapter_variant)} for a in as_list(cfg.adapter)],
            "lora_scale": as_list(gen.lora_scale), "scheduler": gen.scheduler, "steps": gen.steps,
            "guidance_scale": gen.guidance_scale, "negative_prompt": gen.negative_prompt,
            "fuse_adapters": gen.fuse_adapters,
            "height": gen.height, "width": gen.width}
