"""SD3 / SD3.5 on the denoiser family piece, on a tiny SD3.5-architecture pipeline built here (MMDiT with
a dual-attention block and qk-norms, two CLIPs, T5 with an offline tokenizer, a 16-channel VAE with a
shift factor) and read through the hub path: the loss is the flow formula written out, training runs
through the real entry point and resumes bit for bit, 2 DDP processes train on what 1 process trains,
sampling equals the stock ``StableDiffusion3Pipeline`` with the exported LoRA, the kohya/ComfyUI file
is read whole by diffusers' own single-file converter, merge writes a single file ``from_single_file``
loads, evaluation and pairing work unchanged, and what follows the model is SD3's.

One training run is shared (``sd3_run``); the others are as few as the checks need.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
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


def sd3_overrides(model: str, data: Path, out: Path, *extra: str) -> list[str]:
    """The tiny run with SD3's own preset (module=lora_sd3: attention + MLP, logit-normal timesteps),
    smaller, with α ≠ r so the exported scales are checked."""
    base = [a for a in tiny_overrides(model, data, out) if not a.startswith("module=")]
    return base + ["module=lora_sd3", "module.lora.r=4", "module.lora.alpha=8", "module.optimizer.lr=1e-3",
                   "module.lr_scheduler.num_warmup_steps=0", "module.speed.gradient_checkpointing=false",
                   "trainer.deterministic=true", f"trainer.max_steps={STEPS}", *extra]


@pytest.fixture(scope="module")
def sd3_run(tiny_sd3, imagefolder_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sd3_run")
    return finished_run(sd3_overrides(tiny_sd3, imagefolder_data, out, *batch_keys(out)), out)



def stock_images(model: str, lora: Path | None, n: int = 2, steps: int = 3, transformer=None) -> list[np.ndarray]:
    """The stock diffusers pipeline, as a user runs it (SD3's sampler, 28-step defaults replaced by the run's)."""
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(model, **({"transformer": transformer} if transformer else {}))
    if lora is not None:
        pipe.load_lora_weights(str(lora.parent), weight_name=lora.name)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(["a red circle"] * n, generator=[torch.Generator("cpu").manual_seed(s) for s in range(n)],
               num_inference_steps=steps, guidance_scale=7.0, height=16, width=16, max_sequence_length=256)
    return [np.asarray(im).astype(int) for im in out.images]


# ------------------------------------------------------------------------------------------ the loss
def test_the_module_loss_is_the_flow_formula_written_out(tiny_sd3, imagefolder_data, tmp_path):
    """x₀ = (z − shift)·scale, x_t = (1−σ)x₀ + σε at σ = s·u/(1+(s−1)u), target ε − x₀, the transformer
    given σ·N and the diffusers SD3 example's prompt encoding (CLIP penultimate states padded to T5's width,
    then T5's; both pooled outputs)."""
    cfg = compose_cfg(sd3_overrides(tiny_sd3, imagefolder_data, tmp_path, "data.val_fraction=0"), tmp_path)
    got, module, batch, z = loss_and_vae_sample(cfg)
    vae, T = module.vae, module.noise_scheduler.config.num_train_timesteps
    with torch.no_grad():
        x0 = (z - vae.config.shift_factor) * vae.config.scaling_factor
        hidden, pooled = [], []
        for tok, enc in ((module.tokenizer, module.text_encoder), (module.tokenizer_2, module.text_encoder_2)):
            ids = tok(batch["captions"], padding="max_length", max_length=77, truncation=True,
                      return_tensors="pt").input_ids
            o = enc(ids, output_hidden_states=True)
            hidden.append(o.hidden_states[-2])
            pooled.append(o[0])
        ids = module.tokenizer_3(batch["captions"], padding="max_length", max_length=256, truncation=True,
                                 return_tensors="pt").input_ids
        t5 = module.text_encoder_3(ids)[0]
        clip = torch.nn.functional.pad(torch.cat(hidden, -1), (0, t5.shape[-1] - sum(h.shape[-1] for h in hidden)))
        cond, pooled = torch.cat([clip, t5], dim=-2), torch.cat(pooled, -1)
    eps = torch.randn(x0.shape)
    t = (torch.sigmoid(torch.normal(0.0, 1.0, size=(x0.shape[0],))).clamp(0, 1 - 1e-7) * T).long()
    u = (t + 1).double() / T
    sigma = (3.0 * u / (1 + 2.0 * u)).float().view(-1, 1, 1, 1)   # the scheduler config's shift 3
    xt = (1 - sigma) * x0 + sigma * eps
    pred = module.transformer(hidden_states=xt, timestep=sigma.flatten() * T, encoder_hidden_states=cond,
                              pooled_projections=pooled).sample
    want = ((pred.float() - (eps - x0)) ** 2).flatten(1).mean(1).mean()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------------------ training
