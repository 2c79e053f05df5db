"""The memory plan and the budget: estimates against the measured peaks of fresh processes (CPU)
and of the H200 runs recorded in bench/results (GPU mode), batches taken from memory.budget_gib
that leave the results as they were, and a plan that refuses before anything loads."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from PIL import Image

from tests.conftest import compose_cfg, run_entry, tiny_overrides
from toolkit.config import ROOT
from toolkit.models import footprints as fp
from toolkit.models.memory import Footprint, GiB, LiveBytes, Memory, OutOfBudget, largest_batch


def test_the_tracer_counts_what_ops_allocate_and_not_the_weights_they_view():
    lin = torch.nn.Linear(256, 512, bias=False)
    x = torch.zeros(8, 256)
    with LiveBytes(lin.parameters()) as live:   # linear views its weight (t()): no new memory
        y = lin(x)
        z = y * 2
        del y
    assert live.peak == 2 * 8 * 512 * 4 and live.live == 8 * 512 * 4   # y and z together, then z alone
    del z


def test_budget_arithmetic_and_refusal():
    cost = Footprint(fixed=100, per_item=10)
    assert largest_batch(cost, 155, 64) == 5 and largest_batch(cost, 99, 64) == 0 and largest_batch(cost, 1e9, 7) == 7
    mem = Memory(budget_gib=1.0)
    assert mem.batch(Footprint(0, GiB // 4), GiB // 2, 64, "x", "") == 2
    with pytest.raises(OutOfBudget, match=r"encoding: one item needs .* more than memory.budget_gib=1\. raise it"):
        mem.batch(Footprint(0, GiB), GiB // 2, 64, "encoding", "raise it")
    with pytest.raises(ValueError, match="memory.plan"):
        Memory(plan="sometimes")


def test_a_convolution_holds_scratch_the_size_of_its_larger_operand_while_it_runs():
    # measured on oneDNN (toolkit/models/memory.py: _SCRATCH); the VAE decoder's peak is made of it
    for cin, cout in ((8, 32), (32, 8)):
        conv, x = torch.nn.Conv2d(cin, cout, 3, padding=1), torch.zeros(1, cin, 64, 64)
        with torch.no_grad(), LiveBytes([*conv.parameters(), x]) as live:
            y = conv(x)
        out, larger = y.numel() * 4, max(cin, cout) * 64 * 64 * 4
        assert live.live == out and live.peak == out + larger, (cin, cout, live.peak)


# A fresh process per cell: the libraries, the weights at the layout's shapes, then one phase
# (bench/memory.py). tiny: the tests' SD; mid: SD-1.5's and SDXL's layouts at a quarter width;
# sd15 decode: the published VAE, whose peak is a full-resolution convolution's scratch.
CELLS = ["tiny_sd:step:fp32:64:8", "sd15_mid:encode:fp32:512:2", "sdxl_mid:step:fp32:256:2:ckpt",
         "sd15:decode:fp32:512:1"]


def test_cpu_estimates_are_within_15_percent_of_fresh_processes(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    procs = {c: subprocess.Popen([sys.executable, str(ROOT / "bench" / "memory.py"), "--cells", c, "--json", "-",
                                  "--traces", str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                                 text=True) for c in CELLS}
    rows = {}
    for c, p in procs.items():
        out, err = p.communicate(timeout=900)
        assert p.returncode == 0, err[-3000:]
        rows[c] = json.loads(out.strip().splitlines()[-1])[0]
    for c, r in rows.items():
        assert abs(r["total_error"]) <= 0.15, (c, r)   # what the plan prints: the process's peak
        # the phase alone, where it is large enough to measure: below ~256 MiB the libraries' own
        # scratch (oneDNN, autograd's engine: ~45 MiB in the checkpointed step) is the difference
        if r["phase_measured"] >= 256 * 2**20:
            assert abs(r["phase_error"]) <= 0.15, (c, r)
    assert rows["sd15_mid:encode:fp32:512:2"]["phase_measured"] >= 256 * 2**20   # one cell checks a phase alone


@pytest.mark.slow
@pytest.mark.parametrize(("result", "batch", "ckpt", "model"), [
    ("step_sdxl_b1_ckpt_h200.json", 1, True, "sdxl"), ("step_sdxl_b4_h200.json", 4, False, "sdxl"),
    ("step_sd15_b32_h200.json", 32, False, "sd15")])
def test_gpu_mode_matches_the_h200_measurements(result, batch, ckpt, model, tmp_path):
    """bench/step.py on one H200 (fp32 weights, bf16 autocast, LoRA r 4 on attention, AdamW, every
    component on the GPU): its torch.cuda.max_memory_allocated against the plan's gpu mode."""
    from functools import partial

    from bench.memory import LAYOUTS, lora, skeletons
    from toolkit.models.quantize import quantized_bytes

    measured = json.loads((ROOT / "bench" / "results" / result).read_text())["cached"]["peak_mem_gib"]
    spec, sk = LAYOUTS[model], skeletons(model)
    res = spec["res"]

    def adapt(unet):
        lora(unet)
        if ckpt:
            unet.enable_gradient_checkpointing()

    _, fields = fp.text_encode(spec["family"], sk["text"], torch.float32)
    st = fp.train_step(spec["family"], sk["unet"], fields, (res // 8, res // 8), batch, torch.float32,
                       partial(torch.optim.AdamW, lr=1e-4), adapt, f"r4-{ckpt}", "gpu", torch.bfloat16)
    weights = sum(quantized_bytes(m, None, torch.float32) for m in (sk["unet"], sk["vae"], *sk["text"]))
    estimate = (weights + st["adapter"] + st["activations"] + st["optimizer_state"]) / GiB
    assert abs(estimate / measured - 1) <= 0.15, (estimate, measured)


@pytest.fixture(scope="module")
def tiny_module(tiny_model, imagefolder_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("budget")
    cfg = compose_cfg(tiny_overrides(tiny_model, imagefolder_data, out) + [
        f"callbacks.encoded_cache.dirpath={out}/cache", "callbacks.encoded_cache.dtype=float32"], out)
    dm = instantiate(cfg.data)
    dm.setup("fit")
    return cfg, instantiate(cfg.module), dm, out


def test_encoding_takes_its_batch_from_the_budget_and_the_latents_do_not_depend_on_it(tiny_module, tmp_path, caplog):
    cfg, module, dm, _ = tiny_module
    vae = fp.skeleton_of(module.vae)
    per = fp.vae_encode(vae, (16, 16), torch.float32)
    resident = sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))
    room = lambda n: Memory(budget_gib=(resident + per.at(n) + 0.5) / GiB)   # room for n images, not n + 1
    rows = {}
    for name, mem in (("budget", room(3)), ("one", room(1)), ("free", None)):
        cache = instantiate(cfg.callbacks.encoded_cache, dirpath=str(tmp_path / name), memory=mem, text=False)
        caplog.clear()
        with caplog.at_level("INFO"):
            cache.encode(module, dm, {"rank": 0, "world_size": 1})
        store = dm.train_set.latents[0]
        rows[name] = np.stack([store.get(k) for k in sorted(store.index)])
        if name == "budget":
            assert "latent cache encoding (16x16, 1 variant(s) an image): batch 3 (memory.budget_gib=" in caplog.text
    # batch 3 and batch 1 against batch 64: the same latents to float rounding (convolutions sum in
    # another order at another batch: ~1e-6 here, not bit for bit)
    for name in ("budget", "one"):
        np.testing.assert_allclose(rows[name], rows["free"], rtol=1e-5, atol=1e-5)


