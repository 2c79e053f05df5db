"""What each frozen part of a latent-diffusion pipeline holds while it works, per phase, traced on
fake tensors from the component configs (``toolkit.models.memory``), never from loaded weights:

    vae_encode(n)      images → posterior parameters (the latent cache, prior images)
    vae_decode(n)      latents → images (sample grids, generation; diffusers' VAE slicing: n = 1)
    text_encode(n)     captions → the family's conditioning (the text cache, generation)
    denoise(n)         one sampling step: the UNet over n latents (2n with classifier-free guidance)
    train_step(n)      one LoRA step: forward, backward and the optimizer's update (its state counted)

Each is a ``Footprint`` (bytes beyond the resident weights, fixed + per item) or, for the
training step, the bytes at the configured batch. The conditioning goes through the family piece
(``encode_prompts``, ``denoiser_inputs``, ``prediction``), so a family's own tensors are what is traced.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL

from toolkit.models.families import ModelFamily
from toolkit.models.memory import (
    Footprint,
    MaxOf,
    Scaled,
    autocast,
    cached,
    checkpointing,
    fake_tensors,
    materialise,
    meta_copy,
    traced_peak,
    weight_bytes,
)

CacheDir = str | Path | None


@contextlib.contextmanager
def meta_init() -> Any:
    """Modules built on the meta device without running their initialisers (a skeleton's weights
    are never read: transformers' init alone took 0.3 s for a tiny CLIP)."""
    from accelerate import init_empty_weights

    try:
        from transformers.initialization import no_init_weights
    except ImportError:   # transformers 4
        from transformers.modeling_utils import no_init_weights
    with init_empty_weights(), no_init_weights():
        yield


class StandInTokenizer:
    """Token ids of the encoder's full context (as the pipelines pad to ``model_max_length``), no
    vocabulary needed: only the shapes reach the trace."""

    def __init__(self, length: int) -> None:
        self.model_max_length = length

    def __call__(self, captions: Sequence[str], **_: Any) -> Any:
        ids = torch.zeros(len(captions), self.model_max_length, dtype=torch.long)
        ids[:, -1] = 1   # an end token, where the pooled output is read
        return type("Tokens", (), {"input_ids": ids})()


def context_length(encoder: torch.nn.Module) -> int:
    """Tokens a caption takes in ``encoder``: CLIP's position table; T5 has relative positions and
    no table (its config's ``n_positions``, 512 for the T5 of SD3 and Flux, is what pipelines use at most)."""
    cfg = encoder.config
    return int(getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None) or 512)


def _config(module: torch.nn.Module) -> dict[str, Any]:
    cfg = module.config
    return dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)


def _linear(two: Callable[[int], int]) -> Footprint:
    return Footprint.from_two(two(1), two(2))


def _ints(got: Mapping[str, Any], *keys: str) -> list[int]:
    """Byte counts read back from the trace cache, checked (a cache file is outside input)."""
    out = [got.get(k) for k in keys]
    if not all(isinstance(v, int) and v >= 0 for v in out):
        raise ValueError(f"memory trace cache entry {dict(got)} lacks non-negative integers {keys}")
    return out


def vae_dtype_of(vae: AutoencoderKL, dtype: torch.dtype) -> torch.dtype:
    """float32 for a VAE whose config says it is not fp16-safe (``force_upcast``), as loading does."""
    return torch.float32 if dtype != torch.float32 and getattr(vae.config, "force_upcast", False) else dtype


def vae_encode(vae: AutoencoderKL, size: tuple[int, int], dtype: torch.dtype, cache_dir: CacheDir = None
               ) -> Footprint:
    """``vae.encode(pixels).latent_dist.parameters`` of n images of ``size`` (h, w), no gradients."""
    def run(n: int) -> int:
        m = meta_copy(vae, dtype)
        with fake_tensors():
            m = materialise(m)
            return traced_peak(lambda: m.encode(torch.zeros(n, m.config.in_channels, *size, dtype=dtype)
                                                ).latent_dist.parameters, m)

    spec = {"phase": "vae_encode", "config": _config(vae), "size": list(size), "dtype": str(dtype)}
    with torch.no_grad():
        got = cached(cache_dir, spec, lambda: {"peak_1": run(1), "peak_2": run(2)})
    return Footprint.from_two(*_ints(got, "peak_1", "peak_2"))


