"""The methods researchers compare: adapter types, EMA, optimizers, tag captions, objective options.

Every adapter type trains through the real task, resumes bit-identically, and its exported
kohya/LyCORIS file is read by an independent implementation — the ``lycoris-lora`` package, as
A1111/ComfyUI users load such files — whose UNet then computes what the trained model computes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, UNet2DConditionModel
from hydra.utils import instantiate
from safetensors.torch import load_file

from tests.conftest import compose_cfg, tiny_overrides
from toolkit.adapters.formats import KOHYA_FILE, kohya_key
from toolkit.adapters.layers import compare_updates, layers_from_model, model_magnitudes, model_updates
from toolkit.adapters.loading import inject, load_adapters, resolve_adapter
from toolkit.data.captions import TagPolicy, tag_caption
from toolkit.tasks import train

KINDS = {"locon": ["module=lora"], "dora": ["module=dora"], "loha": ["module=loha"], "lokr": ["module=lokr"]}
TARGETS = "module.lora.target_modules=[to_q,to_k,to_v,to_out.0,conv1,conv2]"


def overrides(model: str, data: Path, out: Path, *extra: str) -> list[str]:
    return tiny_overrides(model, data, out) + [TARGETS, "module.lora.alpha=8", "module.optimizer.lr=1e-2",
                                               "~callbacks.sample_grid", *extra]


def trained(cfg, run: Path):
    module = instantiate(cfg.module)
    module.load_state_dict(torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"],
                           strict=False)
    return module.eval()


def lycoris_unet(base_path: str, kohya_file: Path):
    """A fresh base UNet with the file applied by LyCORIS (its own modules and maths)."""
    from lycoris.kohya import LycorisNetworkKohya, create_network_from_weights

    unet = UNet2DConditionModel.from_pretrained(base_path, subfolder="unet")
    # LyCORIS lists diffusers' time_embedding both by class and by name and then refuses the duplicate;
    # the file decides which modules are built, so the name list is not needed here.
    saved, LycorisNetworkKohya.UNET_TARGET_REPLACE_NAME = LycorisNetworkKohya.UNET_TARGET_REPLACE_NAME, []
    try:
        net, _ = create_network_from_weights(1.0, str(kohya_file), None, None, unet, for_inference=True)
    finally:
        LycorisNetworkKohya.UNET_TARGET_REPLACE_NAME = saved
    net.apply_to(None, unet, apply_text_encoder=False, apply_unet=True)
    return unet, net


def unet_output(unet, module) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    cond = torch.randn(2, 77, module.unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        return unet(x, torch.tensor([10, 700]), encoder_hidden_states=cond).sample.double()


@pytest.fixture(scope="module", params=sorted(KINDS))
def kind_run(request, tiny_model, imagefolder_data, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"kind-{request.param}")
    cfg = compose_cfg(overrides(tiny_model, imagefolder_data, out, *KINDS[request.param], "trainer.max_steps=6"), out)
    train.run(cfg)
    return request.param, cfg, out


def test_adapter_type_file_is_read_whole_by_lycoris(kind_run, tiny_model):
    kind, cfg, out = kind_run
    module = trained(cfg, out)
    assert module.adapter_kind == {"locon": "lora"}.get(kind, kind)
    want = model_updates(module.unet, "default")
    unet, net = lycoris_unet(tiny_model, out / "adapter" / KOHYA_FILE)
    names = {kohya_key(module.family, "unet", n, module.unet.config) for n in want}
    assert {m.lora_name for m in net.unet_loras} == names          # every trained layer, nothing else
    got, ref = unet_output(unet, module), unet_output(module.unet, module)
    assert ((got - ref).norm() / ref.norm()).item() < 1e-5, kind
    base = unet_output(UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet"), module)
    assert ((base - ref).norm() / ref.norm()).item() > 1e-4        # the adapter matters at this scale


@pytest.mark.parametrize("factor, both", [(-1, False), (2, False), (4, True)])
def test_lokr_layers_of_any_decompose_factor_load_whole(factor, both):
    """A LoKr trained with a decompose factor other than peft's default (the study's r 16, factor 2)
    must load into layers of the same split, not fail or load some other shape."""
    from peft import LoKrConfig, inject_adapter_in_model

    def net():
        return torch.nn.Sequential(torch.nn.Linear(64, 320), torch.nn.Conv2d(320, 64, 3))

    torch.manual_seed(0)
    cfg = LoKrConfig(r=4, alpha=4, target_modules=["0", "1"], decompose_factor=factor, decompose_both=both,
                     init_weights=False)
    trained = inject_adapter_in_model(cfg, net())
    layers = layers_from_model(trained)
    fresh = net()
    fresh.load_state_dict({k: v for k, v in trained.state_dict().items() if "lokr" not in k}, strict=False)
    inject(fresh, "loaded", layers)
    cmp = compare_updates(model_updates(trained, "default"), model_updates(fresh, "loaded"))
    assert cmp.compared == 2 and cmp.ok(1e-6), cmp.describe()


def test_adapter_type_loads_verified_for_sampling(kind_run, tiny_model):
    kind, cfg, out = kind_run
    module = trained(cfg, out)
    pipe = DiffusionPipeline.from_pretrained(tiny_model)
    [loaded] = load_adapters(pipe, module.family, [out / "adapter"])
    assert loaded.format == ("diffusers" if kind in ("locon", "dora") else "kohya")   # auto formats
    cmp = compare_updates(model_updates(module.unet, "default"), model_updates(pipe.unet, "a0"))
    assert cmp.compared and cmp.ok(1e-6), cmp.describe()
    if kind == "dora":
        cmp = compare_updates(model_magnitudes(module.unet, "default"), model_magnitudes(pipe.unet, "a0"))
        assert cmp.compared and cmp.ok(1e-6), cmp.describe()
    if kind in ("loha", "lokr"):
        assert not (out / "adapter" / "pytorch_lora_weights.safetensors").exists()


@pytest.mark.parametrize("kind", ["loha", "lokr"])
def test_a_format_that_cannot_carry_the_type_is_refused(kind, tiny_model, imagefolder_data, tmp_path):
    cfg = compose_cfg(overrides(tiny_model, imagefolder_data, tmp_path, *KINDS[kind], "trainer.max_steps=1",
                                "callbacks.adapter_export.formats=[diffusers]"), tmp_path)
    with pytest.raises(ValueError, match=f"a {kind} adapter cannot be written in the \\['diffusers'\\] format"):
        train.run(cfg)


def test_every_type_and_ema_resume_bit_identically(kind_run, tiny_model, imagefolder_data, tmp_path):
    kind, _, _ = kind_run
    ema = ["callbacks.ema.decay=0.9", "trainer.max_steps=6", "trainer.deterministic=true"]
    common = overrides(tiny_model, imagefolder_data, tmp_path / "x", *KINDS[kind], *ema)
    ref = tmp_path / "ref"
    train.run(compose_cfg([*common, f"hydra.run.dir={ref}"], ref))
    run = tmp_path / "run"
    train.run(compose_cfg([*common, f"hydra.run.dir={run}", "trainer.max_steps=4"], run))
    train.run(compose_cfg([*common, f"hydra.run.dir={run}", "ckpt_path=last"], run))
    for variant in ("raw", "ema"):
        a, b = (load_file(resolve_adapter(d, variant)) for d in (ref, run))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), (kind, variant)
    raw, avg = (load_file(resolve_adapter(ref, v)) for v in ("raw", "ema"))
    assert any(not torch.equal(raw[k], avg[k]) for k in raw)       # the average is not the last weights


def test_ema_is_the_average_of_the_trained_weights(tiny_model, imagefolder_data, tmp_path):
    """The exported EMA equals diffusers' EMA rule applied to the weights after each step."""
    from tests.helpers import RecordLoRA

    cfg = compose_cfg(overrides(tiny_model, imagefolder_data, tmp_path, "callbacks.ema.decay=0.8",
                                "callbacks.ema.every_n_steps=2", "trainer.max_steps=6",
                                "+callbacks.record._target_=tests.helpers.RecordLoRA"), tmp_path)
    train.run(cfg)
    steps = RecordLoRA.history   # step -> trainable tensors after that optimizer step
    avg, n = None, 0
    for step in sorted(steps):
        if step % 2:
            continue
        n += 1
        d = min(0.8, (1 + (n - 1)) / (10 + (n - 1))) if n > 1 else 0.0
        avg = {k: v.clone() for k, v in steps[step].items()} if avg is None else \
            {k: d * avg[k] + (1 - d) * v for k, v in steps[step].items()}
    module = trained(cfg, tmp_path)
    pipe = DiffusionPipeline.from_pretrained(tiny_model)
    load_adapters(pipe, module.family, [tmp_path], variant="ema")
    for name, tensor in avg.items():   # name: unet.<module>.lora_A.default.weight
        mod, _, param = name[len("unet."):].rpartition(".lora_")
        loaded = pipe.unet.get_submodule(mod).lora_A["a0"] if param.startswith("A") else \
            pipe.unet.get_submodule(mod).lora_B["a0"]
        torch.testing.assert_close(loaded.weight, tensor, rtol=1e-6, atol=1e-7)