def test_grids_and_features_do_not_depend_on_the_batch(tiny_module, tiny_clip):
    from toolkit.callbacks.sample_grid import vae_slicing
    from toolkit.inference.pipeline import generate
    from toolkit.inference.schedule import sampling_scheduler
    from toolkit.metrics.features import FeatureModel
    from toolkit.metrics.inception import InceptionFeatures

    _, module, _, _ = tiny_module
    pipe = module.family.pipeline(module.pipeline_components,
                                  sampling_scheduler("DDIMScheduler", module.noise_scheduler.config, None))
    pipe.set_progress_bar_config(disable=True)
    prompts, seeds = ["a red circle", "a blue square", "a green circle"], [0, 1, 2]
    with vae_slicing(module.vae):
        imgs = {b: np.stack([np.asarray(im, np.int16) for im in generate(pipe, prompts, seeds, 3, 5.0,
                                                                          batch_size=b, progress=False)])
                for b in (1, 3)}
    assert np.abs(imgs[1] - imgs[3]).max() <= 1   # within one uint8 level
    images = [Image.fromarray(np.uint8(i)) for i in imgs[3]]   # batch 1 against batch 3
    for extractor in (InceptionFeatures(batch_size=1), FeatureModel("clip", tiny_clip, batch_size=1)):
        one = extractor(images, progress=False)
        extractor.batch_size = len(images)
        all_at_once = extractor(images, progress=False)
        np.testing.assert_allclose(all_at_once, one, rtol=1e-5, atol=1e-6)


