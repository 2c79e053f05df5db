"""What differs between UNet model families, one small piece per family.

The family is read from the pipeline itself (``model_index.json`` / the UNet config:
``addition_embed_type == "text_time"`` is SDXL), never from a flag the user must keep consistent.
Everything else (the LightningModule, caches, checkpoints, callbacks, adapter files) asks its
family piece and never branches on the family.

    SD (1.x / 2.x)   one CLIP text encoder; conditioning = last hidden state
    SDXL             two text encoders; conditioning = penultimate hidden states of both,
                     concatenated, plus the pooled projection of encoder 2 and the
                     micro-conditioning time ids (original size, crop top-left, target size)

Adding a family means adding one such piece and registering it in ``FAMILIES``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

Conditioning = dict[str, torch.Tensor]   # per-caption tensors (the text cache stores each field)


class ModelFamily:
    """The family interface. Subclasses set the class attributes and override the methods."""

    name: ClassVar[str]
    pipeline_class: ClassVar[type]
    text_encoders: ClassVar[tuple[str, ...]]       # pipeline component names
    tokenizers: ClassVar[tuple[str, ...]]
    kohya_prefixes: ClassVar[Mapping[str, str]]    # component -> kohya/A1111 key prefix
    kohya_aliases: ClassVar[Mapping[str, str]] = {}  # other prefix spellings read as the canonical one
    base_model_version: ClassVar[str]              # kohya ss_base_model_version

    cache_fields: ClassVar[tuple[str, ...]]        # what encode_prompts returns, per caption
    micro_conditioned: ClassVar[bool] = False      # the UNet takes size/crop conditioning

    @classmethod
    def matches(cls, unet_config: Mapping[str, Any]) -> bool:
        raise NotImplementedError

    # ---------------------------------------------------------------- conditioning
    @classmethod
    def encode_prompts(cls, tokenizers: Sequence[Any], text_encoders: Sequence[torch.nn.Module],
                       captions: Sequence[str], device: torch.device | str) -> Conditioning:
        """Per-caption conditioning tensors (``cache_fields``), as the family's pipeline computes them."""
        raise NotImplementedError

    @classmethod
    def unet_inputs(cls, cond: Conditioning, micro: torch.Tensor | None, dtype: torch.dtype) -> dict[str, Any]:
        """Keyword arguments of ``unet(sample, timestep, **...)`` besides the sample and timestep.

        ``micro``: (n, 6) original h, w, crop top, left, target h, w (``toolkit.data.transforms``)."""
        raise NotImplementedError

    @classmethod
    def pipeline(cls, components: Mapping[str, Any], scheduler: Any) -> Any:
        """The family's stock diffusers pipeline over already-loaded components (in-training samples)."""
        raise NotImplementedError

    # ---------------------------------------------------------------- adapter file names
    @classmethod
    def kohya_module_name(cls, component: str, module: str, unet_config: Mapping[str, Any]) -> str:
        """The dotted name a kohya/A1111 key spells (with '_' for '.') for one adapted module."""
        if component == "unet":
            return module
        # kohya files name CLIP modules under text_model.; transformers 5's CLIPTextModel has no
        # such level (CLIPTextModelWithProjection still does), so it is added where missing.
        if module.startswith(("text_model.", "text_projection")):
            return module
        return f"text_model.{module}"

    @classmethod
    def components(cls) -> tuple[str, ...]:
        return ("unet", *cls.text_encoders)


