"""A user's first real run: settings follow the model, every input is in its key, adapters carry
their schedule. Through the real entry point (run.py) where the choice happens there."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from safetensors import safe_open

from miniature.world import generate
from tests.conftest import compose_cfg, run_entry, tiny_overrides
from tests.tiny import build_tiny_pipeline
from toolkit.config import data_dir
from toolkit.model_defaults import EMBEDDED_MODEL, ModelDefaultsError, model_overrides
from toolkit.results import read_rows
from toolkit.tasks import eval as eval_task
from toolkit.tasks import sample as sample_task
from toolkit.tasks import train


@pytest.fixture(scope="module")
def other_size_model(tmp_path_factory) -> str:
    """An SD-layout model whose native size (12 x VAE factor 2 = 24 px) is not the miniature's 32."""
    return str(build_tiny_pipeline(tmp_path_factory.mktemp("models") / "tiny-sd-24", seed=3, sample_size=12))


GIVEN_GENERATION = ("generation.scheduler=DDIMScheduler", "generation.steps=25", "generation.guidance_scale=5")


def chosen(args: list[str]) -> dict[str, str]:
    return dict(a.split("=", 1) for a in model_overrides(args)[len(args):] if not a.startswith("+chosen."))


def test_train_on_a_user_model_gets_its_native_size_and_family_preset(other_size_model, imagefolder_data, tmp_path):
    out, cache = tmp_path / "run", tmp_path / "cache"
    res = run_entry(["task=train", f"model.name_or_path={other_size_model}", f"data.path={imagefolder_data}",
                     "data.global_batch_size=4", "data.val_fraction=0.25", "logger=none", "trainer.max_steps=2",
                     "trainer.val_check_interval=1", "trainer.limit_val_batches=1", "trainer.enable_progress_bar=false",
                     "callbacks.sample_grid.every_n_steps=100", f"hydra.run.dir={out}"],
                    env={"TOOLKIT_CACHE": str(cache)})
    assert res.returncode == 0, res.stderr[-3000:]
    log = res.stdout + res.stderr
    assert "chosen data.resolution=24: the model's native size (UNet sample_size 12 x VAE factor 2)" in log
    assert "chosen module=lora: the preset for the SD family" in log
    # the in-training grid shows the run's own captions, not the miniature's shapes
    assert "chosen callbacks.sample_grid.prompts=validation" in log
    assert "sample grid: 4 captions of the run's held-out images × 4 seeds" in log
    saved = yaml.safe_load((out / ".hydra" / "config.yaml").read_text())
    assert saved["data"]["resolution"] == 24
    assert saved["module"]["lora"]["target_modules"] == ["to_q", "to_k", "to_v", "to_out.0"]   # not the miniature's
    assert saved["module"]["optimizer"]["lr"] == 1e-4
    assert saved["chosen"]["data"]["resolution"].startswith("24:")
    latents = [np.load(f) for f in (cache / "encoded").glob("latents-*/*.npy")]
    assert latents and all(a.shape[-2:] == (12, 12) for a in latents)   # trained at 24 px: 12x12 latents


@pytest.mark.parametrize("which,preset,size", [("embedded", "lora_miniature", "32"), ("sdxl", "lora_sdxl", "16"),
                                               ("sd", "lora", "16")])
def test_preset_follows_the_family(which, preset, size, tiny_model, tiny_sdxl):
    model = {"embedded": str(Path(data_dir()) / EMBEDDED_MODEL), "sdxl": tiny_sdxl, "sd": tiny_model}[which]
    got = chosen(["task=train", f"model.name_or_path={model}"])
    assert got["module"] == preset and got["data.resolution"] == size
    assert got["callbacks.sample_grid.prompts"] == ("validation" if which != "embedded" else
                                                    str(Path(data_dir()) / "miniature/grid_prompts.txt"))
    assert chosen(["task=train", f"model.name_or_path={model}", "module=dora", "data.resolution=8",
                   "callbacks.sample_grid.prompts=[a cat]", *GIVEN_GENERATION]) == {}
    # a run saved before some settings were left to the model (its overrides carry the choices of then):
    # only what is still open is chosen when it resumes
    older = ["task=train", f"model.name_or_path={model}", f"module={preset}", f"+chosen.module={preset}: why",
             f"data.resolution={size}", f"+chosen.data.resolution={size}: why"]
    assert set(chosen(older)) == {"callbacks.sample_grid.prompts", *(g.split("=")[0] for g in GIVEN_GENERATION)}
    # one reopened on resume (given null again) is chosen again, its old reason replaced (Hydra refuses two)
    from toolkit.model_defaults import _compose

    reopened = model_overrides([*older, "data.resolution=null"])
    assert sum(a.startswith("+chosen.data.resolution=") for a in reopened) == 1
    assert str(_compose([a for a in reopened if "=" in a]).data.resolution) == size