def test_optimizers(tiny_model, imagefolder_data, tmp_path):
    cfg = compose_cfg(overrides(tiny_model, imagefolder_data, tmp_path / "p", "module/optimizer=prodigy",
                                "module.optimizer.lr=1.0", "trainer.max_steps=3"), tmp_path / "p")
    assert np.isfinite(train.run(cfg)["train/loss"])
    cfg = compose_cfg(overrides(tiny_model, imagefolder_data, tmp_path / "f", "module.optimizer.foreach=true",
                                "trainer.max_steps=2"), tmp_path / "f")
    assert np.isfinite(train.run(cfg)["train/loss"])
    cfg = compose_cfg(overrides(tiny_model, imagefolder_data, tmp_path / "b", "module/optimizer=adamw8bit",
                                "trainer.max_steps=1"), tmp_path / "b")
    with pytest.raises(ValueError, match="8-bit AdamW .* CUDA GPUs only"):
        train.run(cfg)


def test_tag_captions_shuffle_reproducibly_and_bypass_the_text_cache(tiny_model, tmp_path, caplog):
    policy = TagPolicy(shuffle=True, keep_tokens=1, dropout=0.3)
    caption = "mychar, red hair, smiling, outdoors, night, rain, hat"
    draws = [tag_caption(caption, policy, np.random.default_rng([0, e, 3, 1])) for e in range(20)]
    assert draws == [tag_caption(caption, policy, np.random.default_rng([0, e, 3, 1])) for e in range(20)]
    assert all(d.split(", ")[0] == "mychar" for d in draws)             # the kept token stays first
    assert len(set(draws)) > 10 and any(len(d.split(", ")) < 7 for d in draws)   # shuffled, some tags dropped
    assert all(set(d.split(", ")) <= set(caption.split(", ")) for d in draws)
    assert tag_caption(caption, TagPolicy(), np.random.default_rng(0)) == caption
    data = tmp_path / "tags"
    data.mkdir()
    from PIL import Image
    for i in range(8):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (32, 32, 3), np.uint8)).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text(f"tok{i}, a, b, c, d")
    cfg = compose_cfg(overrides(tiny_model, data, tmp_path / "run", "data.tags.shuffle=true", "data.tags.keep_tokens=1",
                                "trainer.max_steps=2", "data.val_fraction=0"), tmp_path / "run")
    with caplog.at_level("INFO"):
        train.run(cfg)
    assert "text-embedding cache off: tag shuffling" in caplog.text


