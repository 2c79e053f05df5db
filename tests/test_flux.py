"""Flux.1 on the denoiser family piece, on a tiny FLUX.1-dev-architecture pipeline built here (double- and
single-stream blocks over packed 2x2 patches, RoPE ids, embedded guidance, CLIP + T5 with an offline
tokenizer, a 16-channel VAE with a shift factor, the dynamic-shift scheduler) read through the hub path:
the loss is the Flux formula written out, training runs through the real entry point and resumes bit for
bit, 2 DDP processes train on what 1 process trains, sampling equals the stock ``FluxPipeline`` with the
exported LoRA, the kohya/BFL (ComfyUI) file reads back to the trained updates and is read whole by
diffusers' own kohya-Flux converter, merge, inspect, evaluation and the text cache work, and what follows
the model is Flux's.

diffusers' Flux converters (LoRA and single file) assume FLUX.1's widths (3072, MLP 4x) for the single
blocks' fused linear1, so the converter is checked at FLUX.1's widths on the file's layout (its tensors
small: rank 1), and images through it (and BFL's single file) with a FLUX.1-width transformer of one
block of each kind in the tiny pipeline.

One training run is shared (``flux_run``); the others are as few as the checks need.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from safetensors.torch import load_file

from tests.conftest import compose_cfg, run_entry, tiny_overrides
from tests.helpers import (
    batch_keys,
    ddp_overrides,
    finished_run,
    kohya_read_back,
    loss_and_vae_sample,
    resumes_bit_identically,
    sample_images,
    two_ranks_train_what_one_trains,
)
from tests.test_fault_tolerance import ADAPTER
from toolkit.adapters.formats import KOHYA_FILE

STEPS = 4


def flux_overrides(model: str, data: Path, out: Path, *extra: str) -> list[str]:
    """The tiny run with Flux's own preset (module=lora_flux), smaller, with α ≠ r so the exported
    scales are checked."""
    base = [a for a in tiny_overrides(model, data, out) if not a.startswith("module=")]
    return base + ["module=lora_flux", "module.lora.r=4", "module.lora.alpha=8", "module.optimizer.lr=1e-3",
                   "module.lr_scheduler.num_warmup_steps=0", "module.speed.gradient_checkpointing=false",
                   "trainer.deterministic=true", f"trainer.max_steps={STEPS}", *extra]


@pytest.fixture(scope="module")
def flux_run(tiny_flux, imagefolder_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("flux_run")
    return finished_run(flux_overrides(tiny_flux, imagefolder_data, out, *batch_keys(out)), out)



def stock_images(model: str, lora: Path | None, n: int = 2, steps: int = 3, transformer=None,
                 size: int = 16) -> list[np.ndarray]:
    """The stock diffusers pipeline, as a user runs it (Flux's sampler; the run's steps)."""
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(model, **({"transformer": transformer} if transformer else {}))
    if lora is not None:
        pipe.load_lora_weights(str(lora.parent), weight_name=lora.name)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(["a red circle"] * n, generator=[torch.Generator("cpu").manual_seed(s) for s in range(n)],
               num_inference_steps=steps, guidance_scale=3.5, height=size, width=size, max_sequence_length=512)
    return [np.asarray(im).astype(int) for im in out.images]


# ------------------------------------------------------------------------------------------ the loss
def test_the_module_loss_is_the_flux_formula_written_out(tiny_flux, imagefolder_data, tmp_path):
    """x₀ = (z − shift)·scale; σ = e^μ/(e^μ + 1/u − 1) at u = (t+1)/N with μ on the line through (256, 0.5)
    and (4096, 1.15) at the packed length; x_t = (1−σ)x₀ + σε; the transformer given 2x2 patches, their
    (0, row, col) ids, zero text ids, σ, the guidance 3.5, T5's 512 tokens and CLIP's pooled output;
    target ε − x₀ after unpacking."""
    cfg = compose_cfg(flux_overrides(tiny_flux, imagefolder_data, tmp_path, "data.val_fraction=0"), tmp_path)
    got, module, batch, z = loss_and_vae_sample(cfg)
    vae, T = module.vae, module.noise_scheduler.config.num_train_timesteps
    with torch.no_grad():
        x0 = (z - vae.config.shift_factor) * vae.config.scaling_factor
        ids = module.tokenizer(batch["captions"], padding="max_length", max_length=77, truncation=True,
                               return_tensors="pt").input_ids
        pooled = module.text_encoder(ids).pooler_output
        ids = module.tokenizer_2(batch["captions"], padding="max_length", max_length=512, truncation=True,
                                 return_tensors="pt").input_ids
        t5 = module.text_encoder_2(ids)[0]
    eps = torch.randn(x0.shape)
    t = (torch.sigmoid(torch.normal(0.0, 1.0, size=(x0.shape[0],))).clamp(0, 1 - 1e-7) * T).long()
    n, c, h, w = x0.shape
    seq = (h // 2) * (w // 2)
    mu = 0.5 + (1.15 - 0.5) / (4096 - 256) * (seq - 256)
    u = (t + 1).double() / T
    sigma = (math.exp(mu) / (math.exp(mu) + (1 / u - 1))).float().view(-1, 1, 1, 1)
    xt = (1 - sigma) * x0 + sigma * eps
    packed = xt.reshape(n, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(n, seq, 4 * c)
    rows, cols = torch.meshgrid(torch.arange(h // 2), torch.arange(w // 2), indexing="ij")
    img_ids = torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(seq, 3).float()
    out = module.transformer(hidden_states=packed, timestep=sigma.flatten(), guidance=torch.full((n,), 3.5),
                             pooled_projections=pooled, encoder_hidden_states=t5, txt_ids=torch.zeros(512, 3),
                             img_ids=img_ids).sample
    pred = out.reshape(n, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(n, c, h, w)
    want = ((pred.float() - (eps - x0)) ** 2).flatten(1).mean(1).mean()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_the_dynamic_shift_is_the_one_the_pipeline_samples_with():
    """At 1024 px (4096 packed tokens) and 512 px, training's σ at the sampler's unshifted σ equals the
    stock scheduler's σ after ``set_timesteps(mu=...)`` as ``FluxPipeline`` calls it."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    from toolkit.models.families import Flux

    sched = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                            base_image_seq_len=256, max_image_seq_len=4096)
    process = Flux.noise_process(sched)
    for side in (128, 64):   # latent side: 1024 and 512 px
        latents = torch.zeros(1, 16, side, side)
        at = process.for_latents(latents)
        steps = 10
        sampler = FlowMatchEulerDiscreteScheduler.from_config(sched.config)
        sampler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps),
                              mu=calculate_shift((side // 2) ** 2, 256, 4096, 0.5, 1.15))
        t = torch.tensor([round(T * s) - 1 for s in np.linspace(1.0, 1 / steps, steps) for T in (1000,)])
        torch.testing.assert_close(at.sigmas(t), sampler.sigmas[:-1].float(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(at.model_timesteps(t), sampler.timesteps.float(), rtol=1e-5, atol=1e-3)
    assert process.for_latents(torch.zeros(1, 16, 128, 128)).sigmas(torch.tensor([499])) > 0.5 + 0.2   # shifted up


# ------------------------------------------------------------------------------------------ training
def test_flux_trains_its_lora_and_checkpoints_under_the_pipeline_names(flux_run):
    ck = torch.load(flux_run / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")
    keys = list(ck["state_dict"])
    assert keys and all(k.startswith("transformer.") and ".lora_" in k for k in keys)   # frozen base not saved
    assert any(".attn.add_q_proj." in k for k in keys) and any(".ff_context.net.0.proj." in k for k in keys)
    assert any(k.startswith("transformer.single_transformer_blocks.1.attn.to_q.") for k in keys)
    log = (flux_run / "entry.log").read_text()
    assert "chosen generation.scheduler=FlowMatchEulerDiscreteScheduler: the FLUX family's" in log
    assert "chosen generation.guidance_scale=3.5" in log
    assert "text cache (prompt_embeds, bfloat16)" in log and "text cache (pooled, float16)" in log
    meta = json.loads(load_file_metadata(flux_run / ADAPTER)["toolkit_schedule"])
    assert meta["prediction_type"] == "flow_matching"
    assert load_file_metadata(flux_run / ADAPTER)["toolkit_training_guidance"] == "3.5"
    assert (flux_run / "adapter" / KOHYA_FILE).is_file()


def load_file_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def test_flux_resume_is_bit_identical(flux_run, tmp_path):
    resumes_bit_identically(flux_run, tmp_path / "resumed", STEPS, ADAPTER)


@pytest.mark.slow
def test_flux_two_ddp_processes_train_what_one_process_trains(flux_run, tiny_flux, imagefolder_data, tmp_path):
    """Both ranks hold one LoRA, and together they train on the images one process trains on, step by step."""
    out = tmp_path / "ddp"
    args = flux_overrides(tiny_flux, imagefolder_data, out, "callbacks.sample_grid.every_n_steps=0",
                          *ddp_overrides(out))
    two_ranks_train_what_one_trains(args, out, flux_run)


# ------------------------------------------------------------------------------------------ adapters
def test_sampling_equals_the_stock_pipeline_with_the_exported_lora(flux_run, tiny_flux, tmp_path):
    out = tmp_path / "sample"
    res = run_entry(["task=sample", f"model.name_or_path={tiny_flux}", f"adapter={flux_run}", "sample.steps=3",
                     "sample.seeds=[0,1]", "sample.prompts=[a red circle]", "sample.height=16", "sample.width=16",
                     f"hydra.run.dir={out}"])
    assert res.returncode == 0, res.stderr[-3000:]
    ours = sample_images(out)
    row = json.loads((out / "samples" / "00000.json").read_text())
    assert row["scheduler"] == "FlowMatchEulerDiscreteScheduler" and row["guidance_scale"] == 3.5
    stock = stock_images(tiny_flux, flux_run / ADAPTER)
    base = stock_images(tiny_flux, None)
    assert all(np.abs(a - b).max() <= 1 for a, b in zip(ours, stock))       # fused vs peft layers: ≤ 1 level
    assert any(np.abs(a - b).max() > 1 for a, b in zip(stock, base))       # and the LoRA does something


def test_the_toolkit_reads_its_kohya_file_back_to_the_trained_updates(flux_run, tiny_flux):
    from toolkit.models.families import Flux

    kohya_read_back(flux_run, tiny_flux, Flux, ADAPTER)
    names = {k.split(".")[0] for k in load_file(flux_run / "adapter" / KOHYA_FILE)}
    assert {"lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_double_blocks_0_txt_attn_qkv",
            "lora_unet_single_blocks_1_linear1", "lora_unet_double_blocks_0_img_attn_proj"} <= names



def flux1_layers(rank: int = 1):
    """A LoRA on every module the lora_flux preset adapts (and the single blocks' MLP input), at FLUX.1's
    widths (its config on the meta device; two blocks of each kind, the last ones' indices), with random
    factors and α ≠ r."""
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel

    from toolkit.adapters.layers import lora

    with init_empty_weights():
        model = FluxTransformer2DModel(guidance_embeds=True, num_layers=2, num_single_layers=2)   # FLUX.1's widths
    targets = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
               "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
               "ff_context.net.2", "proj_mlp")
    g = torch.Generator().manual_seed(0)
    layers = {}
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and name.endswith(targets):
            out, inp = mod.weight.shape
            layers[name] = lora(torch.randn(rank, inp, generator=g), torch.randn(out, rank, generator=g), 2.0 * rank)
            layers[name].shape = (out, inp)
    return model.config, layers


def test_kohya_file_read_whole_by_diffusers_kohya_flux_converter():
    """The kohya/BFL file as written for FLUX.1's widths, read by diffusers' own
    ``_convert_kohya_flux_lora_to_diffusers`` (what ``FluxPipeline.load_lora_weights`` calls on it): every
    tensor consumed, and every converted layer's update equal to the one written (1e-6)."""
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    from toolkit.adapters.formats import kohya_state_dict
    from toolkit.models.families import Flux

    config, layers = flux1_layers()
    sd = kohya_state_dict({"transformer": layers}, Flux, config)
    assert any(k.startswith("lora_unet_single_blocks_1_linear1") for k in sd)
    warned = []
    handler = logging.Handler()
    handler.emit = lambda record: warned.append(record.getMessage())
    log = logging.getLogger("diffusers.loaders.lora_conversion_utils")
    log.addHandler(handler)
    try:
        converted = _convert_kohya_flux_lora_to_diffusers(dict(sd))
    finally:
        log.removeHandler(handler)
    assert not [w for w in warned if "Unsupported keys" in w]   # what it leaves unread it names: nothing
    got = {k[: -len(".lora_A.weight")].removeprefix("transformer.") for k in converted if k.endswith(".lora_A.weight")}
    assert got == set(layers)
    worst = 0.0
    for name, w in layers.items():
        a, b = converted[f"transformer.{name}.lora_A.weight"], converted[f"transformer.{name}.lora_B.weight"]
        worst = max(worst, low_rank_rel_err((b, a), (w.factors["up"] * w.scale, w.factors["down"])))
    assert worst <= 1e-6


def low_rank_rel_err(got: tuple[torch.Tensor, torch.Tensor], want: tuple[torch.Tensor, torch.Tensor]) -> float:
    """‖U₁D₁ − U₂D₂‖ / ‖U₂D₂‖ from the factors (in float64, without forming FLUX.1-size matrices):
    ⟨UD, U'D'⟩ = Σ (UᵀU') ∘ (DD'ᵀ)."""
    def dot(x, y):
        return ((x[0].double().T @ y[0].double()) * (x[1].double() @ y[1].double().T)).sum().item()

    return math.sqrt(max(dot(got, got) - 2 * dot(got, want) + dot(want, want), 0.0) / dot(want, want))


def test_merge_and_inspect_flux(flux_run, tiny_flux, tmp_path):
    """merge: the folder samples as the base with the LoRA; the single file is the merged transformer in
    BFL's layout. inspect: both files name the Flux family and the same layers."""
    from toolkit.models.single_file_flux import transformer_to_bfl
    from toolkit.tasks import inspect, merge

    out = tmp_path / "merge"
    got = merge.run(compose_cfg(["task=merge", f"model.name_or_path={tiny_flux}", f"adapter={flux_run}",
                                 "merge.dtype=float32", f"hydra.run.dir={out}"], out))
    assert got["layers_merged"] > 0 and got["max_rel_err"] <= 1e-6
    from diffusers import FluxTransformer2DModel

    merged_tr = FluxTransformer2DModel.from_pretrained(out / "merged", subfolder="transformer")
    single = load_file(out / "merged.safetensors")
    want = transformer_to_bfl(merged_tr.state_dict(), merged_tr.config)
    assert single.keys() == want.keys() and all(torch.equal(single[k], want[k]) for k in want)
    assert "double_blocks.0.img_attn.qkv.weight" in single and "single_blocks.1.linear1.weight" in single
    merged = stock_images(str(out / "merged"), None)
    with_lora = stock_images(tiny_flux, flux_run / ADAPTER)
    assert all(np.abs(a - b).max() <= 1 for a, b in zip(merged, with_lora))

    got = inspect.run(compose_cfg(["task=inspect", f"model.name_or_path={tiny_flux}",
                                   f"adapter=[{flux_run / ADAPTER},{flux_run / 'adapter' / KOHYA_FILE}]",
                                   f"hydra.run.dir={tmp_path / 'inspect'}"], tmp_path / "inspect"))
    infos = json.loads(Path(got["details"]).read_text())
    assert [i["family_named_by_file"] for i in infos] == ["flux", "flux"]
    assert infos[0]["layers_per_component"] == infos[1]["layers_per_component"]
    assert all(i["base_model_match"]["unmatched"] == 0 for i in infos)


def test_bfl_transformer_layout_is_the_inverse_of_diffusers_reader():
    """Every tensor of a FLUX.1-width transformer (one block of each kind), written in BFL's layout and read
    by diffusers' ``convert_flux_transformer_checkpoint_to_diffusers``, comes back equal under its name."""
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    from toolkit.models.single_file_flux import transformer_to_bfl

    with init_empty_weights():
        model = FluxTransformer2DModel(num_layers=1, num_single_layers=1, guidance_embeds=True)
    g = torch.Generator().manual_seed(0)
    # distinct small values per tensor, FLUX.1's shapes, without building the 12 GB model
    sd = {k: torch.randn(v.shape, generator=g, dtype=torch.bfloat16) for k, v in model.state_dict().items()}
    back = convert_flux_transformer_checkpoint_to_diffusers(transformer_to_bfl(sd, model.config))
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)


# ------------------------------------------------------------------------------------------ evaluation
def test_evaluate_flux(flux_run, tiny_flux, tiny_clip, imagefolder_data, tmp_path):
    from toolkit.results import read_rows
    from toolkit.tasks import eval as eval_task

    table = tmp_path / "results.jsonl"
    out = tmp_path / "eval"
    m = eval_task.run(compose_cfg(["task=eval", f"model.name_or_path={tiny_flux}", f"adapter={flux_run}",
                                   f"metrics.clip_model={tiny_clip}", f"eval.dataset={imagefolder_data}",
                                   "eval.num_images=4", "eval.steps=2", "eval.batch_size=4",
                                   "metrics.interval_groups=4", "eval.num_ref=null", "eval.height=16", "eval.width=16",
                                   "fabric.accelerator=cpu",
                                   "logger=none", f"eval.results_file={table}", f"hydra.run.dir={out}"], out))
    assert m["n_fake"] == 4 and m["fid"] > 0 and m["fid_ci_low"] <= m["fid_ci_high"]
    (row,) = read_rows(table)
    assert row["settings"]["family"] == "flux"
    assert row["settings"]["scheduler"] == "FlowMatchEulerDiscreteScheduler"


# ------------------------------------------------------------------------------------------ the model's settings
def test_settings_follow_a_flux_model_and_schnell_refuses_a_guidance(tiny_flux, imagefolder_data, tmp_path):
    from tests.test_first_run import chosen
    from tests.tiny import build_tiny_flux_pipeline

    got = chosen(["task=train", f"model.name_or_path={tiny_flux}"])
    assert got["module"] == "lora_flux" and got["data.resolution"] == "256"   # the pipeline's 128 latents x VAE 2
    assert (got["generation.scheduler"], got["generation.steps"], got["generation.guidance_scale"]) == \
        ("FlowMatchEulerDiscreteScheduler", "28", "3.5")                        # FluxPipeline's defaults
    schnell = build_tiny_flux_pipeline(tmp_path / "schnell", guidance_embeds=False, num_single_layers=1)
    got = chosen(["task=train", f"model.name_or_path={schnell}"])   # timestep-distilled: its own recipe
    assert (got["generation.steps"], got["generation.guidance_scale"]) == ("4", "0.0")
    from toolkit.model_defaults import ModelDefaultsError

    with pytest.raises(ModelDefaultsError, match=r"generation.guidance_scale=3.5: FLUX.1 \[schnell\] embeds no"):
        chosen(["task=sample", f"model.name_or_path={schnell}", "generation.guidance_scale=3.5"])   # same images
    cfg = compose_cfg(flux_overrides(str(schnell), imagefolder_data, tmp_path, "+model.guidance=2.0"), tmp_path)
    with pytest.raises(InstantiationException, match="model.guidance=2.0: a flux transformer embeds no guidance"):
        instantiate(cfg.module)
    cfg = compose_cfg(flux_overrides(str(schnell), imagefolder_data, tmp_path), tmp_path)
    module = instantiate(cfg.module)
    assert module.guidance is None and module.process.for_latents(torch.zeros(1, 16, 8, 8)) is module.process


# ------------------------------------------------------------------------------------------ text cache
def test_the_flux_text_cache_holds_the_encoders_output(tiny_flux, imagefolder_data, tmp_path):
    """T5's field as bfloat16 bits (float16 cannot hold T5's range), its length in the key; float32
    storage is the encoders' output exactly."""
    from toolkit.callbacks.encoded_cache import EncodedCache

    cfg = compose_cfg(flux_overrides(tiny_flux, imagefolder_data, tmp_path), tmp_path)
    dm = instantiate(cfg.data)
    dm.setup("fit")
    module = instantiate(cfg.module)
    captions = sorted(set(dm.train_set.captions()))[:3] + [""]
    with torch.no_grad():
        direct = module.encode_text(captions, cached=False)
    assert direct["prompt_embeds"].shape[1:] == (512, 64) and direct["pooled"].shape[1:] == (32,)
    for dtype in ("float16", "float32"):
        cache = EncodedCache(str(tmp_path / "cache"), latents=False, dtype=dtype)
        cache.encode(module, dm, {"rank": 0, "world_size": 1, "barrier": lambda: None})
        with torch.no_grad():
            got = module.encode_text(captions)
        if dtype == "float32":
            assert all(torch.equal(got[f], direct[f]) for f in direct)
        else:
            assert torch.equal(got["prompt_embeds"], direct["prompt_embeds"].to(torch.bfloat16).float())
            assert torch.equal(got["pooled"], direct["pooled"].half().float())


# ------------------------------------------------------------------------------------------ at FLUX.1's widths
def test_at_flux1_widths_the_kohya_file_samples_as_the_diffusers_file_and_a_bfl_file_loads(tiny_flux, tmp_path):
    """A FLUX.1-width transformer (3072 wide, one block of each kind; the tiny text encoders' widths) in the
    tiny pipeline: (1) the kohya/BFL file loaded by the stock ``FluxPipeline.load_lora_weights`` (diffusers'
    converter) gives the images the diffusers file gives (≤ 1 level), and the LoRA changes them; (2) the
    transformer written as BFL's single file loads through the toolkit's single-file path (diffusers'
    ``from_single_file`` with ``model.config``, checked tensor by tensor) with CLIP, T5 and the VAE from the
    config folder."""
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from safetensors.torch import save_file

    from toolkit.adapters.formats import save_diffusers, save_kohya
    from toolkit.adapters.layers import lora
    from toolkit.models.families import Flux
    from toolkit.models.pretrained import load_components
    from toolkit.models.single_file_flux import transformer_to_bfl

    torch.manual_seed(0)
    big = FluxTransformer2DModel(num_layers=1, num_single_layers=1, joint_attention_dim=64, pooled_projection_dim=32,
                                 guidance_embeds=True).to(torch.bfloat16)
    g = torch.Generator().manual_seed(1)

    layers = {}
    for name, mod in big.named_modules():
        if isinstance(mod, torch.nn.Linear) and name.endswith(("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                                                               "attn.add_q_proj", "attn.to_add_out", "ff.net.2",
                                                               "proj_mlp")):
            out, inp = mod.weight.shape
            layers[name] = lora(torch.randn(2, inp, generator=g) / inp ** 0.5,
                                torch.randn(out, 2, generator=g) / 2, 4.0, shape=(out, inp))
    diff = save_diffusers({"transformer": layers}, tmp_path / "diffusers", Flux)
    kohya = save_kohya({"transformer": layers}, tmp_path / "kohya.safetensors", Flux, big.config)

    single = tmp_path / "flux1-dev-like.safetensors"   # before any LoRA is loaded into it
    save_file({k: v.contiguous() for k, v in transformer_to_bfl(big.state_dict(), big.config).items()}, str(single))
    pipe = FluxPipeline.from_pretrained(tiny_flux, transformer=big, torch_dtype=torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)

    def sample(pipe) -> list[np.ndarray]:
        out = pipe(["a red circle"], generator=[torch.Generator("cpu").manual_seed(0)], num_inference_steps=2,
                   guidance_scale=3.5, height=16, width=16, max_sequence_length=8)
        return [np.asarray(im).astype(int) for im in out.images]

    base = sample(pipe)
    shots = {}
    for name, path in (("diffusers", diff), ("kohya", kohya)):
        pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=name)
        shots[name] = sample(pipe)
        pipe.unload_lora_weights()
    assert all(np.abs(a - b).max() <= 1 for a, b in zip(shots["diffusers"], shots["kohya"]))
    assert any(np.abs(a - b).max() > 1 for a, b in zip(shots["diffusers"], base))
    del pipe

    folder = tmp_path / "flux1-config"   # the tiny pipeline's configs with FLUX.1's transformer config
    shutil.copytree(tiny_flux, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    for comp in ("text_encoder", "text_encoder_2", "vae"):
        shutil.copytree(Path(tiny_flux) / comp, folder / comp, dirs_exist_ok=True)
    big.save_config(folder / "transformer")
    c = load_components(str(single), config=str(folder), dtype="bfloat16")
    sa, sb = big.state_dict(), c.denoiser.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert c.family is Flux and set(c.text_encoders) == {"text_encoder", "text_encoder_2"}