def test_a_sweep_over_experiments_chooses_what_follows_each_cells_model(other_size_model, tiny_sdxl, imagefolder_data,
                                                                        tmp_path):
    """Two experiments of the user's own (their config folder on Hydra's search path), each naming a
    model of another family and native size: each cell trains at its own model's size with its own
    family's preset, chosen after the experiment applies, and saved with the cell (a resume replays it)."""
    conf = tmp_path / "my_conf"
    (conf / "experiment").mkdir(parents=True)
    for name, model in (("mine_sd", other_size_model), ("mine_xl", tiny_sdxl)):
        (conf / "experiment" / f"{name}.yaml").write_text(f"# @package _global_\nmodel:\n  name_or_path: {model}\n")
    sweep = tmp_path / "sweep"
    res = run_entry(["-m", "task=train", f"hydra.searchpath=[file://{conf}]", "experiment=mine_sd,mine_xl",
                     f"data.path={imagefolder_data}", "data.global_batch_size=4", "data.val_fraction=0.25",
                     "logger=none", "trainer.max_steps=1", "trainer.limit_val_batches=0",
                     "trainer.enable_progress_bar=false", "~callbacks.sample_grid", f"hydra.sweep.dir={sweep}"],
                    env={"TOOLKIT_CACHE": str(tmp_path / "cache")})
    assert res.returncode == 0, res.stderr[-3000:]
    log = res.stdout + res.stderr
    for cell, size, preset, targets in (("0", 24, "lora", ["to_q", "to_k", "to_v", "to_out.0"]),
                                        ("1", 16, "lora_sdxl", None)):
        saved = yaml.safe_load((sweep / cell / ".hydra" / "config.yaml").read_text())
        assert saved["data"]["resolution"] == size and saved["chosen"]["module"].startswith(f"{preset}:")
        assert f"module={preset}" in yaml.safe_load((sweep / cell / ".hydra" / "overrides.yaml").read_text())
        if targets:
            assert saved["module"]["lora"]["target_modules"] == targets   # the SD preset, not the miniature's
        assert json.loads((sweep / cell / "train_metrics.json").read_text())["global_step"] == 1
    assert "chosen data.resolution=24" in log and "chosen data.resolution=16" in log
    assert "chosen module=lora_sdxl: the preset for the SDXL family" in log


def test_default_job_on_another_model_never_uses_the_miniatures_test_set_or_clip(tiny_model, imagefolder_data,
                                                                                  tmp_path):
    base = [f"model.name_or_path={tiny_model}", f"data.path={imagefolder_data}", f"hydra.run.dir={tmp_path / 'r'}"]
    res = run_entry(base)
    assert res.returncode != 0 and "eval.dataset" in res.stderr and "holds out only 2 images" in res.stderr
    res = run_entry([*base, f"eval.dataset={imagefolder_data}"])
    assert res.returncode != 0 and "metrics.clip_model" in res.stderr and "fits only the embedded model" in res.stderr
    assert not (tmp_path / "r").exists()   # refused before anything ran
    with pytest.raises(ModelDefaultsError, match="task=eval has no training data"):
        model_overrides(["task=eval", f"model.name_or_path={tiny_model}"])


def test_held_out_images_are_the_reference_when_there_are_enough(tiny_model, tmp_path):
    data = generate(tmp_path / "data", n=400, seed=2, size=16)
    got = chosen([f"model.name_or_path={tiny_model}", f"data.path={data}", "data.val_fraction=0.5",
                  "metrics.clip_model=null"])
    assert got["eval.dataset"] == "held_out" and "eval.num_ref" not in got
    with pytest.raises(ModelDefaultsError, match="holds out only 40 images"):
        model_overrides([f"model.name_or_path={tiny_model}", f"data.path={data}", "metrics.clip_model=null"])
    # held_out evaluates against exactly the rows the datamodule keeps out of training
    out = tmp_path / "e"
    m = eval_task.run(compose_cfg(["task=eval", f"model.name_or_path={tiny_model}", f"data.path={data}",
                                   "data.val_fraction=0.02", "eval.dataset=held_out", "metrics.clip_model=null",
                                   f"metrics.cache_dir={tmp_path / 'c'}", "eval.num_images=4", "eval.steps=2",
                                   "metrics.interval_groups=4", "logger=none", f"hydra.run.dir={out}"], out))
    assert m["n_real"] == 8
    dm_cfg = compose_cfg(tiny_overrides(tiny_model, data, tmp_path / "t") + ["data.val_fraction=0.02"], tmp_path / "t")
    from hydra.utils import instantiate

    dm = instantiate(dm_cfg.data)
    dm.setup("fit")
    row = read_rows(out / "results.jsonl")[0]
    assert row["settings"]["dataset"]["held_out"]["val_fraction"] == 0.02
    import hashlib

    assert len(dm.val_set) == 8   # the prompts are the reference captions: the datamodule's held-out ones
    assert row["settings"]["prompts_sha256"] == hashlib.sha256(json.dumps(dm.val_set.captions()).encode()).hexdigest()


