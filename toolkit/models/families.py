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

from collections.abc import Mapping
from typing import Any, ClassVar

from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline


class ModelFamily:
    """The family interface. Subclasses set the class attributes and override the methods."""

    name: ClassVar[str]
    pipeline_class: ClassVar[type]
    text_encoders: ClassVar[tuple[str, ...]]       # pipeline component names
    tokenizers: ClassVar[tuple[str, ...]]
    kohya_prefixes: ClassVar[Mapping[str, str]]    # component -> kohya/A1111 key prefix
    kohya_aliases: ClassVar[Mapping[str, str]] = {}  # other prefix spellings read as the canonical one
    base_model_version: ClassVar[str]              # kohya ss_base_model_version

    @classmethod
    def matches(cls, unet_config: Mapping[str, Any]) -> bool:
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

    @classmethod
    def matches(cls, unet_config: Mapping[str, Any]) -> bool:
        return unet_config.get("addition_embed_type") is None


class SDXL(ModelFamily):
    name = "sdxl"
    pipeline_class = StableDiffusionXLPipeline
    text_encoders = ("text_encoder", "text_encoder_2")
    tokenizers = ("tokenizer", "tokenizer_2")
    kohya_prefixes = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
    base_model_version = "sdxl_base_v1-0"

    @classmethod
    def matches(cls, unet_config: Mapping[str, Any]) -> bool:
        return unet_config.get("addition_embed_type") == "text_time"

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