def test_sd3_trains_its_lora_and_checkpoints_under_the_pipeline_names(sd3_run):
    ck = torch.load(sd3_run / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")
    keys = list(ck["state_dict"])
    assert keys and all(k.startswith("transformer.") and ".lora_" in k for k in keys)   # frozen base not saved
    assert any(".attn.add_q_proj." in k for k in keys) and any(".ff_context.net.0.proj." in k for k in keys)
    assert any(".attn2.to_q." in k for k in keys)   # SD3.5's second attention: the preset's to_q reaches it
    assert (sd3_run / ADAPTER).is_file() and (sd3_run / "adapter" / KOHYA_FILE).is_file()
    log = (sd3_run / "entry.log").read_text()
    assert "chosen generation.scheduler=FlowMatchEulerDiscreteScheduler: the SD3 family's" in log
    assert "text cache (prompt_embeds, bfloat16)" in log and "text cache (pooled, float16)" in log
    meta = json.loads(load_file_metadata(sd3_run / ADAPTER)["toolkit_schedule"])
    assert meta == {"prediction_type": "flow_matching", "shift": 3.0, "rescale_betas_zero_snr": False,
                    "timestep_spacing": None}


def load_file_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def test_sd3_resume_is_bit_identical(sd3_run, tiny_sd3, imagefolder_data, tmp_path):
    resumes_bit_identically(sd3_run, tmp_path / "resumed", STEPS, ADAPTER)


def test_sd3_two_ddp_processes_train_what_one_process_trains(sd3_run, tiny_sd3, imagefolder_data, tmp_path):
    """Both ranks hold one LoRA, and together they train on the images one process trains on, step by step."""
    out = tmp_path / "ddp"
    args = sd3_overrides(tiny_sd3, imagefolder_data, out, "callbacks.sample_grid.every_n_steps=0", *ddp_overrides(out))
    two_ranks_train_what_one_trains(args, out, sd3_run)


# ------------------------------------------------------------------------------------------ adapters
def test_sampling_equals_the_stock_pipeline_with_the_exported_lora(sd3_run, tiny_sd3, tmp_path):
    out = tmp_path / "sample"
    res = run_entry(["task=sample", f"model.name_or_path={tiny_sd3}", f"adapter={sd3_run}", "sample.steps=3",
                     "sample.seeds=[0,1]", "sample.prompts=[a red circle]", "sample.height=16", "sample.width=16",
                     f"hydra.run.dir={out}"])
    assert res.returncode == 0, res.stderr[-3000:]
    ours = sample_images(out)
    row = json.loads((out / "samples" / "00000.json").read_text())
    assert row["scheduler"] == "FlowMatchEulerDiscreteScheduler" and row["guidance_scale"] == 7.0
    stock = stock_images(tiny_sd3, sd3_run / ADAPTER)
    base = stock_images(tiny_sd3, None)
    assert all(np.abs(a - b).max() <= 1 for a, b in zip(ours, stock))       # fused vs peft layers: ≤ 1 level
    assert any(np.abs(a - b).max() > 1 for a, b in zip(stock, base))       # and the LoRA does something


def test_kohya_file_read_whole_by_diffusers_single_file_converter(sd3_run, tiny_sd3):
    """ComfyUI's reading of a kohya SD3 LoRA: each ``lora_unet_<original module>`` key is the original
    (MMDiT) weight of that name, which takes s·U·D. Applied to the base in the original layout and read by
    diffusers' own ``convert_sd3_transformer_checkpoint_to_diffusers``, it must give the transformer the
    diffusers-format file gives, images included: every file tensor used, every converted key loaded."""
    from diffusers import SD3Transformer2DModel
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    from toolkit.models.single_file_sd3 import PREFIX, transformer_to_mmdit

    base = SD3Transformer2DModel.from_pretrained(tiny_sd3, subfolder="transformer")
    original = {k[len(PREFIX):]: v.clone() for k, v in transformer_to_mmdit(base.state_dict(), base.config).items()}
    by_name = {"lora_unet_" + k[: -len(".weight")].replace(".", "_"): k for k in original if k.endswith(".weight")}
    sd = load_file(sd3_run / "adapter" / KOHYA_FILE)
    layers = {k.split(".")[0] for k in sd}
    used = set()
    for name in layers:
        down, up, alpha = sd[f"{name}.lora_down.weight"], sd[f"{name}.lora_up.weight"], sd[f"{name}.alpha"]
        used |= {f"{name}.lora_down.weight", f"{name}.lora_up.weight", f"{name}.alpha"}
        original[by_name[name]] += float(alpha) / down.shape[0] * (up @ down)
    assert used == set(sd) and len(layers) == len({by_name[n] for n in layers})   # one original weight each
    converted = convert_sd3_transformer_checkpoint_to_diffusers(dict(original))
    merged = SD3Transformer2DModel.from_config(base.config)
    missing, unexpected = merged.load_state_dict(converted, strict=False)
    assert not missing and not unexpected
    with_file = stock_images(tiny_sd3, sd3_run / ADAPTER)
    read_whole = stock_images(tiny_sd3, None, transformer=merged)
    assert all(np.abs(a - b).max() <= 1 for a, b in zip(with_file, read_whole))
    trained = {k.rsplit(".lora_A", 1)[0] for k in load_file(sd3_run / ADAPTER) if ".lora_A" in k}
    assert len(layers) == len(trained) - 2 * sum("_qkv" in n for n in layers)   # q, k, v -> one qkv layer


def test_the_toolkit_reads_its_kohya_file_back_to_the_trained_updates(sd3_run, tiny_sd3):
    from toolkit.models.families import SD3

    kohya_read_back(sd3_run, tiny_sd3, SD3, ADAPTER)



def test_merge_writes_a_single_file_that_from_single_file_loads(sd3_run, tiny_sd3, tmp_path):
    from diffusers import StableDiffusion3Pipeline

    from toolkit.tasks import merge

    out = tmp_path / "merge"
    got = merge.run(compose_cfg(["task=merge", f"model.name_or_path={tiny_sd3}", f"adapter={sd3_run}",
                                 "merge.dtype=float32", f"hydra.run.dir={out}"], out))
    assert got["layers_merged"] > 0 and got["max_rel_err"] <= 1e-6
    pipe = StableDiffusion3Pipeline.from_single_file(str(out / "merged.safetensors"), config=str(out / "merged"),
                                                     local_files_only=True)
    folder = StableDiffusion3Pipeline.from_pretrained(out / "merged")
    for comp in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        a, b = getattr(pipe, comp).state_dict(), getattr(folder, comp).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), comp
    merged = stock_images(str(out / "merged"), None)
    with_lora = stock_images(tiny_sd3, sd3_run / ADAPTER)
    assert all(np.abs(a - b).max() <= 1 for a, b in zip(merged, with_lora))