def eval_cfg(model: str, clip: str, data: Path, prompts: Path, out: Path, *extra: str):
    return compose_cfg(["task=eval", f"model.name_or_path={model}", f"metrics.clip_model={clip}",
                        f"eval.dataset={data}", f"eval.prompts={prompts}", f"metrics.cache_dir={out.parent / 'c'}",
                        "eval.num_images=6", "eval.steps=2", "metrics.interval_groups=6", "logger=none",
                        f"eval.results_file={out.parent / 'results.jsonl'}", f"hydra.run.dir={out}", *extra], out)


def test_every_input_of_an_eval_row_is_in_its_key(tiny_model, tiny_clip, tmp_path):
    import shutil

    import torch
    from transformers import CLIPModel

    data = generate(tmp_path / "ref", n=8, seed=4, size=32)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\n")
    clip = tmp_path / "clip"
    shutil.copytree(tiny_clip, clip)
    table = tmp_path / "results.jsonl"
    n = lambda: len(read_rows(table))
    eval_task.run(eval_cfg(tiny_model, clip, data, prompts, tmp_path / "a"))
    eval_task.run(eval_cfg(tiny_model, clip, data, prompts, tmp_path / "b"))
    assert n() == 1                                            # nothing changed: skipped
    prompts.write_text("a red circle\na green triangle\n")     # same path, other contents
    eval_task.run(eval_cfg(tiny_model, clip, data, prompts, tmp_path / "c"))
    assert n() == 2
    eval_task.run(eval_cfg(tiny_model, clip, data, prompts, tmp_path / "d", "metrics.reference_size=native"))
    assert n() == 3
    model = CLIPModel.from_pretrained(clip)                    # same path, other weights
    with torch.no_grad():
        model.visual_projection.weight.mul_(2)
    model.save_pretrained(clip)
    eval_task.run(eval_cfg(tiny_model, clip, data, prompts, tmp_path / "e", "metrics.reference_size=native"))
    assert n() == 4
    eval_task.run(eval_cfg(tiny_model, clip, data, prompts, tmp_path / "f", "eval.num_ref=6",
                           "metrics.reference_size=native"))
    assert n() == 5
    keys = [r["key"] for r in read_rows(table)]
    assert len(set(keys)) == 5
    refs = {json.dumps(r["files"]["reference_features"]) for r in read_rows(table)}
    assert len(refs) == 3   # generated size / native size / 6 images: three reference feature files


def test_cache_keys_hold_the_storage_dtype(tiny_model, imagefolder_data, tmp_path):
    cache = tmp_path / "cache"
    for dtype in ("float16", "float32"):
        out = tmp_path / dtype
        train.run(compose_cfg(tiny_overrides(tiny_model, imagefolder_data, out) + [
            "trainer.max_steps=1", f"callbacks.encoded_cache.dirpath={cache}",
            f"callbacks.encoded_cache.dtype={dtype}", "callbacks.sample_grid.every_n_steps=100"], out))
    for kind in ("latents", "text"):
        dirs = sorted(cache.glob(f"{kind}-*"))
        dtypes = {np.load(next(d.glob("*.npy"))).dtype.name for d in dirs}
        assert len(dirs) == 2 and dtypes == {"float16", "float32"}, (kind, dirs)