def vae_decode(vae: AutoencoderKL, latent: tuple[int, int], dtype: torch.dtype, cache_dir: CacheDir = None
               ) -> Footprint:
    """``vae.decode(latents)`` of n latents of ``latent`` (h, w), no gradients."""
    def run(n: int) -> int:
        m = meta_copy(vae, dtype)
        with fake_tensors():
            m = materialise(m)
            return traced_peak(lambda: m.decode(torch.zeros(n, m.config.latent_channels, *latent, dtype=dtype)
                                                ).sample, m)

    spec = {"phase": "vae_decode", "config": _config(vae), "latent": list(latent), "dtype": str(dtype)}
    with torch.no_grad():
        got = cached(cache_dir, spec, lambda: {"peak_1": run(1), "peak_2": run(2)})
    return Footprint.from_two(*_ints(got, "peak_1", "peak_2"))


def text_encode(family: type[ModelFamily], encoders: Sequence[torch.nn.Module], dtype: torch.dtype,
                cache_dir: CacheDir = None) -> tuple[Footprint, dict[str, list[int]]]:
    """The family's ``encode_prompts`` over n captions, no gradients; and the per-caption shape of
    each conditioning field (what the denoiser is given)."""
    shapes: dict[str, list[int]] = {}

    def run(n: int) -> int:
        encs = [meta_copy(e, dtype) for e in encoders]
        with fake_tensors():
            encs = [materialise(e) for e in encs]
            toks = [StandInTokenizer(context_length(e)) for e in encoders]

            def go() -> Any:
                out = family.encode_prompts(toks, encs, ["x"] * n, "cpu")
                shapes.update({k: list(v.shape[1:]) for k, v in out.items()})
                return out
            return traced_peak(go, *encs)

    spec = {"phase": "text_encode", "family": family.name, "configs": [_config(e) for e in encoders],
            "dtype": str(dtype)}
    with torch.no_grad():
        got = cached(cache_dir, spec, lambda: {"peak_1": run(1), "peak_2": run(2), "shapes": shapes})
    fields = got.get("shapes")
    if not isinstance(fields, dict) or not all(isinstance(v, list) for v in fields.values()):
        raise ValueError(f"memory trace cache entry {got} has no conditioning shapes")
    return Footprint.from_two(*_ints(got, "peak_1", "peak_2")), fields


def traced(family: type[ModelFamily]) -> bool:
    """Whether the tracer covers ``family``'s denoiser: the UNet families (sd, sdxl), whose phases
    were checked against measured peaks (bench/memory.py). Others (sd3's transformer) are not traced:
    their phases take the configured batch sizes, and the plan says so."""
    return family.denoiser == "unet"


def untraced(family: type[ModelFamily], what: str) -> str:
    return (f"{what}: memory.budget_gib is not applied to {family.name} models (their {family.denoiser} is not "
            "covered by the memory tracer, toolkit/models/footprints.py: sd and sdxl are); the configured "
            "batch_size is used")


def _cond(fields: Mapping[str, Sequence[int]], n: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: torch.zeros(n, *shape, dtype=dtype) for k, shape in fields.items()}