def test_inspect_reads_both_sd3_files(sd3_run, tiny_sd3, tmp_path):
    from toolkit.tasks import inspect

    out = tmp_path / "inspect"
    got = inspect.run(compose_cfg(["task=inspect", f"model.name_or_path={tiny_sd3}",
                                   f"adapter=[{sd3_run / ADAPTER},{sd3_run / 'adapter' / KOHYA_FILE}]",
                                   f"hydra.run.dir={out}"], out))
    infos = json.loads(Path(got["details"]).read_text())
    assert [i["family_named_by_file"] for i in infos] == ["sd3", "sd3"]
    assert infos[0]["layers_per_component"] == infos[1]["layers_per_component"]
    assert all(i["base_model_match"]["unmatched"] == 0 for i in infos)
    assert {g["kind"] for g in infos[1]["groups"]} >= {"to_q", "add_q_proj", "to_add_out", "ff.net.0.proj"}


# ------------------------------------------------------------------------------------------ evaluation
def test_evaluate_sd3_and_pair_it_with_an_sdxl_row(sd3_run, tiny_sd3, tiny_sdxl, tiny_clip, imagefolder_data,
                                                   tmp_path):
    """Every metric and interval on SD3's images, with its recorded schedule; on one reference set and the
    same prompts and seeds an SD3 row pairs with an SDXL row (the paired Δ of two families)."""
    from toolkit.evaluation.pairing import pair
    from toolkit.results import read_rows
    from toolkit.tasks import eval as eval_task

    table = tmp_path / "results.jsonl"
    common = [f"metrics.clip_model={tiny_clip}", f"eval.dataset={imagefolder_data}", "eval.num_images=4",
              "eval.steps=2", "eval.batch_size=4", "metrics.interval_groups=4", "eval.num_ref=null",
              "eval.height=16", "eval.width=16", "fabric.accelerator=cpu", "logger=none", f"eval.results_file={table}"]
    for name, model, adapter in (("sd3", tiny_sd3, f"adapter={sd3_run}"), ("sdxl", tiny_sdxl, "adapter=null")):
        out = tmp_path / name
        m = eval_task.run(compose_cfg(["task=eval", f"model.name_or_path={model}", adapter, *common,
                                       f"hydra.run.dir={out}"], out))
        assert m["n_fake"] == 4 and m["fid"] > 0 and m["fid_ci_low"] <= m["fid_ci_high"]
    sd3_row, xl_row = read_rows(table)
    assert sd3_row["settings"]["family"] == "sd3"
    assert sd3_row["settings"]["scheduler"] == "FlowMatchEulerDiscreteScheduler"
    assert xl_row["settings"]["scheduler"] == "DDIMScheduler"
    p = pair(xl_row, sd3_row)
    assert p.reason is None and p.deltas["fid"]["delta"] == pytest.approx(sd3_row["metrics"]["fid"] -
                                                                        xl_row["metrics"]["fid"], rel=1e-6)


