"""The training path, driven through the real config and entry point on a tiny random pipeline."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import DiffusionPipeline
from hydra.utils import instantiate
from safetensors.torch import load_file

from tests.conftest import compose_cfg, run_entry, tiny_overrides
from toolkit.config import CONFIG_DIR
from toolkit.tasks import train


def build(cfg):
    dm, module = instantiate(cfg.data), instantiate(cfg.module)
    trainer = instantiate(cfg.trainer, logger=False, enable_checkpointing=False, callbacks=[])
    return dm, module, trainer


@pytest.mark.parametrize("model_fixture", ["tiny_model", "tiny_model_v", "tiny_sdxl"])
def test_only_lora_changes(request, model_fixture, sidecar_data, tmp_path):
    model = request.getfixturevalue(model_fixture)
    cfg = compose_cfg(tiny_overrides(model, sidecar_data, tmp_path) + ["module.objective.snr_gamma=5",
                                                                        "module.objective.noise_offset=0.05"],
                      tmp_path)
    dm, module, trainer = build(cfg)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    lora = set(module.trainable_state_dict())
    assert lora and all("lora_" in k for k in lora)
    trainer.fit(module, datamodule=dm)
    after = module.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and changed <= lora                    # something trained, only LoRA
    assert all(torch.equal(before[k], after[k]) for k in before if k not in lora)  # base bit-identical


@pytest.mark.parametrize("model_fixture", ["tiny_model", "tiny_sdxl"])
def test_loss_decreases_when_overfitting(request, model_fixture, imagefolder_data, tmp_path):
    cfg = compose_cfg(tiny_overrides(request.getfixturevalue(model_fixture), imagefolder_data, tmp_path) + [
        "data.val_fraction=0", "data.validation_split=train",  # validate on the training images
        "module.lora.r=16", "module.lora.alpha=16", "module.optimizer.lr=3e-3",
        "module.objective.caption_dropout=0", "trainer.max_steps=60", "trainer.val_check_interval=1000",
    ], tmp_path)
    dm, module, trainer = build(cfg)
    before = trainer.validate(module, datamodule=dm, verbose=False)[0]["val/loss"]
    trainer.fit(module, datamodule=dm)
    after = trainer.validate(module, datamodule=dm, verbose=False)[0]["val/loss"]
    assert after < 0.9 * before, (before, after)


@pytest.mark.parametrize("model_fixture", ["tiny_model", "tiny_sdxl"])
def test_train_task_writes_adapter_that_stock_pipeline_loads(request, model_fixture, csv_data, tmp_path):
    tiny_model = request.getfixturevalue(model_fixture)
    out = tmp_path / "run"
    cfg = compose_cfg(tiny_overrides(tiny_model, csv_data, out) + ["module.optimizer.lr=1e-2"], out)
    metrics = train.run(cfg)
    assert metrics["global_step"] == 4 and metrics["train/loss"] > 0
    ckpts = sorted(p.name for p in (out / "checkpoints").glob("*.ckpt"))
    assert ckpts == ["last.ckpt", "step=2.ckpt", "step=4.ckpt"]
    # checkpoint = LoRA tensors + optimizer/loop state, never the frozen base
    ck = torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)
    assert ck["state_dict"] and all("lora_" in k for k in ck["state_dict"])
    assert ck["optimizer_states"] and ck["loops"]
    assert (out / "checkpoints/adapters/step=2/pytorch_lora_weights.safetensors").is_file()
    assert sorted(p.name for p in (out / "samples").glob("*.png")) == ["step=2.png", "step=4.png"]

    kw = {"num_inference_steps": 3, "height": 16, "width": 16, "output_type": "np"}
    pipe = DiffusionPipeline.from_pretrained(tiny_model)   # the model's own pipeline class (SD or SDXL)
    run = lambda **extra: pipe("a red circle", generator=torch.Generator().manual_seed(0), **kw,
                               **extra).images
    base = run()
    pipe.load_lora_weights(out / "adapter")
    tuned = run()
    assert torch.tensor(abs(tuned - base)).max() > 1e-4  # the adapter changes the output
    zero = run(cross_attention_kwargs={"scale": 0.0})
    assert abs(zero - base).max() < 1e-5                  # LoRA scale 0 == base

    # a fresh run must not write over this run's checkpoints
    with pytest.raises(FileExistsError, match="ckpt_path=last"):
        train.run(compose_cfg(tiny_overrides(tiny_model, csv_data, out), out))


def test_resume_continues_step_and_optimizer(tiny_model, sidecar_data, tmp_path):
    out = tmp_path / "run"
    train.run(compose_cfg(tiny_overrides(tiny_model, sidecar_data, out), out))
    first = torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)
    metrics = train.run(compose_cfg(tiny_overrides(tiny_model, sidecar_data, out) + [
        "ckpt_path=last", "trainer.max_steps=6"], out))
    assert metrics["global_step"] == 6
    resumed = torch.load(out / "checkpoints" / "step=6.ckpt", weights_only=False)
    steps = lambda ck: {s["step"].item() for s in ck["optimizer_states"][0]["state"].values()}
    assert steps(first) == {4} and steps(resumed) == {6}  # Adam moments carried over, not reset


@pytest.mark.parametrize("model_fixture", ["tiny_model", "tiny_sdxl"])
def test_text_encoder_lora_and_full_targets(request, model_fixture, imagefolder_data, tmp_path):
    cfg = compose_cfg(tiny_overrides(request.getfixturevalue(model_fixture), imagefolder_data, tmp_path) + [
        "module=lora_full", "module.speed.gradient_checkpointing=true"], tmp_path)
    dm, module, trainer = build(cfg)
    names = set(module.trainable_state_dict())
    for enc in module.family.text_encoders:   # SDXL: both encoders
        assert any(k.startswith(f"{enc}.") for k in names)
    assert any(".ff.net." in k for k in names) and any("conv1" in k for k in names)
    before = {e: {k: v.clone() for k, v in getattr(module, e).state_dict().items() if "lora_B" in k}
              for e in module.family.text_encoders}
    trainer.fit(module, datamodule=dm)
    for e, te_before in before.items():
        te_after = getattr(module, e).state_dict()
        assert any(not torch.equal(v, te_after[k]) for k, v in te_before.items())


@pytest.mark.parametrize("model_fixture", ["tiny_model", "tiny_sdxl"])
def test_ddp_two_processes_keep_identical_lora(request, model_fixture, imagefolder_data, tmp_path):
    tiny_model = request.getfixturevalue(model_fixture)
    out = tmp_path / "ddp"
    res = run_entry(tiny_overrides(tiny_model, imagefolder_data, out) + [
        "trainer=ddp", "trainer.devices=2", "trainer.max_steps=3",
        "+callbacks.dump._target_=tests.helpers.DumpRankLoRA", f"+callbacks.dump.dirpath={out}/ranks",
    ])
    assert res.returncode == 0, res.stderr[-3000:]
    r0, r1 = (load_file(out / "ranks" / f"rank{r}.safetensors") for r in (0, 1))
    assert r0.keys() == r1.keys() and all(torch.equal(r0[k], r1[k]) for k in r0)
    init = load_file(out / "checkpoints" / "adapters" / "step=2" / "pytorch_lora_weights.safetensors")
    assert init  # rank zero exported
    assert (out / "adapter" / "pytorch_lora_weights.safetensors").is_file()


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml")))
def test_every_experiment_composes_and_instantiates(experiment, tiny_model, imagefolder_data, tmp_path):
    # a reference set and CLIP for the experiments that evaluate: the miniature's fit only the miniature
    cfg = compose_cfg([f"experiment={experiment}", f"model.name_or_path={tiny_model}",
                       f"data.path={imagefolder_data}", f"++eval.dataset={imagefolder_data}",
                       "++metrics.clip_model=null"], tmp_path)
    assert cfg.task_name
    if cfg.task_name == "train":
        instantiate(cfg.data)
        instantiate(cfg.module)
        cpu = {} if torch.cuda.is_available() else {"accelerator": "cpu"}  # gpu configs on CPU CI
        instantiate(cfg.trainer, logger=False, **cpu)
    for cb in cfg.get("callbacks", {}).values():
        instantiate(cb)


def test_default_config_composes(tmp_path):
    cfg = compose_cfg([], tmp_path)
    assert cfg.task_name == "finetune_eval" and Path(cfg.data.path).name == "train"
    assert Path(cfg.eval.dataset).name == "test"  # evaluated on the held-out split


def test_tensorboard_logger_gets_scalars_and_sample_grids(tiny_model, imagefolder_data, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = compose_cfg(tiny_overrides(tiny_model, imagefolder_data, tmp_path) + ["logger=tensorboard"], tmp_path)
    train.run(cfg)
    [events] = list((tmp_path / "tb").rglob("events.out.tfevents.*"))
    acc = EventAccumulator(str(events.parent), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    assert {"train/loss", "val/loss"} <= set(acc.Tags()["scalars"])
    assert [e.step for e in acc.Images("samples")] == [2, 4]