def test_zero_snr_adapter_samples_with_its_own_schedule(tiny_model_v, imagefolder_data, tmp_path):
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    out = tmp_path / "run"
    train.run(compose_cfg(tiny_overrides(tiny_model_v, imagefolder_data, out) + [
        "module.objective.zero_terminal_snr=true", "trainer.max_steps=2", "module.optimizer.lr=1e-2",
        "callbacks.sample_grid.every_n_steps=100"], out))
    adapter = out / "adapter" / "pytorch_lora_weights.safetensors"
    with safe_open(str(adapter), "pt") as f:
        schedule = json.loads(f.metadata()["toolkit_schedule"])
    assert schedule == {"prediction_type": "v_prediction", "rescale_betas_zero_snr": True,
                        "timestep_spacing": "trailing"}
    s = tmp_path / "s"
    sample_task.run(compose_cfg(["task=sample", f"model.name_or_path={tiny_model_v}", f"adapter={out}",
                                 "sample.steps=4", "sample.seeds=[0,1]", "sample.prompts=[a red circle]",
                                 "sample.fuse_adapters=false", f"hydra.run.dir={s}"], s))
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_v, safety_checker=None, requires_safety_checker=False)
    by_hand = DDIMScheduler.from_config(pipe.scheduler.config, rescale_betas_zero_snr=True,
                                        timestep_spacing="trailing")
    pipe.load_lora_weights(str(adapter.parent), weight_name=adapter.name)
    pipe.set_progress_bar_config(disable=True)
    for sched, same in ((by_hand, True), (DDIMScheduler.from_config(pipe.scheduler.config), False)):
        pipe.scheduler = sched
        for i, seed in enumerate((0, 1)):
            img = pipe(["a red circle"], generator=[torch.Generator("cpu").manual_seed(seed)], num_inference_steps=4,
                       guidance_scale=5.0, height=16, width=16, output_type="pil").images[0]
            diff = np.abs(np.asarray(img, np.int16) - np.asarray(Image.open(s / "samples" / f"{i:05d}.png"), np.int16))
            assert (diff.max() <= 1) == same, (seed, diff.max())