# ------------------------------------------------------------------------------------------ the model's settings
def test_settings_follow_an_sd3_model(tiny_sd3, tiny_model):
    from tests.test_first_run import chosen

    got = chosen(["task=train", f"model.name_or_path={tiny_sd3}"])
    assert got["module"] == "lora_sd3" and got["data.resolution"] == "16"   # transformer sample_size 8 x VAE 2
    assert (got["generation.scheduler"], got["generation.steps"], got["generation.guidance_scale"]) == \
        ("FlowMatchEulerDiscreteScheduler", "28", "7.0")                       # SD3's pipeline defaults
    sd = chosen(["task=sample", f"model.name_or_path={tiny_model}"])
    assert (sd["generation.scheduler"], sd["generation.steps"], sd["generation.guidance_scale"]) == \
        ("DDIMScheduler", "25", "5.0")


def test_an_unsupported_family_is_refused_naming_the_supported_ones(tmp_path):
    qwen = tmp_path / "qwen-image"
    (qwen / "transformer").mkdir(parents=True)
    (qwen / "model_index.json").write_text(json.dumps({"_class_name": "QwenImagePipeline",
                                                       "transformer": ["diffusers", "QwenImageTransformer2DModel"]}))
    (qwen / "transformer" / "config.json").write_text(json.dumps({"_class_name": "QwenImageTransformer2DModel"}))
    res = run_entry(["task=train", f"model.name_or_path={qwen}", f"hydra.run.dir={tmp_path / 'run'}"], timeout=120)
    assert res.returncode != 0 and "OSError" not in res.stderr
    assert "no supported model family has a QwenImageTransformer2DModel denoiser" in res.stderr
    assert all(f in res.stderr for f in ("sd (StableDiffusionPipeline", "sdxl (", "sd3 (StableDiffusion3Pipeline",
                                         "flux (FluxPipeline"))


