"""The family interface (``ModelFamily``): what a model family's piece says. See the package docstring."""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from diffusers import AutoencoderKL

Conditioning = dict[str, torch.Tensor]   # per-caption tensors (the text cache stores each field)


def call_default(pipeline_class: type, arg: str) -> Any:
    """A default of the pipeline's ``__call__`` (its sampling steps, guidance, T5 length): the
    library's own constants, not copies of them."""
    return inspect.signature(pipeline_class.__call__).parameters[arg].default


def t5_options(family: type[ModelFamily], max_sequence_length: int | None) -> dict[str, Any]:
    """T5's prompt length (SD3, Flux): the pipeline's default unless given; T5 takes 1 to 512 tokens."""
    default = call_default(family.pipeline_class, "max_sequence_length")
    n = default if max_sequence_length is None else int(max_sequence_length)
    if not 1 <= n <= 512:
        raise ValueError(f"model.max_sequence_length={n}: T5 takes 1 to 512 tokens (the {family.name} pipeline "
                         f"uses {default})")
    return {"max_sequence_length": n}


class ModelFamily:
    """The family interface. Subclasses set the class attributes and override the methods."""

    name: ClassVar[str]
    pipeline_class: ClassVar[type]
    denoiser: ClassVar[str]                        # pipeline component name of the denoiser
    denoiser_label: ClassVar[str]                  # what messages call it
    denoiser_class: ClassVar[type]
    scheduler_class: ClassVar[type]                # the training noise scheduler
    vae_class: ClassVar[type] = AutoencoderKL      # the pipeline's VAE class
    other_variants: ClassVar[str] = ""             # a refusal says of the others of its denoiser class
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
    single_file_has_all: ClassVar[bool] = True     # a single file holds every model (False: the denoiser alone)
    single_file_layout: ClassVar[bool] = True      # the toolkit writes the family's single-file layout

    @classmethod
    def matches(cls, denoiser_class: str, config: Mapping[str, Any]) -> bool:
        """Whether a pipeline whose denoiser is a ``denoiser_class`` with ``config`` is this family."""
        return denoiser_class == cls.denoiser_class.__name__

    @classmethod
    def sampling(cls, index: Mapping[str, Any] | None = None, denoiser_config: Mapping[str, Any] | None = None
                 ) -> dict[str, Any]:
        """The sampler (a diffusers scheduler class name), steps and guidance the family samples with:
        the training scheduler's class and the pipeline's own defaults, unless the family says otherwise
        (for the model whose ``model_index.json`` and denoiser config are given: a distilled model's own)."""
        return {"scheduler": cls.scheduler_class.__name__,
                "steps": call_default(cls.pipeline_class, "num_inference_steps"),
                "guidance_scale": call_default(cls.pipeline_class, "guidance_scale")}

    @classmethod
    def noise_process(cls, scheduler: Any) -> Any:
        """The noise process the denoiser is trained on (``toolkit.models.processes``), from the
        scheduler as loaded."""
        raise NotImplementedError

    @classmethod
    def native_sample_size(cls, denoiser_config: Mapping[str, Any]) -> int:
        """The native latent side: the denoiser config's ``sample_size``."""
        return int(denoiser_config["sample_size"])

    @classmethod
    def native_size(cls, denoiser_config: Mapping[str, Any], vae_factor: int) -> int:
        """The training/sampling size in pixels: the native latent side x the VAE factor."""
        return cls.native_sample_size(denoiser_config) * vae_factor

    @classmethod
    def training_guidance(cls, denoiser_config: Mapping[str, Any], guidance: float | None) -> float | None:
        """The embedded guidance the denoiser is trained with (``model.guidance``; Flux.1-dev's is
        guidance-distilled); a family whose denoiser embeds none refuses a value."""
        if guidance is not None:
            raise ValueError(f"model.guidance={guidance}: a {cls.name} {cls.denoiser_label} embeds no guidance "
                             "value (only guidance-distilled models such as FLUX.1-dev do); leave it null")
        return None

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
    def guidance_ignored(cls, index: Mapping[str, Any], denoiser_config: Mapping[str, Any]) -> str | None:
        """Why this model's pipeline ignores a sampling guidance above 1 (a distilled model), or None."""
        return None

    @classmethod
    def latent_patch(cls, denoiser_config: Mapping[str, Any]) -> int:
        """Latent pixels one token spans per side: a training size must be a multiple of it x the VAE factor
        (a UNet: 1; a transformer: its config's ``patch_size``; Flux packs 2x2 patches in its pipeline)."""
        return int(denoiser_config.get("patch_size") or 1)

    @classmethod
    def posterior_latents(cls, posterior: Any, generator: Any = None) -> torch.Tensor:
        """The VAE latents a training image gives: a draw from the posterior (diffusers' SD/SDXL/SD3/Flux
        LoRA scripts)."""
        return posterior.sample(generator)

    @classmethod
    def training_latents(cls, latents: torch.Tensor, vae: Any) -> torch.Tensor:
        """The latents the denoiser is trained on, from a VAE sample: shifted and scaled by the VAE
        config's factors (FLUX.2: patchified and normalised by the VAE's batch-norm statistics)."""
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return ((latents - shift) * vae.config.scaling_factor).float()

    @classmethod
    def denoiser_inputs(cls, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning,
                        micro: torch.Tensor | None, dtype: torch.dtype, guidance: float | None = None
                        ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """``(args, kwargs)`` of ``denoiser(*args, **kwargs)`` for noisy latents at ``timesteps``.

        ``micro``: (n, 6) original h, w, crop top, left, target h, w (``toolkit.data.transforms``);
        ``guidance``: the embedded guidance (``training_guidance``: None but for guidance-distilled models)."""
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
    def kohya_fused_rows(cls, original: str, denoiser_config: Mapping[str, Any]) -> tuple[int, ...] | None:
        """The output rows of each part of the fused ``original`` module (None: equal parts, SD3's qkv)."""
        return None

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