def test_one_paired_delta_everywhere_and_a_moved_run_still_pairs(tmp_path):
    """summarize's Δ = the default job's paired.json Δ under non-default groups / level / seed, after the
    run dir moved; a pair that is not one (other prompts, a cleared reference cache) is said so."""
    import shutil

    from toolkit.evaluation.pairing import pair

    out, cache = tmp_path / "run", tmp_path / "cache"
    res = run_entry(["debug=fast", "logger=none", "metrics.interval_groups=8", "metrics.level=0.9", "eval.seed=3",
                     f"hydra.run.dir={out}", f"metrics.cache_dir={cache}"], timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    paired = json.loads((out / "paired.json").read_text())
    moved = tmp_path / "elsewhere" / "run"
    shutil.move(out, moved)
    res = run_entry(["task=summarize", f"sweep={moved}", "baseline=base"])
    assert res.returncode == 0, res.stderr[-3000:]
    tuned = next(e for e in json.loads((moved / "summary.json").read_text())["table"] if not e["baseline"])
    assert tuned["delta_method"] == "paired jackknife over images"
    for m in ("fid", "kid", "clip_score"):
        assert tuned[f"delta_{m}"] == pytest.approx(paired[m]["delta"], rel=1e-12)
        assert tuned[f"delta_{m}_ci_low"] == pytest.approx(paired[m]["low"], rel=1e-12)
        assert tuned[f"delta_{m}_ci_high"] == pytest.approx(paired[m]["high"], rel=1e-12)
        assert tuned[f"delta_{m}_p"] == pytest.approx(paired[m]["p_value"], rel=1e-12)
    base, ft = read_rows(moved / "results.jsonl")
    assert pair(base, ft).reason is None
    other = {**ft, "settings": {**ft["settings"], "prompts_sha256": "0" * 64}}
    assert pair(base, other).reason == "prompts differ"
    for f in cache.glob("*.npy"):
        f.unlink()   # the reference features are gone: said, never an unpaired number passed off as paired
    assert "reference features" in pair(base, ft).reason
    res = run_entry(["task=summarize", f"sweep={moved}", "baseline=base"])
    assert res.returncode == 0, res.stderr[-3000:]
    assert "not paired: reference features" in (moved / "summary.md").read_text()


def test_report_has_training_curves_whatever_the_logger(tiny_model, imagefolder_data, tmp_path):
    from toolkit.report.collect import collect

    out = tmp_path / "run"
    res = run_entry(tiny_overrides(tiny_model, imagefolder_data, out)[:-1] + ["logger=wandb", f"hydra.run.dir={out}"],
                    env={"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path)})
    assert res.returncode == 0, res.stderr[-3000:]
    curves = collect(out).runs[0].curves
    assert [s for s, _ in curves["train/loss"]] == [0, 1, 2, 3] and "val/loss" in curves


def test_a_train_sweep_runs_again_skipping_finished_cells_and_resuming_interrupted_ones(tiny_model, imagefolder_data,
                                                                                       tmp_path):
    import shutil

    import torch
    from safetensors.torch import load_file

    from toolkit.run.history import history

    sweep = tmp_path / "sweep"
    args = ["-m", *[a for a in tiny_overrides(tiny_model, imagefolder_data, tmp_path)[:-1]], "logger=none",
            "callbacks.sample_grid.every_n_steps=100", f"hydra.sweep.dir={sweep}", "module.lora.r=2,4"]
    res = run_entry(args)
    assert res.returncode == 0, res.stderr[-3000:]
    first = load_file(sweep / "1" / "adapter" / "pytorch_lora_weights.safetensors")
    # cell 1 "interrupted" after its step-2 checkpoint: no final adapter, last.ckpt at step 2
    shutil.rmtree(sweep / "1" / "adapter")
    (sweep / "1" / "train_metrics.json").unlink()
    shutil.copy(sweep / "1" / "checkpoints" / "step=2.ckpt", sweep / "1" / "checkpoints" / "last.ckpt")
    (sweep / "1" / "checkpoints" / "step=4.ckpt").unlink()
    res = run_entry(args)
    assert res.returncode == 0, res.stderr[-3000:]
    log = res.stdout + res.stderr
    assert "finished earlier: reused" in log and "was interrupted: resuming from its last checkpoint" in log
    assert [h["event"] for h in history(sweep / "0")] == ["start", "rerun"]
    assert [(h["event"], h.get("ckpt_path")) for h in history(sweep / "1")] == [("start", None), ("rerun", None),
                                                                                ("resume", "last")]
    resumed = load_file(sweep / "1" / "adapter" / "pytorch_lora_weights.safetensors")
    assert resumed.keys() == first.keys() and all(torch.equal(resumed[k], first[k]) for k in first)


def test_a_ddp_train_and_evaluate_sweep_evaluates_each_cell_once_on_its_processes(tiny_model, imagefolder_data,
                                                                                 tmp_path):
    """Every cell of a multirun trains on 2 DDP processes and evaluates once, sharded over them (the
    launcher re-runs the cell, not the sweep, for the other rank; each cell starts its own ranks)."""
    evaldata = generate(tmp_path / "evaldata", n=8, seed=5, striped=True, size=32)
    sweep = tmp_path / "sweep"
    res = run_entry(["-m", "task=finetune_eval", f"model.name_or_path={tiny_model}",
                     f"data.path={imagefolder_data}", "data.resolution=16", "module=lora_miniature",
                     "data.global_batch_size=4", "data.val_fraction=0.25", "logger=none", "trainer.max_steps=2",
                     "trainer.val_check_interval=2", "trainer.limit_val_batches=1", "trainer.enable_progress_bar=false",
                     "callbacks.model_checkpoint.every_n_train_steps=2",
                     "callbacks.sample_grid.every_n_steps=0", "metrics.clip_model=null", f"eval.dataset={evaldata}",
                     "eval.num_images=8", "eval.steps=2", "eval.batch_size=4", "metrics.interval_groups=4",
                     "metrics.compute=[fid,kid,vendi]", f"hydra.sweep.dir={sweep}", "module.lora.r=2,4", "trainer=ddp",
                     "trainer.devices=2"], timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = read_rows(sweep / "results.jsonl")
    assert [len(r["settings"]["adapters"]) for r in rows] == [0, 1, 1]   # the base once, one row per cell
    assert all(r["protocol"]["world_size"] == 2 for r in rows)
    assert all((sweep / c / "summary.md").is_file() for c in ("0", "1"))


def test_the_sample_grid_shows_the_runs_own_captions(tiny_model, imagefolder_data, tmp_path):
    from hydra.utils import instantiate

    from toolkit.callbacks.sample_grid import SampleGrid

    cfg = compose_cfg(tiny_overrides(tiny_model, imagefolder_data, tmp_path), tmp_path)
    dm = instantiate(cfg.data)
    dm.setup("fit")
    grid = instantiate(cfg.callbacks.sample_grid)
    grid.setup(type("T", (), {"datamodule": dm})(), None, "fit")
    assert grid.prompts == list(dict.fromkeys(dm.val_set.captions()))[:4] and len(grid.seeds) == 4
    listed = SampleGrid(str(Path(data_dir()) / "miniature/grid_prompts.txt"), [0], 0, str(tmp_path))
    assert len(listed.prompts) == 4 and "striped" in listed.prompts[0]