def test_objective_options_train_and_zero_snr_needs_v(tiny_model, tiny_model_v, imagefolder_data, tmp_path):
    opts = ["module.objective.loss.kind=huber", "module.objective.timesteps.scheme=logit_normal",
            "module.objective.debiased_estimation=true", "module.objective.input_perturbation=0.1",
            "module.objective.zero_terminal_snr=true", "trainer.max_steps=3"]
    cfg = compose_cfg(overrides(tiny_model_v, imagefolder_data, tmp_path / "v", *opts), tmp_path / "v")
    module = instantiate(cfg.module)
    assert module.noise_scheduler.alphas_cumprod[-1] < 1e-6           # the schedule reaches SNR 0
    assert np.isfinite(train.run(cfg)["train/loss"])
    with pytest.raises(Exception, match="zero_terminal_snr=true needs a v-prediction model"):
        instantiate(compose_cfg(overrides(tiny_model, imagefolder_data, tmp_path / "e", *opts), tmp_path / "e").module)


def test_masked_loss_uses_each_images_mask_naive_and_cached(tiny_model, tmp_path):
    """RGBA images whose alpha hides the right half: the batch's mask is that half (cut and flipped
    with the image), the cached path serves the same mask on the latent grid, and the loss ignores
    what the mask hides."""
    from PIL import Image

    from toolkit.models import objectives

    data = tmp_path / "rgba"
    data.mkdir()
    for i in range(8):
        rgba = np.random.default_rng(i).integers(0, 255, (32, 48, 4), np.uint8)
        rgba[..., 3] = 255
        rgba[:, 24:, 3] = 0                                   # right half transparent: not learned
        Image.fromarray(rgba, "RGBA").save(data / f"{i}.png")
        (data / f"{i}.txt").write_text(f"image {i}")
    common = ["data.masks=alpha", "module.objective.masked_loss=true", "data.val_fraction=0", "data.random_flip=true",
              "trainer.max_steps=2", "data.resolution=16"]
    cfg = compose_cfg(overrides(tiny_model, data, tmp_path / "run", *common), tmp_path / "run")
    dm = instantiate(cfg.data)
    dm.setup("fit")
    for e in range(4):   # 48x32 resized to 24x16, centre crop 16x16: columns 4..19, the mask edge at column 8
        item = dm.train_set[(e, 0)]
        m = item["mask"][0]
        left, right = m[:, :7].mean().item(), m[:, 9:].mean().item()
        assert (left > 0.99 and right < 0.01) or (left < 0.01 and right > 0.99)   # flipped with its image
    naive = {e: dm.train_set[(e, 0)]["mask"] for e in range(4)}
    train.run(cfg)   # cached path: masks stored on the latent grid
    module = instantiate(cfg.module)
    from tests.helpers import one_process_trainer
    from toolkit.callbacks.encoded_cache import EncodedCache

    trainer = one_process_trainer(dm)
    EncodedCache(cfg.callbacks.encoded_cache.dirpath).on_fit_start(trainer, module)   # reads the run's cache
    for e, m in naive.items():   # the cached mask is the naive one averaged to the 8x8 latent grid
        cached = dm.train_set[(e, 0)]
        assert "latent_params" in cached and cached["mask"].shape == (1, 8, 8)
        want = objectives.latent_mask(m[None], (8, 8))[0]
        torch.testing.assert_close(cached["mask"], want, atol=1e-3, rtol=0)   # float16 storage
    dm.train_set.latents = None
    batch = next(iter(dm.train_dataloader()))
    assert "pixel_values" in batch and batch["mask"].shape[-2:] == (16, 16)
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    lm = objectives.latent_mask(batch["mask"], (8, 8))
    assert (lm < 1e-6).any() and (lm > 0.5).any()   # some latent pixels masked out, some kept
    changed = pred + 100 * (lm < 1e-6).float() * torch.randn(4, 4, 8, 8, generator=g)
    assert objectives.weighted_loss(changed, target, mask=lm) == objectives.weighted_loss(pred, target, mask=lm)
    with pytest.raises(Exception, match="masked_loss=False but data.masks='alpha'"):
        bad = compose_cfg(overrides(tiny_model, data, tmp_path / "bad", "data.masks=alpha", "data.val_fraction=0",
                                    "trainer.max_steps=1"), tmp_path / "bad")
        train.run(bad)
    assert module.objective.masked_loss


