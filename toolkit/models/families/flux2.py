"""FLUX.2 [klein] (4B / 9B, base and distilled): a double- and single-stream transformer over the VAE's
2x2-patchified latents, conditioned by a text-only LLM (Qwen3) through its chat template and a stack of
its intermediate hidden states; rectified flow.

What the transformer sees, exactly as ``Flux2KleinPipeline.__call__`` gives it:

    hidden_states          the VAE latents cut into 2x2 patches (``_patchify_latents``: 4·C channels at
                           half the side), normalised by the VAE's batch-norm statistics
                           (``vae.bn.running_mean/var``) and flattened to (n, h·w, 4·C)
                           (``_pack_latents``; the prediction is scattered back, ``_unpack_latents_with_ids``)
    img_ids, txt_ids       4-axis (t, row, column, l) RoPE ids: (0, row, col, 0) per patch
                           (``_prepare_latent_ids``), (0, 0, 0, token) per text token (``_prepare_text_ids``)
    timestep               σ (the pipeline divides the scheduler's σ·1000 by 1000)
    guidance               none: Klein embeds no guidance (the base models take real CFG against "")
    encoder_hidden_states  Qwen3's hidden states after layers 9, 18 and 27, concatenated per token
                           (``_get_qwen3_prompt_embeds``: the prompt in the chat template with thinking
                           off, padded to ``max_sequence_length``, 512 by default)

The training latents are therefore the normalised patchified ones (diffusers'
``train_dreambooth_lora_flux2_klein.py`` does the same), so noise, target and loss live where the pipeline
samples. σ carries the dynamic shift FLUX.2's scheduler config declares (``use_dynamic_shifting``, μ on
the config's line through (base_image_seq_len, base_shift) and (max_image_seq_len, max_shift) at the
token count), as for FLUX.1 (``toolkit.models.processes.RectifiedFlow``). The pipeline samples with
BFL's empirical μ (``compute_empirical_mu``: also a function of the step count), which the training σ
cannot follow, since a training step has no step count.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Transformer2DModel

from toolkit.models.families.base import Conditioning, ModelFamily, call_default
from toolkit.models.processes import RectifiedFlow

# The original (BFL) module names kohya / musubi / ComfyUI LoRA files use for FLUX.2, per diffusers module:
# (name, part of a fused projection or None). Hand-written because diffusers ships only the reader
# (``_convert_kohya_flux2_lora_to_diffusers``); these are its names, and the tests read files written
# with them back through it.
_FIXED = {"x_embedder": "img_in", "context_embedder": "txt_in",
          "time_guidance_embed.timestep_embedder.linear_1": "time_in.in_layer",
          "time_guidance_embed.timestep_embedder.linear_2": "time_in.out_layer", "proj_out": "final_layer.linear"}
_DOUBLE = {"attn.to_q": ("img_attn.qkv", 0), "attn.to_k": ("img_attn.qkv", 1), "attn.to_v": ("img_attn.qkv", 2),
           "attn.add_q_proj": ("txt_attn.qkv", 0), "attn.add_k_proj": ("txt_attn.qkv", 1),
           "attn.add_v_proj": ("txt_attn.qkv", 2), "attn.to_out.0": ("img_attn.proj", None),
           "attn.to_add_out": ("txt_attn.proj", None), "ff.linear_in": ("img_mlp.0", None),
           "ff.linear_out": ("img_mlp.2", None), "ff_context.linear_in": ("txt_mlp.0", None),
           "ff_context.linear_out": ("txt_mlp.2", None)}
_SINGLE = {"attn.to_qkv_mlp_proj": ("linear1", None), "attn.to_out": ("linear2", None)}   # fused already
_BLOCK_RE = re.compile(r"(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)")


def bfl_module_name(module: str) -> str:
    """The original name of a FLUX.2 transformer module (``transformer_blocks.0.attn.to_k`` ->
    ``double_blocks.0.img_attn.qkv``, its second third)."""
    if module in _FIXED:
        return _FIXED[module]
    m = _BLOCK_RE.fullmatch(module)
    table, block = (_DOUBLE, "double_blocks") if m and m[1] == "transformer_blocks" else (_SINGLE, "single_blocks")
    if m is None or m[3] not in table:
        raise ValueError(f"FLUX.2 transformer module {module!r} has no name in the original (BFL) layout that "
                         "diffusers' kohya converter reads")
    return f"{block}.{m[2]}.{table[m[3]][0]}"


def token_count(shape: Sequence[int]) -> int:
    """Tokens of a batch of training latents of ``shape`` (n, 4·C, h, w): one per patchified pixel."""
    return int(shape[-2]) * int(shape[-1])


class Flux2Klein(ModelFamily):
    name = "flux2"
    pipeline_class = Flux2KleinPipeline
    denoiser = "transformer"
    denoiser_label = "transformer"
    denoiser_class = Flux2Transformer2DModel
    scheduler_class = FlowMatchEulerDiscreteScheduler
    vae_class = AutoencoderKLFlux2
    other_variants = ("FLUX.2 [dev] (guidance embedded, a Mistral text encoder) is not supported; "
                      "FLUX.2 [klein] (no guidance embedding, a Qwen3 text encoder) is")
    input_layer = "x_embedder"
    text_encoders = ("text_encoder",)
    tokenizers = ("tokenizer",)
    # kohya / musubi / ComfyUI names (BFL module names), which diffusers' Flux2 loader converts
    # (_convert_kohya_flux2_lora_to_diffusers); it reads no text-encoder LoRA, so no Qwen3 module has a
    # kohya name (kohya_module_name refuses each; the prefix only lets the reader ask)
    kohya_prefixes = {"transformer": "lora_unet_", "text_encoder": "lora_te1_"}
    base_model_version = "flux2"
    cache_fields = ("prompt_embeds",)
    # an LLM's residual stream carries a few "massive activations" far beyond the rest (Sun et al., 2024):
    # bfloat16 keeps their range where float16 may not
    wide_fields = ("prompt_embeds",)
    preset = "lora_flux2"
    # q/k/v are one fused projection in the original layout: a LoRA stacks along its rows; diffusers'
    # Flux2 loader drops DoRA magnitudes from a kohya file, so that file carries LoRA only
    format_kinds = {"diffusers": ("lora", "dora"), "kohya": ("lora",)}
    single_file_layout = False   # BFL's FLUX.2 transformer file is not written (merge: the diffusers folder)

    @classmethod
    def matches(cls, denoiser_class: str, config: Mapping[str, Any]) -> bool:
        # FLUX.2 [dev] shares the transformer class but embeds guidance and reads Mistral's states
        # (Flux2Pipeline): not this family
        return denoiser_class == cls.denoiser_class.__name__ and not config.get("guidance_embeds", True)

    @classmethod
    def noise_process(cls, scheduler: Any) -> Any:
        return RectifiedFlow(scheduler, image_seq_len=token_count)

    @classmethod
    def lora_components(cls) -> tuple[str, ...]:
        return (cls.denoiser,)   # Flux2LoraLoaderMixin reads the transformer's LoRA only

    @classmethod
    def native_sample_size(cls, denoiser_config: Mapping[str, Any]) -> int:
        # the transformer config has no sample_size: the pipeline's default_sample_size (128 latents)
        return cls.pipeline_class(scheduler=None, vae=None, text_encoder=None, tokenizer=None,
                                  transformer=None).default_sample_size

    @classmethod
    def text_options(cls, max_sequence_length: int | None = None) -> dict[str, Any]:
        default = call_default(cls.pipeline_class, "max_sequence_length")
        n = default if max_sequence_length is None else int(max_sequence_length)
        if n < 1:
            raise ValueError(f"model.max_sequence_length={n}: the prompt's token count (chat template included) "
                             f"must be positive; the {cls.name} pipeline uses {default}")
        return {"max_sequence_length": n}

    @classmethod
    def encode_prompts(cls, tokenizers, text_encoders, captions, device, options=None) -> Conditioning:
        # Flux2KleinPipeline.encode_prompt itself: the chat template, the stacked hidden states
        (tokenizer,), (encoder,) = tokenizers, text_encoders
        pipe = cls.pipeline_class(transformer=None, scheduler=None, vae=None, text_encoder=encoder, tokenizer=tokenizer)
        embeds, _ = pipe.encode_prompt(prompt=list(captions), device=torch.device(device),
                                       **cls.text_options(**(options or {})))
        return {"prompt_embeds": embeds}

    @classmethod
    def guidance_ignored(cls, index, denoiser_config) -> str | None:
        if index.get("is_distilled"):
            return "a step-distilled FLUX.2 [klein] samples without CFG (Flux2KleinPipeline ignores a guidance above 1)"
        return None

    @classmethod
    def latent_patch(cls, denoiser_config: Mapping[str, Any]) -> int:
        return 2   # _patchify_latents: 2x2 latent pixels a token (the transformer's patch_size is 1)

    @classmethod
    def sampling(cls, index=None, denoiser_config=None) -> dict[str, Any]:
        # the pipeline's own defaults are the base models' recipe (50 steps, CFG 4); the step-distilled
        # models (model_index.json: is_distilled) sample in 4 steps without CFG (the pipeline ignores it)
        out = super().sampling(index, denoiser_config)
        if (index or {}).get("is_distilled"):
            out.update(steps=4, guidance_scale=1.0)
        return out

    @classmethod
    def posterior_latents(cls, posterior: Any, generator: Any = None) -> torch.Tensor:
        # the posterior's mean: what Flux2KleinPipeline encodes an image to (_encode_vae_image, argmax),
        # what diffusers' Klein LoRA example trains on and what the VAE's batch-norm statistics describe
        return posterior.mode()

    @classmethod
    def training_latents(cls, latents: torch.Tensor, vae: Any) -> torch.Tensor:
        # Flux2KleinPipeline's latent space: patchified, then normalised by the VAE's batch-norm statistics
        # (what __call__ undoes before decoding), in float32 as diffusers' Klein example does
        x = cls.pipeline_class._patchify_latents(latents).float()
        mean = vae.bn.running_mean.view(1, -1, 1, 1).float()
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1).float() + vae.config.batch_norm_eps)
        return (x - mean) / std

    @classmethod
    def denoiser_inputs(cls, noisy, timesteps, cond, micro, dtype, guidance=None):
        embeds = cond["prompt_embeds"].to(dtype)
        kwargs = {"hidden_states": cls.pipeline_class._pack_latents(noisy),
                  "timestep": timesteps.to(dtype) / 1000,   # the pipeline's divisor; the model multiplies back
                  "guidance": None, "encoder_hidden_states": embeds,
                  "txt_ids": cls.pipeline_class._prepare_text_ids(embeds).to(noisy.device),
                  "img_ids": cls.pipeline_class._prepare_latent_ids(noisy).to(noisy.device)}
        return (), kwargs

    @classmethod
    def prediction(cls, output: Any, noisy: torch.Tensor) -> torch.Tensor:
        ids = cls.pipeline_class._prepare_latent_ids(noisy).to(noisy.device)
        return cls.pipeline_class._unpack_latents_with_ids(output.sample, ids, noisy.shape[-2], noisy.shape[-1])

    @classmethod
    def call_kwargs(cls, options: Mapping[str, Any]) -> dict[str, Any]:
        return {"max_sequence_length": cls.text_options(**options)["max_sequence_length"]}

    @classmethod
    def names_adapter(cls, keys: Sequence[str], base_model_version: str) -> bool:
        # diffusers' Flux2 transformer keys: its single blocks' fused qkv+MLP projection, the double blocks' SwiGLU
        return base_model_version.startswith("flux2") or any(
            "to_qkv_mlp_proj" in k or ".ff.linear_in." in k or ".ff_context.linear_in." in k for k in keys)

    @classmethod
    def kohya_module_name(cls, component: str, module: str, denoiser_config: Mapping[str, Any]) -> str:
        if component != cls.denoiser:
            raise ValueError(f"{component}.{module}: diffusers' FLUX.2 loader reads no text-encoder LoRA, so a kohya "
                             "file has no name for it")
        return bfl_module_name(module)

    @classmethod
    def kohya_fused(cls, denoiser_config: Mapping[str, Any]) -> dict[str, tuple[str, ...]]:
        # the double blocks' qkv of each stream, split in equal thirds (kohya_fused_rows: None)
        out: dict[str, list[str]] = {}
        for i in range(int(denoiser_config["num_layers"])):
            for rest, (name, part) in _DOUBLE.items():
                if part is not None:
                    out.setdefault(f"double_blocks.{i}.{name}", [""] * 3)[part] = f"transformer_blocks.{i}.{rest}"
        return {k: tuple(v) for k, v in out.items()}

