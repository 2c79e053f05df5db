"""Flux.1 (dev, schnell): an MMDiT + single-stream transformer over packed 2x2 latent patches, CLIP-L
(pooled) + T5 (tokens), rectified flow with the dynamic (image-size) shift, embedded guidance on dev.

What the transformer sees, exactly as ``FluxPipeline.__call__`` gives it:

    hidden_states          the 16-channel latents cut into 2x2 patches: (n, h/2 · w/2, 64)
                           (``FluxPipeline._pack_latents``; the prediction is unpacked back)
    img_ids, txt_ids       the patches' (0, row, column) position ids for the 3-axis RoPE, and zeros
                           for the text tokens (``_prepare_latent_image_ids``, ``encode_prompt``)
    timestep               σ (the pipeline divides the scheduler's σ·1000 by 1000)
    guidance               dev only (``guidance_embeds``): the distilled CFG scale. Training feeds
                           ``model.guidance`` (default: the pipeline's sampling default, 3.5, as
                           diffusers' ``train_dreambooth_lora_flux.py``); sampling records its own
                           (``generation.guidance_scale``)
    encoder_hidden_states  T5's last hidden state (``max_sequence_length`` tokens, 512 by default)
    pooled_projections     CLIP's pooled output

The σ of a training step carries the shift FLUX.1-dev's scheduler config asks for
(``use_dynamic_shifting``): μ grows linearly with the packed sequence length (``calculate_shift``)
and σ' = e^μ / (e^μ + 1/σ − 1), the shift the pipeline samples that image size with
(``toolkit.models.processes.RectifiedFlow``). schnell's config has a fixed shift of 1.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

from toolkit.models.families.base import Conditioning, ModelFamily, call_default, t5_options
from toolkit.models.processes import RectifiedFlow

PATCH = 2   # FluxPipeline packs 2x2 latent pixels into one token (_pack_latents)


def packed_length(shape: Sequence[int]) -> int:
    """Tokens of a latent batch of ``shape`` (n, c, h, w) once packed: what the dynamic shift reads."""
    return (int(shape[-2]) // PATCH) * (int(shape[-1]) // PATCH)


class Flux(ModelFamily):
    name = "flux"
    pipeline_class = FluxPipeline
    denoiser = "transformer"
    denoiser_label = "transformer"
    denoiser_class = FluxTransformer2DModel
    scheduler_class = FlowMatchEulerDiscreteScheduler
    input_layer = "x_embedder"
    text_encoders = ("text_encoder", "text_encoder_2")
    tokenizers = ("tokenizer", "tokenizer_2")
    # kohya sd-scripts' / musubi-tuner's Flux LoRA names (networks/lora_flux.py), which ComfyUI reads:
    # BFL module names; te1 is CLIP-L, te3 T5 (diffusers' Flux loader reads neither T5 nor te2)
    kohya_prefixes = {"transformer": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te3_"}
    base_model_version = "flux1"
    cache_fields = ("prompt_embeds", "pooled")
    wide_fields = ("prompt_embeds",)   # T5's states overflow float16
    preset = "lora_flux"
    # q/k/v (and the single blocks' MLP input) are one fused projection in the original layout: LoRA
    # stacks along its rows, LoHa's and LoKr's products cannot
    format_kinds = {"diffusers": ("lora", "dora"), "kohya": ("lora", "dora")}
    pretrained_kwargs = {"image_encoder": None, "feature_extractor": None}
    single_file_has_all = False   # BFL's flux1-dev.safetensors is the transformer; CLIP, T5, VAE from model.config

    @classmethod
    def noise_process(cls, scheduler: Any) -> Any:
        return RectifiedFlow(scheduler, image_seq_len=packed_length)

    @classmethod
    def lora_components(cls) -> tuple[str, ...]:
        # FluxLoraLoaderMixin: transformer and text_encoder (CLIP); no T5
        return (cls.denoiser, "text_encoder")

    @classmethod
    def native_sample_size(cls, denoiser_config: Mapping[str, Any]) -> int:
        # Flux's transformer config has no sample_size: the pipeline's default_sample_size (128 latents)
        return cls.pipeline_class(scheduler=None, vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
                                  tokenizer_2=None, transformer=None).default_sample_size

    @classmethod
    def training_guidance(cls, denoiser_config: Mapping[str, Any], guidance: float | None) -> float | None:
        if not denoiser_config.get("guidance_embeds"):
            return super().training_guidance(denoiser_config, guidance)   # schnell: none to give
        return float(call_default(cls.pipeline_class, "guidance_scale") if guidance is None else guidance)

    @classmethod
    def guidance_ignored(cls, index, denoiser_config) -> str | None:
        if not denoiser_config.get("guidance_embeds"):
            return "FLUX.1 [schnell] embeds no guidance and FluxPipeline runs no CFG: it samples without any"
        return None

    @classmethod
    def latent_patch(cls, denoiser_config: Mapping[str, Any]) -> int:
        return PATCH   # the pipeline packs 2x2 latent pixels a token (the transformer's patch_size is 1)

    @classmethod
    def sampling(cls, index=None, denoiser_config=None) -> dict[str, Any]:
        # the pipeline's defaults are FLUX.1-dev's (28 steps, embedded guidance 3.5); schnell (no guidance
        # embedding) is timestep-distilled: its recipe is 4 steps, guidance 0
        out = super().sampling(index, denoiser_config)
        if denoiser_config is not None and not denoiser_config.get("guidance_embeds"):
            out.update(steps=4, guidance_scale=0.0)
        return out

    @classmethod
    def text_options(cls, max_sequence_length: int | None = None) -> dict[str, Any]:
        return t5_options(cls, max_sequence_length)

    @classmethod
    def encode_prompts(cls, tokenizers, text_encoders, captions, device, options=None) -> Conditioning:
        # FluxPipeline.encode_prompt itself: T5's tokens and CLIP's pooled output
        (t1, t2), (e1, e2) = tokenizers, text_encoders
        encoder = cls.pipeline_class(transformer=None, scheduler=None, vae=None, text_encoder=e1, tokenizer=t1,
                                     text_encoder_2=e2, tokenizer_2=t2)
        embeds, pooled, _ = encoder.encode_prompt(prompt=list(captions), prompt_2=None, device=torch.device(device),
                                                  **cls.text_options(**(options or {})))
        return {"prompt_embeds": embeds, "pooled": pooled}

    @classmethod
    def denoiser_inputs(cls, noisy, timesteps, cond, micro, dtype, guidance=None):
        n, c, h, w = noisy.shape
        if h % PATCH or w % PATCH:
            raise ValueError(f"Flux packs 2x2 latent patches: latents of {h}x{w} are not; use a data.resolution "
                             "divisible by twice the VAE factor (16 for FLUX.1)")
        embeds = cond["prompt_embeds"].to(dtype)
        kwargs = {"hidden_states": cls.pipeline_class._pack_latents(noisy, n, c, h, w),
                  "timestep": timesteps.to(dtype) / 1000,   # the pipeline's divisor; the model multiplies back
                  "guidance": None if guidance is None else torch.full((n,), float(guidance), device=noisy.device),
                  "pooled_projections": cond["pooled"].to(dtype), "encoder_hidden_states": embeds,
                  "txt_ids": torch.zeros(embeds.shape[1], 3, device=noisy.device, dtype=dtype),
                  "img_ids": cls.pipeline_class._prepare_latent_image_ids(n, h // PATCH, w // PATCH, noisy.device,
                                                                          dtype)}
        return (), kwargs

    @classmethod
    def prediction(cls, output: Any, noisy: torch.Tensor) -> torch.Tensor:
        return cls.pipeline_class._unpack_latents(output.sample, noisy.shape[-2], noisy.shape[-1], 1)

    @classmethod
    def call_kwargs(cls, options: Mapping[str, Any]) -> dict[str, Any]:
        return {"max_sequence_length": cls.text_options(**options)["max_sequence_length"]}

    @classmethod
    def names_adapter(cls, keys: Sequence[str], base_model_version: str) -> bool:
        # BFL names (kohya), or diffusers' Flux transformer keys (single-stream blocks)
        return base_model_version.startswith("flux") or any(
            "double_blocks" in k or "single_blocks" in k or "single_transformer_blocks." in k for k in keys)

    @classmethod
    def kohya_module_name(cls, component: str, module: str, denoiser_config: Mapping[str, Any]) -> str:
        if component != cls.denoiser:
            return super().kohya_module_name(component, module, denoiser_config)
        from toolkit.models.single_file_flux import bfl_module_name

        return bfl_module_name(module)[0]

    @classmethod
    def kohya_fused(cls, denoiser_config: Mapping[str, Any]) -> dict[str, tuple[str, ...]]:
        from toolkit.models.single_file_flux import fused_modules

        return fused_modules(denoiser_config)

    @classmethod
    def kohya_fused_rows(cls, original: str, denoiser_config: Mapping[str, Any]) -> tuple[int, ...] | None:
        from toolkit.models.single_file_flux import fused_rows

        return fused_rows(original, denoiser_config)

    @classmethod
    def kohya_row_order(cls, module: str, denoiser_config: Mapping[str, Any]) -> str:
        from toolkit.models.single_file_flux import bfl_module_name

        return "swap" if bfl_module_name(module)[1] else "same"

    @classmethod
    def single_file_state_dict(cls, pipe: Any) -> dict[str, torch.Tensor]:
        # BFL ships the transformer alone (flux1-dev.safetensors); CLIP, T5 and the VAE are files of their own
        from toolkit.models.single_file_flux import transformer_to_bfl

        return transformer_to_bfl(pipe.transformer.state_dict(), pipe.transformer.config)
