"""What differs between model families, one small piece per family.

A family is a denoiser (a UNet or a transformer) with its text encoders, its noise process and
its pipeline. The family is read from the pipeline itself (``model_index.json``: which denoiser
component it has and its class; for UNets the config's ``addition_embed_type == "text_time"`` is
SDXL), never from a flag the user must keep consistent. Everything else (the LightningModule,
the objective, caches, checkpoints, callbacks, adapter files, sampling, evaluation and the
settings that follow the model) asks its family piece and never branches on the family.

    SD (1.x / 2.x)   UNet; one CLIP text encoder; conditioning = last hidden state; DDPM (ε or v)
    SDXL             UNet; two text encoders; conditioning = penultimate hidden states of both,
                     concatenated, plus the pooled projection of encoder 2 and the
                     micro-conditioning time ids (original size, crop top-left, target size)
    SD3 / 3.5        MMDiT transformer; two CLIPs + T5; conditioning = both CLIPs' penultimate
                     states (concatenated, zero-padded to T5's width) followed by T5's tokens along
                     the sequence, plus both CLIPs' pooled outputs; rectified flow

What a piece says (class attributes, then methods):

    denoiser, denoiser_class      the pipeline component that is trained, and its diffusers class
    scheduler_class               the training noise process (DDPMScheduler: ε/v; flow matching)
    text_encoders, tokenizers     pipeline component names
    cache_fields, wide_fields     per-caption tensors; those whose values exceed float16's range
    preset, sampling              the conf/module preset; sampler, steps and guidance it samples with
    encode_prompts                captions -> conditioning, exactly as the family's pipeline computes it
    denoiser_inputs, prediction   the denoiser's call signature and where its prediction is
    pipeline, call_kwargs         the stock pipeline over loaded components, and its extra call kwargs
    kohya_*                       adapter key names in the kohya/ComfyUI format
    single_file_state_dict        the pipeline as one checkpoint file in the family's original layout

Adding a family means adding one such piece and registering it in ``FAMILIES``. Flux.1 fits as
a piece whose ``denoiser_inputs`` packs 2x2 latent patches and adds image/text position ids and
the embedded guidance, whose ``prediction`` unpacks, and whose ``flow_shift`` is the dynamic
shift from the image's sequence length; a family with an LLM text encoder as one whose
``encode_prompts`` runs the LLM's chat template and hidden-state selection.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from diffusers import (
    DDPMScheduler,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.models.attention_processor import AttnProcessor2_0

from toolkit.models.processes import DDPM, RectifiedFlow

Conditioning = dict[str, torch.Tensor]   # per-caption tensors (the text cache stores each field)


def call_default(pipeline_class: type, arg: str) -> Any:
    """A default of the pipeline's ``__call__`` (its sampling steps, guidance, T5 length): the
    library's own constants, not copies of them."""
    return inspect.signature(pipeline_class.__call__).parameters[arg].default