class SD(ModelFamily):
    name = "sd"
    pipeline_class = StableDiffusionPipeline
    text_encoders = ("text_encoder",)
    tokenizers = ("tokenizer",)
    kohya_prefixes = {"unet": "lora_unet_", "text_encoder": "lora_te_"}
    kohya_aliases = {"lora_te1_": "lora_te_"}   # diffusers' convert_state_dict_to_kohya writes te1 for SD-1.x too
    base_model_version = "sd_v1"
    cache_fields = ("prompt_embeds",)

    @classmethod
    def matches(cls, unet_config: Mapping[str, Any]) -> bool:
        return unet_config.get("addition_embed_type") is None

    @classmethod
    def encode_prompts(cls, tokenizers, text_encoders, captions, device) -> Conditioning:
        # StableDiffusionPipeline.encode_prompt: the last hidden state of the one CLIP text encoder.
        (tok,), (enc,) = tokenizers, text_encoders
        ids = tok(list(captions), padding="max_length", truncation=True, max_length=tok.model_max_length,
                  return_tensors="pt").input_ids.to(device)
        return {"prompt_embeds": enc(ids)[0]}

    @classmethod
    def unet_inputs(cls, cond, micro, dtype) -> dict[str, Any]:
        return {"encoder_hidden_states": cond["prompt_embeds"].to(dtype)}

    @classmethod
    def pipeline(cls, components, scheduler) -> Any:
        return StableDiffusionPipeline(vae=components["vae"], text_encoder=components["text_encoder"],
                                       tokenizer=components["tokenizer"], unet=components["unet"], scheduler=scheduler,
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)


class SDXL(ModelFamily):
    name = "sdxl"
    pipeline_class = StableDiffusionXLPipeline
    text_encoders = ("text_encoder", "text_encoder_2")
    tokenizers = ("tokenizer", "tokenizer_2")
    kohya_prefixes = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
    base_model_version = "sdxl_base_v1-0"
    cache_fields = ("prompt_embeds", "pooled")
    micro_conditioned = True

    @classmethod
    def matches(cls, unet_config: Mapping[str, Any]) -> bool:
        return unet_config.get("addition_embed_type") == "text_time"

    @classmethod
    def encode_prompts(cls, tokenizers, text_encoders, captions, device) -> Conditioning:
        # StableDiffusionXLPipeline.encode_prompt: penultimate hidden states of both encoders,
        # concatenated; the pooled (projected) output of encoder 2.
        hidden, pooled = [], None
        for tok, enc in zip(tokenizers, text_encoders):
            ids = tok(list(captions), padding="max_length", truncation=True, max_length=tok.model_max_length,
                      return_tensors="pt").input_ids.to(device)
            out = enc(ids, output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            if out[0].ndim == 2:   # CLIPTextModelWithProjection: text_embeds
                pooled = out[0]
        if pooled is None:
            raise ValueError("SDXL needs a text encoder with a projection (CLIPTextModelWithProjection) as encoder 2")
        return {"prompt_embeds": torch.cat(hidden, dim=-1), "pooled": pooled}

    @classmethod
    def unet_inputs(cls, cond, micro, dtype) -> dict[str, Any]:
        if micro is None:
            raise ValueError("SDXL needs the micro-conditioning (original size, crop, target size) of every image")
        return {"encoder_hidden_states": cond["prompt_embeds"].to(dtype),
                "added_cond_kwargs": {"text_embeds": cond["pooled"].to(dtype), "time_ids": micro.to(dtype)}}

    @classmethod
    def pipeline(cls, components, scheduler) -> Any:
        return StableDiffusionXLPipeline(
            vae=components["vae"], text_encoder=components["text_encoder"],
            text_encoder_2=components["text_encoder_2"], tokenizer=components["tokenizer"],
            tokenizer_2=components["tokenizer_2"], unet=components["unet"], scheduler=scheduler)

    @classmethod
    def kohya_module_name(cls, component: str, module: str, unet_config: Mapping[str, Any]) -> str:
        if component != "unet":
            return super().kohya_module_name(component, module, unet_config)
        # kohya trains SDXL on the original (sgm) UNet, so its files spell sgm module names.
        from toolkit.models.single_file import ldm_unet_module_name

        return ldm_unet_module_name(module, unet_config)


FAMILIES: tuple[type[ModelFamily], ...] = (SDXL, SD)


def family_of(unet_config: Mapping[str, Any]) -> type[ModelFamily]:
    for fam in FAMILIES:
        if fam.matches(unet_config):
            return fam
    raise ValueError(f"no model family matches this UNet (addition_embed_type="
                     f"{unet_config.get('addition_embed_type')!r}); supported: {[f.name for f in FAMILIES]}")


def family_named(name: str) -> type[ModelFamily]:
    for fam in FAMILIES:
        if fam.name == name:
            return fam
    raise ValueError(f"unknown model family {name!r}; supported: {[f.name for f in FAMILIES]}")
