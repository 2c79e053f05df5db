"""FLUX.2 [klein] on the denoiser family piece, on a tiny Klein-architecture pipeline built here (a text-only
Qwen3 causal LM with an offline byte-level BPE tokenizer and chat template, double- and single-stream
blocks over 2x2-patchified latents with 4-axis RoPE ids, ``AutoencoderKLFlux2`` with batch-norm latent
statistics, FLUX.2's dynamic-shift scheduler) read through the hub path: the loss is the Flux.2 formula
written out, training runs through the real entry point (the family read from model_index.json) and
resumes bit for bit, the text cache holds the pipeline's stacked Qwen3 states, sampling equals the stock
``Flux2KleinPipeline`` with the exported LoRA, and the file loads there with no key left unread; the
kohya/BFL (ComfyUI) file reads back to the trained updates, is read whole by diffusers' own kohya-Flux2
converter, and samples as the diffusers file.

One training run is shared (``flux2_run``); the others are as few as the checks need.
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
TEXT = 64   # the prompt's tokens (the pipeline's 512 by default): the chat-templated captions fit in 64


@pytest.fixture(scope="module")
def tiny_flux2(tmp_path_factory) -> str:
    """A random FLUX.2 [klein]-architecture pipeline (Qwen3 + its tokenizer, no guidance embedding), save_pretrained."""
    from tests.tiny import build_tiny_flux2_klein_pipeline

    return str(build_tiny_flux2_klein_pipeline(tmp_path_factory.mktemp("models") / "tiny-flux2", seed=0))


def flux2_overrides(model: str, data: Path, out: Path, *extra: str) -> list[str]:
    """The tiny run with Klein's own preset (module=lora_flux2), smaller, with α ≠ r so the exported
    scales are checked, a learning rate at which 4 steps change the images; no in-training grids
    (sampling is checked against the stock pipeline below)."""
    base = [a for a in tiny_overrides(model, data, out) if not a.startswith("module=")]
    return base + ["module=lora_flux2", "module.lora.r=4", "module.lora.alpha=8", "module.optimizer.lr=1e-2",
                   f"+model.max_sequence_length={TEXT}",
                   "module.lr_scheduler.num_warmup_steps=0", "module.speed.gradient_checkpointing=false",
                   "trainer.deterministic=true", f"trainer.max_steps={STEPS}", "~callbacks.sample_grid", *extra]


@pytest.fixture(scope="module")
def flux2_run(tiny_flux2, imagefolder_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("flux2_run")
    return finished_run(flux2_overrides(tiny_flux2, imagefolder_data, out, *batch_keys(out)), out)



class Messages(logging.Handler):
    """Every record of the named loggers while in use (diffusers' and peft's key warnings)."""

    def __init__(self, *names: str) -> None:
        super().__init__(logging.DEBUG)
        self.names, self.got = names, []

    def emit(self, record: logging.LogRecord) -> None:
        self.got.append(record.getMessage())

    def __enter__(self) -> Messages:
        for n in self.names:
            logging.getLogger(n).addHandler(self)
        return self

    def __exit__(self, *exc) -> None:
        for n in self.names:
            logging.getLogger(n).removeHandler(self)


def trained_layers(run: Path) -> set[str]:
    """The transformer modules the run's diffusers file adapts."""
    return {k.rsplit(".lora_", 1)[0].removeprefix("transformer.") for k in load_file(run / ADAPTER) if ".lora_" in k}


def stock_images(model: str, lora: Path | None, n: int = 2, steps: int = 3, layers: set[str] | None = None
                 ) -> list[np.ndarray]:
    """The stock diffusers pipeline, as a user runs it (Klein's sampler and CFG 4; the run's steps); the
    LoRA file loaded with no key left unread and every layer of it (``layers``, or the diffusers file's
    own) in the transformer."""
    import warnings

    from diffusers import Flux2KleinPipeline

    pipe = Flux2KleinPipeline.from_pretrained(model)
    if lora is not None:
        with Messages("diffusers", "peft") as log, warnings.catch_warnings(record=True) as warned:
            warnings.simplefilter("always")
            pipe.load_lora_weights(str(lora.parent), weight_name=lora.name)
        said = log.got + [str(w.message) for w in warned]
        assert not [m for m in said if "unexpected" in m.lower() or "missing" in m.lower()], said
        layers = layers or {k.rsplit(".lora_", 1)[0].removeprefix("transformer.") for k in load_file(lora)}
        loaded = {n for n, m in pipe.transformer.named_modules() if hasattr(m, "lora_A") and "default_0" in m.lora_A}
        assert layers and loaded == layers
    pipe.set_progress_bar_config(disable=True)
    out = pipe(prompt=["a red circle"] * n, generator=[torch.Generator("cpu").manual_seed(s) for s in range(n)],
               num_inference_steps=steps, guidance_scale=4.0, height=16, width=16, max_sequence_length=TEXT)
    return [np.asarray(im).astype(int) for im in out.images]