class ModelFamily:
    """The family interface. Subclasses set the class attributes and override the methods."""

    name: ClassVar[str]
    pipeline_class: ClassVar[type]
    denoiser: ClassVar[str]                        # pipeline component name of the denoiser
    denoiser_label: ClassVar[str]                  # what messages call it
    denoiser_class: ClassVar[type]
    scheduler_class: ClassVar[type]                # the training noise scheduler
    input_layer: ClassVar[str]                     # the denoiser's first layer: its weight dtype is the input dtype
    text_encoders: ClassVar[tuple[str, ...]]       # pipeline component names
    tokenizers: ClassVar[tuple[str, ...]]
    kohya_prefixes: ClassVar[Mapping[str, str]]    # component -> kohya/A1111 key prefix
    kohya_aliases: ClassVar[Mapping[str, str]] = {}  # other prefix spellings read as the canonical one
    base_model_version: ClassVar[str]              # kohya ss_base_model_version

    cache_fields: ClassVar[tuple[str, ...]]        # what encode_prompts returns, per caption
    wide_fields: ClassVar[tuple[str, ...]] = ()    # fields float16 cannot hold (T5): cached as bfloat16 bits instead
    micro_conditioned: ClassVar[bool] = False      # the denoiser takes size/crop conditioning
    preset: ClassVar[str]                          # conf/module preset (settings that follow the model)
    # adapter kinds each adapter file format carries whole for this family
    format_kinds: ClassVar[Mapping[str, tuple[str, ...]]] = {"diffusers": ("lora", "dora"),
                                                             "kohya": ("lora", "dora", "loha", "lokr")}
    pretrained_kwargs: ClassVar[Mapping[str, Any]] = {}   # extra kwargs of pipeline_class.from_pretrained

    @classmethod
    def matches(cls, denoiser_class: str, config: Mapping[str, Any]) -> bool:
        """Whether a pipeline whose denoiser is a ``denoiser_class`` with ``config`` is this family."""
        return denoiser_class == cls.denoiser_class.__name__

    @classmethod
    def sampling(cls) -> dict[str, Any]:
        """The sampler (a diffusers scheduler class name), steps and guidance the family samples with."""
        raise NotImplementedError

    @classmethod
    def noise_process(cls, scheduler: Any) -> Any:
        """The noise process the denoiser is trained on (``toolkit.models.processes``)."""
        raise NotImplementedError

    @classmethod
    def native_size(cls, denoiser_config: Mapping[str, Any], vae_factor: int) -> int:
        """The training/sampling size in pixels: the denoiser's latent ``sample_size`` x the VAE factor."""
        return int(denoiser_config["sample_size"]) * vae_factor

    # ---------------------------------------------------------------- conditioning
    @classmethod
    def text_options(cls, max_sequence_length: int | None = None) -> dict[str, Any]:
        """The options of this family's prompt encoding (part of the text cache's key)."""
        if max_sequence_length is not None:
            raise ValueError(f"model.max_sequence_length={max_sequence_length}: the {cls.name} family has no T5 "
                             "encoder whose length it sets; leave it out")
        return {}

    @classmethod
    def encode_prompts(cls, tokenizers: Sequence[Any], text_encoders: Sequence[torch.nn.Module],
                       captions: Sequence[str], device: torch.device | str,
                       options: Mapping[str, Any] | None = None) -> Conditioning:
        """Per-caption conditioning tensors (``cache_fields``), as the family's pipeline computes them."""
        raise NotImplementedError

    @classmethod
    def denoiser_inputs(cls, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning,
                        micro: torch.Tensor | None, dtype: torch.dtype) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """``(args, kwargs)`` of ``denoiser(*args, **kwargs)`` for noisy latents at ``timesteps``.

        ``micro``: (n, 6) original h, w, crop top, left, target h, w (``toolkit.data.transforms``)."""
        raise NotImplementedError

    @classmethod
    def prediction(cls, output: Any, noisy: torch.Tensor) -> torch.Tensor:
        """The prediction in the latents' layout, from the denoiser's output."""
        return output.sample

    # ---------------------------------------------------------------- inference
    @classmethod
    def pipeline(cls, components: Mapping[str, Any], scheduler: Any) -> Any:
        """The family's stock diffusers pipeline over already-loaded components (in-training samples)."""
        return cls.pipeline_class(scheduler=scheduler, **{k: components[k] for k in cls.pipeline_parts()},
                                  **cls.pipeline_kwargs())

    @classmethod
    def pipeline_parts(cls) -> tuple[str, ...]:
        return ("vae", cls.denoiser, *cls.tokenizers, *cls.text_encoders)

    @classmethod
    def pipeline_kwargs(cls) -> dict[str, Any]:
        return dict(cls.pretrained_kwargs)

    @classmethod
    def call_kwargs(cls, options: Mapping[str, Any]) -> dict[str, Any]:
        """Extra keyword arguments of ``pipe(...)`` that the text options fix (SD3: the T5 length)."""
        return {}

    @classmethod
    def sdpa_processor(cls) -> Any | None:
        """The attention processor ``module.speed.attention=sdpa`` sets (None: the denoiser's own is SDPA)."""
        return None

    # ---------------------------------------------------------------- adapter file names
    @classmethod
    def kohya_module_name(cls, component: str, module: str, denoiser_config: Mapping[str, Any]) -> str:
        """The dotted name a kohya/A1111 key spells (with '_' for '.') for one adapted module."""
        if component == cls.denoiser:
            return module
        # kohya files name CLIP modules under text_model.; transformers 5's CLIPTextModel has no
        # such level (CLIPTextModelWithProjection still does), so it is added where missing.
        if module.startswith(("text_model.", "text_projection")):
            return module
        return f"text_model.{module}"

    @classmethod
    def kohya_fused(cls, denoiser_config: Mapping[str, Any]) -> dict[str, tuple[str, ...]]:
        """kohya names of fused layers -> the diffusers modules they stack along the output rows
        (SD3's qkv). Empty where every kohya layer is one diffusers module."""
        return {}

    @classmethod
    def kohya_row_order(cls, module: str, denoiser_config: Mapping[str, Any]) -> str:
        """``swap``: the original layout stores this module's output rows in halves swapped (SD3's
        scale/shift); ``same`` otherwise."""
        return "same"

    @classmethod
    def components(cls) -> tuple[str, ...]:
        return (cls.denoiser, *cls.text_encoders)

    @classmethod
    def names_adapter(cls, keys: Sequence[str], base_model_version: str) -> bool:
        """Whether an adapter file's layer names (as read, or unmatched) and its kohya
        ``ss_base_model_version`` (lower case) name this family (``task=inspect`` without a base)."""
        return False

    @classmethod
    def lora_components(cls) -> tuple[str, ...]:
        """The components the family's diffusers LoRA loader reads adapters into (text-encoder LoRA
        trains these encoders only)."""
        return (cls.denoiser, *cls.text_encoders)

    # ---------------------------------------------------------------- single files
    @classmethod
    def single_file_state_dict(cls, pipe: Any) -> dict[str, torch.Tensor]:
        """Every tensor of the pipeline's models under its key in the family's single-file layout."""
        from toolkit.models.single_file import pipeline_to_ldm

        return pipeline_to_ldm(pipe)


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
    def sampling(cls) -> dict[str, Any]:
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
    def denoiser_inputs(cls, noisy, timesteps, cond, micro, dtype):
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
    def denoiser_inputs(cls, noisy, timesteps, cond, micro, dtype):
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
    def sampling(cls) -> dict[str, Any]:
        # the pipeline's own defaults (SD3-medium's recipe) and the model's own (flow-matching) sampler
        return {"scheduler": cls.scheduler_class.__name__,
                "steps": call_default(cls.pipeline_class, "num_inference_steps"),
                "guidance_scale": call_default(cls.pipeline_class, "guidance_scale")}

    @classmethod
    def text_options(cls, max_sequence_length: int | None = None) -> dict[str, Any]:
        n = call_default(cls.pipeline_class, "max_sequence_length") if max_sequence_length is None \
            else int(max_sequence_length)
        if not 1 <= n <= 512:
            raise ValueError(f"model.max_sequence_length={n}: T5 takes 1 to 512 tokens (SD3's pipeline uses 256)")
        return {"max_sequence_length": n}

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
    def denoiser_inputs(cls, noisy, timesteps, cond, micro, dtype):
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