def denoise(family: type[ModelFamily], unet: torch.nn.Module, fields: Mapping[str, Sequence[int]],
            latent: tuple[int, int], dtype: torch.dtype, guidance: bool = True, mode: str = "cpu",
            amp: torch.dtype | None = None, cache_dir: CacheDir = None) -> Footprint:
    """One sampling (or validation) step of the UNet over n latents, no gradients; with
    classifier-free guidance the UNet sees 2n (conditioned and unconditioned), as the pipelines run it."""
    def run(n: int) -> int:
        rows, m = 2 * n if guidance else n, meta_copy(unet, dtype)
        with fake_tensors():
            m = materialise(m)

            def go() -> Any:
                x = torch.zeros(rows, m.config.in_channels, *latent, dtype=dtype)
                args, kw = family.denoiser_inputs(x, torch.zeros(rows, dtype=torch.long), _cond(fields, rows, dtype),
                                                  torch.zeros(rows, 6), dtype)
                with autocast(mode, amp):
                    return family.prediction(m(*args, **kw), x)
            return traced_peak(go, m)

    spec = {"phase": "denoise", "family": family.name, "config": _config(unet), "fields": dict(fields),
            "latent": list(latent), "dtype": str(dtype), "guidance": guidance, "mode": mode, "amp": str(amp),
            "attention": _processors(unet)}
    with torch.no_grad():
        got = cached(cache_dir, spec, lambda: {"peak_1": run(1), "peak_2": run(2)})
    return Footprint.from_two(*_ints(got, "peak_1", "peak_2"))


def _processors(unet: torch.nn.Module) -> list[str]:
    procs = getattr(unet, "attn_processors", {})
    return sorted({type(p).__name__ for p in procs.values()})


def train_step(family: type[ModelFamily], unet: torch.nn.Module, fields: Mapping[str, Sequence[int]],
               latent: tuple[int, int], batch: int, dtype: torch.dtype, optimizer: Callable[..., Any],
               adapt: Callable[[torch.nn.Module], None], adapter_key: str, mode: str = "cpu",
               amp: torch.dtype | None = None, latent_channels: int = 4, cache_dir: CacheDir = None
               ) -> dict[str, int]:
    """One LoRA step at ``batch`` on the UNet skeleton (weights in ``dtype``) as ``adapt`` sets it up
    for training (attention processor, adapter layers in float32, gradient checkpointing; applied
    on a copy, only when the trace is not cached: ``adapter_key`` says what it does). Latents are
    sampled from posterior parameters as from the cache (the naive path's encoders run before the
    UNet, their activations gone by then: the plan takes the larger of the two). Returns
    ``{"activations": peak of forward + backward, gradients included, "optimizer_state": bytes of
    the optimizer's state after a step, "adapter": the trained parameters' bytes}``; the step's peak
    is activations + state (the state persists from the second step on)."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    def run() -> dict[str, int]:
        m = meta_copy(unet, dtype)
        adapt(m)
        ckpt = checkpointing(mode, amp) if getattr(m, "is_gradient_checkpointing", False) else None
        with fake_tensors():
            m = materialise(m)
            m.train()
            if ckpt is not None:
                m.enable_gradient_checkpointing(ckpt)
            params = [p for p in m.parameters() if p.requires_grad]

            def step() -> None:
                with autocast(mode, amp):
                    post = torch.zeros(batch, 2 * latent_channels, *latent)
                    latents = DiagonalGaussianDistribution(post).sample()
                    noise = torch.randn_like(latents)
                    noisy = (latents + noise).to(dtype)
                    args, kw = family.denoiser_inputs(noisy, torch.zeros(batch, dtype=torch.long),
                                                      _cond(fields, batch, torch.float32), torch.zeros(batch, 6), dtype)
                    pred = family.prediction(m(*args, **kw), noisy)
                    loss = torch.nn.functional.mse_loss(pred.float(), noise)
                loss.backward()

            peak = traced_peak(step, m)
            opt = optimizer(params)
            opt.step()
            state = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
                        if isinstance(t, torch.Tensor))
        return {"activations": peak, "optimizer_state": state,
                "adapter": sum(p.numel() * p.element_size() for p in params)}

    spec = {"phase": "train_step", "family": family.name, "config": _config(unet), "fields": dict(fields),
            "latent": list(latent), "batch": batch, "dtype": str(dtype), "mode": mode, "amp": str(amp),
            "adapter": adapter_key, "optimizer": repr(optimizer)}
    got = cached(cache_dir, spec, run)
    act, state, adapter = _ints(got, "activations", "optimizer_state", "adapter")
    return {"activations": act, "optimizer_state": state, "adapter": adapter}


def vae_skeleton(name_or_path: str, revision: str | None = None, subfolder: str | None = "vae",
                 vae_class: type = AutoencoderKL) -> Any:
    """The VAE built from its config on the meta device, as the family's VAE class."""
    with meta_init():
        return vae_class.from_config(vae_class.load_config(name_or_path, subfolder=subfolder, revision=revision))