def test_an_sd3_single_file_loads_tensor_for_tensor(tiny_sd3, tmp_path):
    from toolkit.models.pretrained import load_components
    from toolkit.models.single_file import pipeline_to_single_file

    c = load_components(tiny_sd3)
    parts = {"vae": c.vae, "transformer": c.denoiser, **c.tokenizers, **c.text_encoders}
    path = pipeline_to_single_file(c.family.pipeline(parts, c.noise_scheduler), tmp_path / "sd3.safetensors",
                                   dtype=torch.float32)
    f = load_components(str(path), config=tiny_sd3)   # read by diffusers' from_single_file, then checked
    for name, a, b in (("transformer", c.denoiser, f.denoiser), ("vae", c.vae, f.vae),
                       *((n, c.text_encoders[n], f.text_encoders[n]) for n in c.text_encoders)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), name


# ------------------------------------------------------------------------------------------ text cache, methods
def test_the_text_cache_holds_the_encoders_output(tiny_sd3, imagefolder_data, tmp_path):
    """T5's field as bfloat16 bits (float16 cannot hold T5's range), memory-mapped, its length in the key;
    float32 storage is the encoder's output exactly."""
    from toolkit.callbacks.encoded_cache import EncodedCache

    cfg = compose_cfg(sd3_overrides(tiny_sd3, imagefolder_data, tmp_path), tmp_path)
    dm = instantiate(cfg.data)
    dm.setup("fit")
    module = instantiate(cfg.module)
    short = instantiate(compose_cfg(sd3_overrides(tiny_sd3, imagefolder_data, tmp_path,
                                                  "+model.max_sequence_length=77"), tmp_path).module)
    captions = sorted(set(dm.train_set.captions()))[:3] + [""]
    with torch.no_grad():
        direct = module.encode_text(captions, cached=False)
    folders = set()
    for m, dtype in ((module, "float16"), (module, "float32"), (short, "float16")):
        cache = EncodedCache(str(tmp_path / "cache"), latents=False, dtype=dtype)
        folders |= set(cache.encode(m, dm, {"rank": 0, "world_size": 1, "barrier": lambda: None}))
        with torch.no_grad():
            got = m.encode_text(captions)
        if m is short:
            assert got["prompt_embeds"].shape[1] == 77 + 77   # CLIP's 77 tokens, then T5's 77
            continue
        if dtype == "float32":
            assert all(torch.equal(got[f], direct[f]) for f in direct)
        else:
            assert torch.equal(got["prompt_embeds"], direct["prompt_embeds"].to(torch.bfloat16).float())
            assert torch.equal(got["pooled"], direct["pooled"].half().float())
            store = module.text_cache["prompt_embeds"]
            assert isinstance(store.get(next(iter(store.index))), np.memmap)
    assert len(folders) == 6   # per field, one store per dtype and per T5 length
    from toolkit.data.encoded_cache import from_rows, to_rows

    big = torch.tensor([[1.0e6, -3.0e5, 7.0]])   # beyond float16's 65504: bfloat16 bits keep it
    assert torch.equal(from_rows(to_rows(big, "bfloat16")), big.to(torch.bfloat16).float())
    assert not torch.isfinite(big.half()).all()