def test_prior_preservation_mixes_cached_class_images(tiny_model, imagefolder_data, tmp_path, caplog):
    from toolkit.models import objectives

    prior = ["callbacks.prior.class_prompt=a photo of a shape", "callbacks.prior.num_images=4",
             "callbacks.prior.steps=2", "callbacks.prior.loss_weight=0.5",
             f"callbacks.prior.dirpath={tmp_path / 'cls'}",
             "trainer.max_steps=2"]
    cfg = compose_cfg(overrides(tiny_model, imagefolder_data, tmp_path / "a", *prior,
                                "+callbacks.record._target_=tests.helpers.RecordBatches"), tmp_path / "a")
    with caplog.at_level("INFO"):
        train.run(cfg)
    assert "4 class images of 'a photo of a shape' (4 generated now)" in caplog.text
    from tests.helpers import RecordBatches

    batch = RecordBatches.batches[0]
    assert batch["captions"][4:] == ["a photo of a shape"] * 4 and batch["prior"].tolist() == [0] * 4 + [1] * 4
    assert "latent_params" in batch                                   # class images come from the latent cache too
    w = objectives.prior_weights(batch["prior"], 0.5)
    per = torch.arange(8.0)
    assert (per * w).mean() == pytest.approx(per[:4].mean() + 0.5 * per[4:].mean())
    caplog.clear()
    with caplog.at_level("INFO"):   # a second run with the same base model reuses the images
        train.run(compose_cfg(overrides(tiny_model, imagefolder_data, tmp_path / "b", *prior), tmp_path / "b"))
    assert "(0 generated now)" in caplog.text
    # two processes: generation sharded, identical adapters on both ranks
    from tests.conftest import run_entry

    out = tmp_path / "ddp"
    res = run_entry(overrides(tiny_model, imagefolder_data, out, *prior[:-1], "trainer.max_steps=2", "trainer=ddp",
                              "trainer.devices=2", f"callbacks.prior.dirpath={tmp_path / 'cls2'}",
                              "+callbacks.dump._target_=tests.helpers.DumpRankLoRA",
                              f"+callbacks.dump.dirpath={out}/ranks"))
    assert res.returncode == 0, res.stderr[-3000:]
    r0, r1 = (load_file(out / "ranks" / f"rank{r}.safetensors") for r in (0, 1))
    assert all(torch.equal(r0[k], r1[k]) for k in r0)
    assert len(list((tmp_path / "cls2").rglob("*.png"))) == 4


def test_fused_adapters_draw_what_unfused_ones_draw(kind_run, tiny_model, tmp_path):
    """Sampling and evaluation bake the verified adapter into the weights (faster): same images."""
    from toolkit.inference.pipeline import generate, load_pipeline

    _, _, out = kind_run
    pipes = [load_pipeline(tiny_model, adapters=[out], lora_scales=[0.8], fuse_adapters=f) for f in (False, True)]
    imgs = [np.stack([np.asarray(im, np.int16) for im in generate(p, ["a red circle", "a blue square"], [0, 1], 3,
                                                                     5.0, height=16, width=16, progress=False)])
            for p in pipes]
    assert np.abs(imgs[0] - imgs[1]).max() <= 1
    base = load_pipeline(tiny_model)
    plain = np.stack([np.asarray(im, np.int16) for im in generate(base, ["a red circle", "a blue square"], [0, 1], 3,
                                                                   5.0, height=16, width=16, progress=False)])
    assert np.abs(imgs[1] - plain).max() > 1                    # and the adapter is in them
    assert not any("lora_" in n or "hada_" in n or "lokr_" in n for n, _ in pipes[1].unet.named_parameters())