def skeleton_of(module: torch.nn.Module) -> torch.nn.Module:
    """A loaded module's class and config again on the meta device (no weights), in its dtype, so a
    phase that has the module in hand traces exactly what the plan traced from the configs."""
    with meta_init():
        if hasattr(type(module), "from_config") and not hasattr(module.config, "to_dict"):   # diffusers
            skel = type(module).from_config(module.config)
        else:                                                                                  # transformers
            skel = type(module)(module.config)
    dtype = next((p.dtype for p in module.parameters() if p.is_floating_point()), None)
    return skel.to(dtype) if dtype is not None else skel


@dataclass(frozen=True)
class Sum:
    """Tensors that are alive together (a step's activations and what earlier steps left)."""

    parts: tuple[Any, ...]

    def at(self, batch: int) -> int:
        return sum(p.at(batch) for p in self.parts)


def generation(family: type[ModelFamily], unet: torch.nn.Module, encoders: Sequence[torch.nn.Module],
               vae: AutoencoderKL, latent: tuple[int, int], dtype: torch.dtype, guidance: bool,
               mode: str = "cpu", cache_dir: CacheDir = None) -> MaxOf:
    """A pipeline call over n prompts: the text encoders (2n prompts with guidance: the negative
    ones too), then each denoising step, then the VAE decode one image at a time (slicing) beside
    the n decoded images (float32 and their uint8 copy)."""
    text, fields = text_encode(family, encoders, dtype, cache_dir)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    pixels = vae.config.out_channels * latent[0] * latent[1] * factor**2
    decoded = Footprint(0, pixels * (4 + 1))
    vdt = vae_dtype_of(vae, dtype)
    return MaxOf((Scaled(text, 2 if guidance else 1), denoise(family, unet, fields, latent, dtype, guidance, mode,
                                                             None, cache_dir),
                  Sum((Scaled(vae_decode(vae, latent, vdt, cache_dir), fixed_items=1), decoded))))


def image_features(load: Callable[[], torch.nn.Module], size: int, call: Callable[[torch.nn.Module, torch.Tensor], Any],
                   key: Mapping[str, Any], cache_dir: CacheDir = None) -> tuple[Footprint, int]:
    """A feature extractor over n images of ``size``², float32, no gradients, and its weights' bytes.
    ``load()`` gives its meta skeleton (or TorchScript loaded on meta), called only when the trace is
    not cached; ``call`` runs it as the metric does (e.g. the image tower of a whole CLIP model);
    ``key`` names the model in the trace cache."""
    def compute() -> dict[str, int]:
        model = load()
        # TorchScript (Inception) cannot be converted: it runs on its meta weights, with meta inputs
        scripted = isinstance(model, torch.jit.ScriptModule)

        def run(n: int) -> int:
            m = model if scripted else meta_copy(model)
            with fake_tensors():
                m = m if scripted else materialise(m)
                x = torch.zeros(n, 3, size, size, device="meta" if scripted else "cpu")
                return traced_peak(lambda: call(m, x), m)

        return {"peak_1": run(1), "peak_2": run(2), "weights": weight_bytes(model)}

    with torch.no_grad():
        got = cached(cache_dir, {"phase": "features", **key, "size": size}, compute)
    peak_1, peak_2, weights = _ints(got, "peak_1", "peak_2", "weights")
    return Footprint.from_two(peak_1, peak_2), weights
