"""The UNet families: SD-1.x / 2.x and SDXL (DDPM, ε or v as the scheduler config says)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from diffusers import DDPMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor2_0

from toolkit.models.families.base import Conditioning, ModelFamily
from toolkit.models.processes import DDPM


class UNetFamily(ModelFamily):
    denoiser = "unet"
    denoiser_label = "UNet"
    denoiser_class = UNet2DConditionModel
    scheduler_class = DDPMScheduler
    input_layer = "conv_in"

    @classmethod
    def noise_process(cls, scheduler: Any) -> Any:
        return DDPM(scheduler)

    @classmethod
    def sdpa_processor(cls) -> Any | None:
        return AttnProcessor2_0()

    @classmethod
    def sampling(cls, index=None, denoiser_config=None) -> dict[str, Any]:
        # The toolkit's choice for the UNet families: DDIM at 25 steps keeps evaluation affordable, guidance 5.
        return {"scheduler": "DDIMScheduler", "steps": 25, "guidance_scale": 5.0}


class SD(UNetFamily):
    name = "sd"
    pipeline_class = StableDiffusionPipeline
    text_encoders = ("text_encoder",)
    tokenizers = ("tokenizer",)
    kohya_prefixes = {"unet": "lora_unet_", "text_encoder": "lora_te_"}
    kohya_aliases = {"lora_te1_": "lora_te_"}   # diffusers' convert_state_dict_to_kohya writes te1 for SD-1.x too
    base_model_version = "sd_v1"
    cache_fields = ("prompt_embeds",)
    preset = "lora"
    pretrained_kwargs = {"safety_checker": None, "requires_safety_checker": False}

    @classmethod
    def matches(cls, denoiser_class: str, config: Mapping[str, Any]) -> bool:
        return super().matches(denoiser_class, config) and config.get("addition_embed_type") is None

    @classmethod
    def encode_prompts(cls, tokenizers, text_encoders, captions, device, options=None) -> Conditioning:
        # StableDiffusionPipeline.encode_prompt: the last hidden state of the one CLIP text encoder.
        (tok,), (enc,) = tokenizers, text_encoders
        ids = tok(list(captions), padding="max_length", truncation=True, max_length=tok.model_max_length,
                  return_tensors="pt").input_ids.to(device)
        return {"prompt_embeds": enc(ids)[0]}

    @classmethod
    def denoiser_inputs(cls, noisy, timesteps, cond, micro, dtype, guidance=None):
        return (noisy, timesteps), {"encoder_hidden_states": cond["prompt_embeds"].to(dtype)}

    @classmethod
    def pipeline_kwargs(cls) -> dict[str, Any]:
        return {**cls.pretrained_kwargs, "feature_extractor": None}


class SDXL(UNetFamily):
    name = "sdxl"
    pipeline_class = StableDiffusionXLPipeline
    text_encoders = ("text_encoder", "text_encoder_2")
    tokenizers = ("tokenizer", "tokenizer_2")
    kohya_prefixes = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
    base_model_version = "sdxl_base_v1-0"
    cache_fields = ("prompt_embeds", "pooled")
    micro_conditioned = True
    preset = "lora_sdxl"

    @classmethod
    def matches(cls, denoiser_class: str, config: Mapping[str, Any]) -> bool:
        return super().matches(denoiser_class, config) and config.get("addition_embed_type") == "text_time"

    @classmethod
    def encode_prompts(cls, tokenizers, text_encoders, captions, device, options=None) -> Conditioning:
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
    def denoiser_inputs(cls, noisy, timesteps, cond, micro, dtype, guidance=None):
        if micro is None:
            raise ValueError("SDXL needs the micro-conditioning (original size, crop, target size) of every image")
        return (noisy, timesteps), {
            "encoder_hidden_states": cond["prompt_embeds"].to(dtype),
            "added_cond_kwargs": {"text_embeds": cond["pooled"].to(dtype), "time_ids": micro.to(dtype)}}

    @classmethod
    def names_adapter(cls, keys: Sequence[str], base_model_version: str) -> bool:
        if base_model_version:
            return "xl" in base_model_version
        return any("lora_te2_" in k or "input_blocks" in k or "text_encoder_2" in k for k in keys)

    @classmethod
    def kohya_module_name(cls, component: str, module: str, denoiser_config: Mapping[str, Any]) -> str:
        if component != "unet":
            return super().kohya_module_name(component, module, denoiser_config)
        # kohya trains SDXL on the original (sgm) UNet, so its files spell sgm module names.
        from toolkit.models.single_file import ldm_unet_module_name

        return ldm_unet_module_name(module, denoiser_config)