def test_the_plan_prints_before_loading_and_refuses_what_will_not_fit(tiny_model, imagefolder_data, tmp_path):
    args = tiny_overrides(tiny_model, imagefolder_data, tmp_path / "plan")
    res = run_entry([*args, "--plan"], timeout=600)
    out = res.stdout + res.stderr   # the log goes to the console (stdout) and the run's cli.log
    assert res.returncode == 0, out[-3000:]
    for phase in ("load", "encoding: latent cache", "encoding: text cache", "training step", "validation loss",
                  "sample grid (16 images)"):
        assert f"  {phase} " in out, phase
    assert "memory plan (cpu mode" in out and "data scan" not in out   # nothing else ran
    res = run_entry([*args, "memory.device_gib=0.05"], timeout=600)
    out = res.stdout + res.stderr
    assert res.returncode != 0 and "the memory plan refuses this run before loading anything" in out
    assert "training step needs" in out and "module.speed.gradient_checkpointing=true" in out
    assert "data scan" not in out and not (tmp_path / "plan" / "checkpoints").exists()
    # a budget above the card: the budgeted phase is refused naming the budget the card allows (in
    # process: the entry's path is the one above; the traces are cached by now)
    from toolkit.plan import build

    cfg = compose_cfg(args + ["memory.mode=gpu", "memory.device_gib=0.012", "memory.budget_gib=1"], tmp_path / "gpu")
    problems = "\n".join(build(cfg).problems)
    assert "encoding: latent cache needs" in problems and "set memory.budget_gib to at most 0.01 " in problems
    # cpu mode with glibc's default allocator: said, and a phase within its slack of the memory is "tight"
    # (not refused); with the policy (the entry sets MALLOC_MMAP_THRESHOLD_) neither
    from toolkit.plan import GLIBC_SLACK, render

    cpu = compose_cfg(args + ["memory.mode=cpu"], tmp_path / "cpu")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
        plan = build(cpu)
        step = next(r for r in plan.rows if r.phase == "training step")
        plan.device = int(plan.total(step) * (1 + GLIBC_SLACK) / 2)
        text = "\n".join(render(plan))
        assert "allocator: glibc's default" in text and "TOOLKIT_LEAN_MALLOC=1" in text
        assert plan.verdict(step) == "fits (tight: see the allocator note)" and not plan.problems
        mp.setenv("MALLOC_MMAP_THRESHOLD_", "131072")
        lean = build(cpu)
        lean.device = plan.device
        assert "allocator" not in "\n".join(render(lean)) and lean.verdict(step) == "fits"


def test_cached_text_encoders_leave_the_gpu_under_ddp_and_ddp_leaves_their_buffers_alone(tiny_module, tmp_path):
    """A GPU run moves cached text encoders to host memory, under DDP too: DDP broadcasts every buffer
    it holds before each forward (over NCCL: GPU tensors only), so it must not hold theirs; their
    weights are still broadcast once, from rank 0, when DDP wraps the module."""
    from types import SimpleNamespace

    import lightning as L
    import torch.distributed as dist
    from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, SingleDeviceStrategy
    from torch.nn.parallel import DistributedDataParallel

    from toolkit.plan import build

    cfg = tiny_module[0]
    module = instantiate(cfg.module)
    module.trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    module.setup("fit")   # what Lightning calls before its DDP strategy wraps the module
    prefixes = tuple(f"{e}." for e in module.family.text_encoders)
    text_buffers = {n for n, _ in module.named_buffers() if n.startswith(prefixes)}
    assert text_buffers and set(module._ddp_params_and_buffers_to_ignore) == text_buffers   # CLIP's position ids
    assert not dist.is_initialized()
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        ddp = DistributedDataParallel(module)
        held = {id(b) for b in ddp.modules_buffers}
        assert not any(id(b) in held for n, b in module.named_buffers() if n.startswith(prefixes))
        assert not ddp.parameters_to_ignore & {n for n, _ in module.named_parameters()}   # weights: from rank 0
    finally:
        dist.destroy_process_group()
    # released on a GPU under DDP on several processes; kept under a strategy that shards or holds them
    deepspeed = DeepSpeedStrategy.__new__(DeepSpeedStrategy)   # a DDPStrategy subclass (deepspeed not installed)
    for strategy, released in ((DDPStrategy(), True), (SingleDeviceStrategy("cpu"), False), (deepspeed, False)):
        module.text_encoders_released = False
        module._trainer = SimpleNamespace(world_size=8, strategy=strategy)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(type(module), "device", property(lambda self: torch.device("cuda")))
            module.release_text_encoders()
        assert module.text_encoders_released is released, strategy
    module.text_encoders_released = False
    # the plan counts them off the GPU in the step under DDP, on the device under another strategy
    args = ["memory.mode=gpu", "trainer.devices=2"]
    base = tiny_overrides(str(cfg.model.name_or_path), str(cfg.data.path), tmp_path / "plan")
    target = "{_target_:lightning.pytorch.strategies.DDPStrategy}"
    for n, (strategy, note) in enumerate((("ddp", True), ("fsdp", False), ("deepspeed", False), (target, True))):
        plan = build(compose_cfg(base + args + [f"+trainer.strategy={strategy}"], tmp_path / f"s{n}"))
        step = next(r for r in plan.rows if r.phase == "training step")
        assert ("text encoders off the GPU" in step.note) is note, (strategy, step.note)