def test_text_encoder_lora_is_for_the_clips_and_loha_is_refused_naming_it(tiny_sd3, imagefolder_data, tmp_path):
    from toolkit.callbacks.adapter_export import AdapterExport

    cfg = compose_cfg(sd3_overrides(tiny_sd3, imagefolder_data, tmp_path, "module.text_encoder_lora={_target_:"
                                    "toolkit.adapters.inject.adapter_config,r:4,alpha:4,target_modules:[q_proj,v_proj]}"
                                    ), tmp_path)
    module = instantiate(cfg.module)
    assert module.text_lora_params and all(getattr(module, e).peft_config for e in ("text_encoder", "text_encoder_2"))
    assert not getattr(module.text_encoder_3, "peft_config", None)   # diffusers' SD3 loader reads none for T5
    cfg = compose_cfg(sd3_overrides(tiny_sd3, imagefolder_data, tmp_path, "module.lora.type=loha"), tmp_path)
    loha = instantiate(cfg.module)
    with pytest.raises(ValueError, match="a loha adapter of a sd3 model cannot be written in any format"):
        AdapterExport(str(tmp_path / "a")).setup(None, loha, "fit")


def test_dora_on_sd3_exports_whole_in_both_formats(tiny_sd3, imagefolder_data, tmp_path):
    """DoRA (peft's, on SD3's linear layers): the diffusers file loads whole into the stock pipeline
    (verified update by update, magnitudes included) and the kohya file, q/k/v stacked, reads back to the
    same updates and magnitudes."""
    from diffusers import StableDiffusion3Pipeline

    from toolkit.adapters.formats import read_adapter
    from toolkit.adapters.inject import save_adapter
    from toolkit.adapters.layers import compare_updates
    from toolkit.adapters.loading import load_adapters, module_shapes

    cfg = compose_cfg(sd3_overrides(tiny_sd3, imagefolder_data, tmp_path, "module.lora.type=dora"), tmp_path)
    module = instantiate(cfg.module)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():   # a trained-looking adapter: B and the magnitudes away from their init
        for n, p in module.transformer.named_parameters():
            if "lora_B" in n or "lora_magnitude" in n:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    paths = save_adapter(tmp_path / "a", module.models, module.family, ("diffusers", "kohya"))
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3)
    loaded = load_adapters(pipe, module.family, [paths["diffusers"]])
    assert loaded[0].layers == {"transformer": len(module.denoiser_lora_params) // 3}   # A, B, magnitude per layer
    mods = {"transformer": module_shapes(module.transformer)}
    diff, kohya = (read_adapter(paths[f], module.family, mods, module.transformer.config) for f in ("diffusers",
                                                                                                   "kohya"))
    assert compare_updates(diff.updates("transformer"), kohya.updates("transformer")).ok(1e-6)
    assert compare_updates(diff.magnitudes("transformer"), kohya.magnitudes("transformer")).ok(1e-6)
    assert kohya.kinds() == {"dora"}


def test_a_size_the_transformers_patches_cannot_tile_is_refused_before_loading(tiny_sd3):
    """SD3's transformer cuts latents into patch_size x patch_size patches (its config): the training size
    must be a multiple of that x the VAE factor, refused before any weight loads otherwise."""
    from diffusers import SD3Transformer2DModel

    from toolkit.models.pretrained import check_resolution, vae_factor

    factor = vae_factor(tiny_sd3) * SD3Transformer2DModel.load_config(tiny_sd3, subfolder="transformer")["patch_size"]
    assert factor > vae_factor(tiny_sd3)
    with pytest.raises(ValueError, match=rf"not divisible by {factor}, .* latent patches"):
        check_resolution(tiny_sd3, 4 * factor + vae_factor(tiny_sd3))
    check_resolution(tiny_sd3, 4 * factor)
