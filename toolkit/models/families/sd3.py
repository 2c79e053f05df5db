"""SD3 / SD3.5: an MMDiT transformer, CLIP-L + CLIP-G + T5, rectified flow with the scheduler config's shift."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

from toolkit.models.families.base import Conditioning, ModelFamily, t5_options
from toolkit.models.processes import RectifiedFlow


class SD3(ModelFamily):
    name = "sd3"
    pipeline_class = StableDiffusion3Pipeline
    denoiser = "transformer"
    denoiser_label = "transformer"
    denoiser_class = SD3Transformer2DModel
    scheduler_class = FlowMatchEulerDiscreteScheduler
    input_layer = "pos_embed.proj"
    text_encoders = ("text_encoder", "text_encoder_2", "text_encoder_3")
    tokenizers = ("tokenizer", "tokenizer_2", "tokenizer_3")
    # sd-scripts' SD3 LoRA names (networks/lora_sd3.py), which ComfyUI reads: MMDiT module names
    kohya_prefixes = {"transformer": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_",
                      "text_encoder_3": "lora_te3_"}
    base_model_version = "sd3"
    cache_fields = ("prompt_embeds", "pooled")
    wide_fields = ("prompt_embeds",)   # holds T5's states, which overflow float16
    preset = "lora_sd3"
    # The original layout fuses q, k, v into one qkv projection: a LoRA stacks along its rows, which
    # LoHa's Hadamard and LoKr's Kronecker factors cannot (diffusers reads neither for SD3 anyway).
    format_kinds = {"diffusers": ("lora", "dora"), "kohya": ("lora", "dora")}

    @classmethod
    def noise_process(cls, scheduler: Any) -> Any:
        return RectifiedFlow(scheduler)

    @classmethod
    def lora_components(cls) -> tuple[str, ...]:
        # SD3LoraLoaderMixin: transformer, text_encoder, text_encoder_2 (no T5)
        return (cls.denoiser, "text_encoder", "text_encoder_2")

    @classmethod
    def text_options(cls, max_sequence_length: int | None = None) -> dict[str, Any]:
        return t5_options(cls, max_sequence_length)

    @classmethod
    def encode_prompts(cls, tokenizers, text_encoders, captions, device, options=None) -> Conditioning:
        # StableDiffusion3Pipeline.encode_prompt itself, over these encoders: the conditioning training
        # sees is the one sampling computes (CLIP penultimate states padded to T5's width, then T5's).
        (t1, t2, t3), (e1, e2, e3) = tokenizers, text_encoders
        encoder = cls.pipeline_class(transformer=None, scheduler=None, vae=None, text_encoder=e1, tokenizer=t1,
                                     text_encoder_2=e2, tokenizer_2=t2, text_encoder_3=e3, tokenizer_3=t3)
        embeds, _, pooled, _ = encoder.encode_prompt(prompt=list(captions), prompt_2=None, prompt_3=None,
                                                     device=torch.device(device), do_classifier_free_guidance=False,
                                                     **cls.text_options(**(options or {})))
        return {"prompt_embeds": embeds, "pooled": pooled}

    @classmethod
    def denoiser_inputs(cls, noisy, timesteps, cond, micro, dtype, guidance=None):
        return (), {"hidden_states": noisy, "timestep": timesteps,
                    "encoder_hidden_states": cond["prompt_embeds"].to(dtype),
                    "pooled_projections": cond["pooled"].to(dtype)}

    @classmethod
    def call_kwargs(cls, options: Mapping[str, Any]) -> dict[str, Any]:
        return {"max_sequence_length": cls.text_options(**options)["max_sequence_length"]}

    @classmethod
    def names_adapter(cls, keys: Sequence[str], base_model_version: str) -> bool:
        # MMDiT names (kohya), T5's prefix, or diffusers' SD3 transformer keys (Flux's have single blocks too)
        return base_model_version.startswith("sd3") or any(
            "joint_blocks" in k or k.startswith("lora_te3_") or k.startswith("transformer.transformer_blocks.")
            and "attn.add_q_proj" in k for k in keys)

    @classmethod
    def kohya_module_name(cls, component: str, module: str, denoiser_config: Mapping[str, Any]) -> str:
        if component != cls.denoiser:
            return super().kohya_module_name(component, module, denoiser_config)
        from toolkit.models.single_file_sd3 import mmdit_module_name

        return mmdit_module_name(module, denoiser_config)[0]

    @classmethod
    def kohya_fused(cls, denoiser_config: Mapping[str, Any]) -> dict[str, tuple[str, ...]]:
        from toolkit.models.single_file_sd3 import fused_modules

        return fused_modules(denoiser_config)

    @classmethod
    def kohya_row_order(cls, module: str, denoiser_config: Mapping[str, Any]) -> str:
        from toolkit.models.single_file_sd3 import mmdit_module_name

        return "swap" if mmdit_module_name(module, denoiser_config)[1] else "same"

    @classmethod
    def single_file_state_dict(cls, pipe: Any) -> dict[str, torch.Tensor]:
        from toolkit.models.single_file_sd3 import sd3_pipeline_to_single_file

        return sd3_pipeline_to_single_file(pipe)
