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
    Flux.1           double- and single-stream transformer over packed 2x2 latent patches with
                     RoPE position ids; conditioning = T5's tokens plus CLIP's pooled output, and
                     the embedded guidance (dev); rectified flow with the image-size (dynamic) shift
    Flux.2 [klein]   double- and single-stream transformer over 2x2-patchified, batch-norm-normalised
                     latents with 4-axis RoPE ids; conditioning = a Qwen3 LLM's hidden states after
                     three layers (chat template), stacked per token; no embedded guidance; rectified
                     flow with the config's dynamic shift

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

The pieces: ``base.py`` (the interface), ``unet.py`` (SD, SDXL), ``sd3.py``, ``flux.py``, ``flux2.py``. Adding a
family means adding one such module and registering its piece in ``FAMILIES``. Flux.1's
``denoiser_inputs`` packs 2x2 latent patches and adds image/text position ids and the embedded
guidance, its ``prediction`` unpacks, and its noise process shifts σ by the image's sequence
length; Flux.2 [klein], the family with an LLM text encoder, is one whose ``encode_prompts`` runs the
pipeline's chat template and hidden-state selection and whose ``training_latents`` normalises the
patchified latents.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from toolkit.models.families.base import Conditioning, ModelFamily, call_default
from toolkit.models.families.flux import Flux
from toolkit.models.families.flux2 import Flux2Klein
from toolkit.models.families.sd3 import SD3
from toolkit.models.families.unet import SD, SDXL, UNetFamily

__all__ = ["FAMILIES", "SD", "SD3", "SDXL", "Flux", "Flux2Klein", "Conditioning", "ModelFamily", "UNetFamily",
           "UnsupportedFamily", "call_default", "family_named", "family_of", "family_of_pipeline", "supported"]

# Flux.2 before Flux before SD3: a diffusers Flux LoRA file also has SD3-like joint-block keys, a Flux.2 one
# Flux-like single blocks (names_adapter)
FAMILIES: tuple[type[ModelFamily], ...] = (Flux2Klein, Flux, SD3, SDXL, SD)


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
    near = [f.other_variants for f in FAMILIES if f.denoiser_class.__name__ == denoiser_class and f.other_variants]
    raise UnsupportedFamily(f"{what}: no supported model family has a {denoiser_class}{detail} denoiser"
                            f"{' (' + '; '.join(near) + ')' if near else ''}. Supported: {supported()}.")


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