# ------------------------------------------------------------------------------------------ the loss
def qwen3_states(module, captions: list[str], layers=(9, 18, 27), length: int = TEXT) -> torch.Tensor:
    """The captions in Qwen3's chat template (thinking off), padded to ``length``; the hidden states after
    ``layers`` side by side per token."""
    texts = [module.tokenizer.apply_chat_template([{"role": "user", "content": c}], tokenize=False,
                                                  add_generation_prompt=True, enable_thinking=False) for c in captions]
    assert texts[0].endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    enc = module.tokenizer(texts, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
    hidden = module.text_encoder(input_ids=enc.input_ids, attention_mask=enc.attention_mask,
                                 output_hidden_states=True, use_cache=False).hidden_states
    return torch.cat([hidden[i] for i in layers], dim=-1)


def test_the_module_loss_is_the_flux2_formula_written_out(tiny_flux2, imagefolder_data, tmp_path):
    """z = the VAE posterior's mean (the pipeline's and diffusers' Klein example's); x₀ = its 2x2 patches
    (4·C channels at half the side) normalised by the VAE's
    batch-norm running statistics; σ = e^μ/(e^μ + 1/u − 1) at u = (t+1)/N with μ on the line through (256,
    0.5) and (4096, 1.15) at the token count; x_t = (1−σ)x₀ + σε; the transformer given the tokens, their
    (0, row, col, 0) ids, (0, 0, 0, l) text ids, σ, no guidance, and Qwen3's layers 9/18/27; target ε − x₀."""
    cfg = compose_cfg(flux2_overrides(tiny_flux2, imagefolder_data, tmp_path, "data.val_fraction=0"), tmp_path)
    got, module, batch, z = loss_and_vae_sample(cfg, draw=False)
    vae, T = module.vae, module.noise_scheduler.config.num_train_timesteps
    with torch.no_grad():
        n, c, H, W = z.shape
        h, w = H // 2, W // 2
        patches = z.reshape(n, c, h, 2, w, 2).permute(0, 1, 3, 5, 2, 4).reshape(n, 4 * c, h, w)
        bn = vae.bn
        x0 = (patches - bn.running_mean.view(1, -1, 1, 1)) / torch.sqrt(bn.running_var.view(1, -1, 1, 1) + bn.eps)
        text = qwen3_states(module, batch["captions"])
    eps = torch.randn(x0.shape)
    t = (torch.sigmoid(torch.normal(0.0, 1.0, size=(n,))).clamp(0, 1 - 1e-7) * T).long()
    seq = h * w
    mu = 0.5 + (1.15 - 0.5) / (4096 - 256) * (seq - 256)
    u = (t + 1).double() / T
    sigma = (math.exp(mu) / (math.exp(mu) + (1 / u - 1))).float().view(-1, 1, 1, 1)
    xt = (1 - sigma) * x0 + sigma * eps
    tokens = xt.permute(0, 2, 3, 1).reshape(n, seq, 4 * c)
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    zero = torch.zeros_like(rows)
    img_ids = torch.stack([zero, rows, cols, zero], -1).reshape(1, seq, 4).expand(n, -1, -1)
    L = text.shape[1]
    txt_ids = torch.stack([torch.zeros(L, dtype=torch.long)] * 3 + [torch.arange(L)], -1).expand(n, -1, -1)
    out = module.transformer(hidden_states=tokens, timestep=sigma.flatten(), guidance=None,
                             encoder_hidden_states=text, txt_ids=txt_ids, img_ids=img_ids).sample
    pred = out.reshape(n, h, w, 4 * c).permute(0, 3, 1, 2)
    want = ((pred.float() - (eps - x0)) ** 2).flatten(1).mean(1).mean()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------------------ training
def test_flux2_trains_its_lora_through_the_entry_point(flux2_run):
    ck = torch.load(flux2_run / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")
    keys = list(ck["state_dict"])
    assert keys and all(k.startswith("transformer.") and ".lora_" in k for k in keys)   # frozen base not saved
    assert any(".attn.add_q_proj." in k for k in keys) and any(".ff_context.linear_in." in k for k in keys)
    assert any(k.startswith("transformer.single_transformer_blocks.1.attn.to_qkv_mlp_proj.") for k in keys)
    log = (flux2_run / "entry.log").read_text()
    assert "chosen generation.guidance_scale=4.0" in log and "chosen generation.steps=50" in log
    assert "text cache (prompt_embeds, bfloat16)" in log
    assert (flux2_run / "adapter" / KOHYA_FILE).is_file()
    metrics = json.loads((flux2_run / "train_metrics.json").read_text())
    assert math.isfinite(metrics["train/loss"])


def test_flux2_resume_is_bit_identical(flux2_run, tmp_path):
    resumes_bit_identically(flux2_run, tmp_path / "resumed", STEPS, ADAPTER)


@pytest.mark.slow
def test_flux2_two_ddp_processes_train_what_one_process_trains(flux2_run, tiny_flux2, imagefolder_data, tmp_path):
    """Both ranks hold one LoRA, and together they train on the images one process trains on, step by step."""
    out = tmp_path / "ddp"
    two_ranks_train_what_one_trains(flux2_overrides(tiny_flux2, imagefolder_data, out, *ddp_overrides(out)), out,
                                    flux2_run)


def test_evaluate_flux2(flux2_run, tiny_flux2, tiny_clip, imagefolder_data, tmp_path):
    """task=eval of the trained LoRA: FID/KID/CLIP score with intervals; the row names the family and the
    sampler Klein samples with, and its CFG."""
    from toolkit.results import read_rows
    from toolkit.tasks import eval as eval_task

    table = tmp_path / "results.jsonl"
    out = tmp_path / "eval"
    m = eval_task.run(compose_cfg(["task=eval", f"model.name_or_path={tiny_flux2}", f"adapter={flux2_run}",
                                   f"metrics.clip_model={tiny_clip}", f"eval.dataset={imagefolder_data}",
                                   "eval.num_images=4", "eval.steps=2", "eval.batch_size=4",
                                   "metrics.interval_groups=4", "eval.num_ref=null", "eval.height=16", "eval.width=16",
                                   f"+model.max_sequence_length={TEXT}", "fabric.accelerator=cpu", "logger=none",
                                   f"eval.results_file={table}", f"hydra.run.dir={out}"], out))
    assert m["n_fake"] == 4 and m["fid"] > 0 and m["fid_ci_low"] <= m["fid"] <= m["fid_ci_high"]
    assert m["clip_score_ci_low"] <= m["clip_score"] <= m["clip_score_ci_high"]
    (row,) = read_rows(table)
    assert row["settings"]["family"] == "flux2"
    settings = row["settings"]
    assert settings["scheduler"] == "FlowMatchEulerDiscreteScheduler" and settings["guidance_scale"] == 4.0


# ------------------------------------------------------------------------------------------ text cache
def test_the_flux2_text_cache_holds_the_pipelines_qwen3_states(tiny_flux2, imagefolder_data, tmp_path):
    """The family's conditioning is Qwen3's stacked states as written out above; the cache holds them as
    bfloat16 bits (an LLM's activations), and float32 storage gives them back exactly."""
    from toolkit.callbacks.encoded_cache import EncodedCache

    cfg = compose_cfg(flux2_overrides(tiny_flux2, imagefolder_data, tmp_path), tmp_path)
    dm = instantiate(cfg.data)
    dm.setup("fit")
    module = instantiate(cfg.module)
    captions = sorted(set(dm.train_set.captions()))[:3] + [""]
    with torch.no_grad():
        direct = module.encode_text(captions, cached=False)
        torch.testing.assert_close(direct["prompt_embeds"], qwen3_states(module, captions), rtol=0, atol=0)
    assert direct["prompt_embeds"].shape[1:] == (TEXT, 48)
    for dtype in ("float16", "float32"):
        cache = EncodedCache(str(tmp_path / "cache"), latents=False, dtype=dtype)
        cache.encode(module, dm, {"rank": 0, "world_size": 1, "barrier": lambda: None})
        with torch.no_grad():
            got = module.encode_text(captions)
        want = direct["prompt_embeds"] if dtype == "float32" else direct["prompt_embeds"].to(torch.bfloat16).float()
        assert torch.equal(got["prompt_embeds"], want)


# ------------------------------------------------------------------------------------------ sampling / adapter
def test_sampling_equals_the_stock_klein_pipeline_with_the_exported_lora(flux2_run, tiny_flux2, tmp_path):
    out = tmp_path / "sample"
    res = run_entry(["task=sample", f"model.name_or_path={tiny_flux2}", f"adapter={flux2_run}", "sample.steps=3",
                     "sample.seeds=[0,1]", "sample.prompts=[a red circle]", "sample.height=16", "sample.width=16",
                     f"+model.max_sequence_length={TEXT}", f"hydra.run.dir={out}"])
    assert res.returncode == 0, res.stderr[-3000:]
    ours = sample_images(out)
    row = json.loads((out / "samples" / "00000.json").read_text())
    assert row["scheduler"] == "FlowMatchEulerDiscreteScheduler" and row["guidance_scale"] == 4.0
    stock = stock_images(tiny_flux2, flux2_run / ADAPTER)
    base = stock_images(tiny_flux2, None)
    assert len(ours) == len(stock) == 2
    assert all(np.abs(a - b).max() <= 1 for a, b in zip(ours, stock))       # fused vs peft layers: ≤ 1 level
    assert any(np.abs(a - b).max() > 1 for a, b in zip(stock, base))       # and the LoRA does something


def test_the_toolkit_reads_its_kohya_file_back_to_the_trained_updates(flux2_run, tiny_flux2):
    from toolkit.models.families import Flux2Klein

    kohya_read_back(flux2_run, tiny_flux2, Flux2Klein, ADAPTER)
    names = {k.split(".")[0] for k in load_file(flux2_run / "adapter" / KOHYA_FILE)}
    assert {"lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_double_blocks_0_txt_attn_qkv",
            "lora_unet_double_blocks_0_img_attn_proj", "lora_unet_double_blocks_0_txt_mlp_0",
            "lora_unet_single_blocks_1_linear1"} <= names



def test_kohya_file_read_whole_by_diffusers_flux2_converter_samples_as_the_diffusers_file(flux2_run, tiny_flux2):
    """diffusers' own ``_convert_kohya_flux2_lora_to_diffusers`` (what ``Flux2KleinPipeline.load_lora_weights``
    calls on it) leaves no key unread, gives every trained layer with B·A = the trained update (1e-6), and
    the stock pipeline samples the kohya file as the diffusers file (≤ 1 level)."""
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux2_lora_to_diffusers

    from toolkit.adapters.formats import read_adapter
    from toolkit.adapters.layers import compare_updates
    from toolkit.adapters.loading import module_shapes
    from toolkit.models.families import Flux2Klein
    from toolkit.models.pretrained import skeletons

    kohya = flux2_run / "adapter" / KOHYA_FILE
    with Messages("diffusers") as log:
        converted = _convert_kohya_flux2_lora_to_diffusers(dict(load_file(kohya)))
    assert not [m for m in log.got if "Unsupported keys" in m], log.got
    got = {k.removeprefix("transformer.").removesuffix(".lora_A.weight"):
           converted[k.replace(".lora_A.", ".lora_B.")].double() @ v.double()
           for k, v in converted.items() if k.endswith(".lora_A.weight")}
    assert set(got) == trained_layers(flux2_run) and len(converted) == 2 * len(got)
    _, models = skeletons(tiny_flux2)
    mods = {c: module_shapes(m) for c, m in models.items()}
    want = read_adapter(flux2_run / ADAPTER, Flux2Klein, mods, models["transformer"].config).updates("transformer")
    cmp = compare_updates(want, got)
    assert cmp.ok(1e-6), cmp.describe()
    stock = stock_images(tiny_flux2, flux2_run / ADAPTER)
    via_kohya = stock_images(tiny_flux2, kohya, layers=trained_layers(flux2_run))
    assert all(np.abs(a - b).max() <= 1 for a, b in zip(stock, via_kohya))


def test_merge_and_inspect_flux2(flux2_run, tiny_flux2, tmp_path, monkeypatch):
    """merge: the diffusers folder samples as the base with the LoRA (a single file is refused before any
    weight loads, naming the format that works); inspect: both files name the FLUX.2 family and the same
    layers, all matched."""
    from toolkit.tasks import inspect, merge

    out = tmp_path / "merge"
    with monkeypatch.context() as mp, pytest.raises(ValueError, match=r"set merge.formats=\[diffusers\]"):
        mp.setattr(merge, "load_pipeline", lambda **_: pytest.fail("loaded before refusing"))
        merge.run(compose_cfg(["task=merge", f"model.name_or_path={tiny_flux2}", f"adapter={flux2_run}",
                               f"hydra.run.dir={out}"], out))
    got = merge.run(compose_cfg(["task=merge", f"model.name_or_path={tiny_flux2}", f"adapter={flux2_run}",
                                 "merge.formats=[diffusers]", "merge.dtype=float32", f"hydra.run.dir={out}"], out))
    assert got["layers_merged"] == len(trained_layers(flux2_run)) and got["max_rel_err"] <= 1e-6
    merged, with_lora = stock_images(str(out / "merged"), None), stock_images(tiny_flux2, flux2_run / ADAPTER)
    assert all(np.abs(a - b).max() <= 1 for a, b in zip(merged, with_lora))

    got = inspect.run(compose_cfg(["task=inspect", f"model.name_or_path={tiny_flux2}",
                                   f"adapter=[{flux2_run / ADAPTER},{flux2_run / 'adapter' / KOHYA_FILE}]",
                                   f"hydra.run.dir={tmp_path / 'inspect'}"], tmp_path / "inspect"))
    infos = json.loads(Path(got["details"]).read_text())
    assert [i["family_named_by_file"] for i in infos] == ["flux2", "flux2"]
    assert infos[0]["layers_per_component"] == infos[1]["layers_per_component"]
    assert all(i["base_model_match"]["unmatched"] == 0 for i in infos)


# ------------------------------------------------------------------------------------------ the model's settings
def test_settings_follow_a_klein_model_and_flux2_dev_is_not_taken_for_it(tiny_flux2, tmp_path):
    from tests.test_first_run import chosen
    from toolkit.models.families import Flux2Klein, UnsupportedFamily, family_of

    got = chosen(["task=train", f"model.name_or_path={tiny_flux2}"])
    assert got["module"] == "lora_flux2" and got["data.resolution"] == "256"   # the pipeline's 128 latents x VAE 2
    assert (got["generation.scheduler"], got["generation.steps"], got["generation.guidance_scale"]) == \
        ("FlowMatchEulerDiscreteScheduler", "50", "4.0")                      # Flux2KleinPipeline's defaults
    assert family_of("Flux2Transformer2DModel", {"guidance_embeds": False}) is Flux2Klein
    distilled = Path(shutil.copytree(tiny_flux2, tmp_path / "distilled"))   # FLUX.2-klein-4B's model_index.json
    index = json.loads((distilled / "model_index.json").read_text())
    (distilled / "model_index.json").write_text(json.dumps({**index, "is_distilled": True}))
    got = chosen(["task=train", f"model.name_or_path={distilled}"])   # the step-distilled models' recipe
    assert (got["generation.steps"], got["generation.guidance_scale"]) == ("4", "1.0")
    from toolkit.model_defaults import ModelDefaultsError

    with pytest.raises(ModelDefaultsError, match=r"sample.guidance_scale=4.0: a step-distilled FLUX.2 \[klein\]"):
        chosen(["task=sample", f"model.name_or_path={distilled}", "sample.guidance_scale=4.0"])
    with pytest.raises(UnsupportedFamily, match=r"Flux2Transformer2DModel denoiser \(FLUX.2 \[dev\] .* not supported"):
        family_of("Flux2Transformer2DModel", {"guidance_embeds": True})



def test_a_text_encoder_adapter_is_refused_before_loading(tiny_flux2, imagefolder_data, tmp_path):
    """diffusers' Flux2 loader reads the transformer's LoRA only: a text-encoder adapter could never be
    used, so it is refused (not left untrained without a word), naming the key."""
    from hydra.utils import instantiate

    cfg = compose_cfg(flux2_overrides(tiny_flux2, imagefolder_data, tmp_path, "module.text_encoder_lora={_target_:"
                                      "toolkit.adapters.inject.adapter_config,r:4,alpha:4,target_modules:[q_proj]}"),
                      tmp_path)
    with pytest.raises(Exception, match="reads the transformer's LoRA only.*module.text_encoder_lora=null"):
        instantiate(cfg.module)


def test_a_replacement_vae_is_read_as_the_familys_class_and_another_class_is_refused(tiny_flux2):
    """model.vae= with Klein: read as AutoencoderKLFlux2 (its batch-norm statistics kept); a VAE of another
    class is refused, not loaded with defaults filling what it lacks."""
    import torch
    from diffusers import AutoencoderKL, AutoencoderKLFlux2

    from toolkit.models.pretrained import load_vae

    vae = load_vae(tiny_flux2, torch.float32, vae_class=AutoencoderKLFlux2)
    stored = AutoencoderKLFlux2.from_pretrained(tiny_flux2, subfolder="vae")
    assert torch.equal(vae.bn.running_var, stored.bn.running_var) and vae.bn.running_var.std() > 0
    with pytest.raises(ValueError, match="a AutoencoderKLFlux2, not the AutoencoderKL"):
        load_vae(tiny_flux2, torch.float32, vae_class=AutoencoderKL)


def test_the_text_cache_key_holds_the_chat_template(tiny_flux2):
    """Klein's prompt goes through the tokenizer's chat template: another template is another text cache."""
    from transformers import AutoTokenizer

    from toolkit.hashing import tokenizer_fingerprint

    tok = AutoTokenizer.from_pretrained(tiny_flux2, subfolder="tokenizer")
    first = tokenizer_fingerprint(tok)
    tok.chat_template = tok.chat_template.replace("<|im_start|>", "<|im_start|> ")
    assert tokenizer_fingerprint(tok) != first


def test_sizes_follow_the_patches_and_the_native_size(tiny_flux2, tmp_path):
    """A training size the 2x2 patches of the VAE's latents cannot tile is refused before loading, naming
    the sizes that work; a generation without a size takes the pipeline's native one (no crash reading a
    sample_size the transformer config does not have)."""
    from toolkit.evaluation.budget import size_of
    from toolkit.models import parts as model_parts
    from toolkit.models.pretrained import check_resolution

    with pytest.raises(ValueError, match=r"resolution=18 is not divisible by 4, .* 2x2 latent patches .* 16 or 20"):
        check_resolution(tiny_flux2, 18)
    check_resolution(tiny_flux2, 20)
    with pytest.raises(ValueError, match=r"data.buckets.step=6: bucket sides must be multiples of 4"):
        check_resolution(tiny_flux2, 20, bucket_step=6)
    cfg = compose_cfg(["task=sample", f"model.name_or_path={tiny_flux2}", "sample.prompts=[a red circle]"], tmp_path)
    assert size_of(cfg, cfg.sample, model_parts.parts(cfg.model)) == (256, 256)   # 128 latents x VAE 2


def test_a_negative_prompt_reaches_the_pipelines_that_take_one_and_klein_refuses_it(tiny_flux2, tiny_model):
    """``generate`` names the prompt (Klein's first argument is a reference image) and passes a negative
    prompt only to a pipeline that takes one: SD's images change with it; Klein's pipeline is refused."""
    from diffusers import Flux2KleinPipeline, StableDiffusionPipeline

    from toolkit.inference.pipeline import generate

    with pytest.raises(ValueError, match="Flux2KleinPipeline takes no negative prompt"):
        generate(Flux2KleinPipeline.from_pretrained(tiny_flux2), ["a red circle"], [0], 1, 4.0,
                 negative_prompt="blurry", progress=False)
    sd = StableDiffusionPipeline.from_pretrained(tiny_model)
    sd.set_progress_bar_config(disable=True)
    plain, negative = (np.asarray(generate(sd, ["a red circle"], [0], 2, 5.0, negative_prompt=neg, height=16, width=16,
                                           progress=False)[0]).astype(int) for neg in (None, "a blue square"))
    assert np.abs(plain - negative).max() > 1