FAMILIES: tuple[type[ModelFamily], ...] = (SD3, SDXL, SD)


class UnsupportedFamily(ValueError):
    """A pipeline of no supported family (a Flux or video folder): the message names the supported ones."""


def supported() -> str:
    return ", ".join(f"{f.name} ({f.pipeline_class.__name__}, {f.denoiser}: {f.denoiser_class.__name__})"
                     for f in FAMILIES)


def family_of(denoiser_class: str, config: Mapping[str, Any], what: str = "this model") -> type[ModelFamily]:
    """The family of a pipeline whose denoiser is a ``denoiser_class`` configured by ``config``."""
    for fam in FAMILIES:
        if fam.matches(denoiser_class, config):
            return fam
    detail = f", addition_embed_type={config.get('addition_embed_type')!r}" if "addition_embed_type" in config else ""
    raise UnsupportedFamily(f"{what}: no supported model family has a {denoiser_class}{detail} denoiser. "
                            f"Supported: {supported()}.")


def family_of_pipeline(pipe: Any) -> type[ModelFamily]:
    """The family of a loaded pipeline (which denoiser component it holds, and its config)."""
    for fam in FAMILIES:
        model = getattr(pipe, fam.denoiser, None)
        if model is not None and fam.matches(type(model).__name__, model.config):
            return fam
    raise UnsupportedFamily(f"{type(pipe).__name__}: not a pipeline of a supported model family. Supported: "
                            f"{supported()}.")


def family_named(name: str) -> type[ModelFamily]:
    for fam in FAMILIES:
        if fam.name == name:
            return fam
    raise ValueError(f"unknown model family {name!r}; supported: {[f.name for f in FAMILIES]}")
