"""The training loop's overhead: ``task=train`` against a bare PyTorch loop over the same model,
batch, adapter, data loader and optimizer, naive and cached (the floor any trainer can reach).

    python bench/framework_tax.py                          # embedded miniature, CPU, default LoRA
    python bench/framework_tax.py --steps 160 --repeats 3 -- module=lora

Each side runs in a fresh process and times its own steps: img/s over the steps after
``--warmup`` (the toolkit through a timing callback added to the real config, which only reads
the clock at each batch start), so start-up, data scan, cache building and model loading are
left out. Toolkit and bare runs alternate (A B A B, ``--repeats`` pairs) and the median ratio of
the pairs is reported, so a drift of the shared machine's speed hits both sides of a pair alike.
The bare loop is ``for batch in loader: loss = module.diffusion_loss(batch); loss.backward();
clip_grad_norm_(1.0); opt.step(); sched.step(); opt.zero_grad()`` — the same maths the
LightningModule runs, with nothing around it. Prints img/s of each, and toolkit / bare ratios
(1.00 = no framework tax).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


class StepTimer:
    """A Lightning callback that writes the clock at each batch start to ``path`` (JSON) at the end."""

    def __new__(cls, path: str):   # built by Hydra; a real Callback subclass without importing Lightning here
        import lightning as L

        class _Timer(L.Callback):
            def __init__(self) -> None:
                self.times: list[float] = []

            def on_train_batch_start(self, *args: object) -> None:
                self.times.append(time.perf_counter())

            def on_train_end(self, *args: object) -> None:
                self.times.append(time.perf_counter())
                Path(path).write_text(json.dumps(self.times))

        return _Timer()


def rate(times: list[float], warmup: int, batch: int) -> float:
    """img/s over the steps after ``warmup`` (times: the clock at each batch start, then at the end)."""
    return (len(times) - 1 - warmup) * batch / (times[-1] - times[warmup])


def overrides(out: Path, steps: int, cached: bool, extra: list[str]) -> list[str]:
    flag = str(cached).lower()
    return ["task=train", f"hydra.run.dir={out}", "logger=none", f"trainer.max_steps={steps}",
            "trainer.val_check_interval=1000000", "trainer.limit_val_batches=0", "~callbacks.sample_grid",
            "callbacks.model_checkpoint.every_n_train_steps=1000000", "trainer.enable_progress_bar=false",
            f"callbacks.encoded_cache.latents={flag}", f"callbacks.encoded_cache.text={flag}", *extra]


def toolkit_run(out: Path, steps: int, cached: bool, extra: list[str], env: dict) -> list[float]:
    """Step times of one ``python run.py task=train`` process."""
    timer = ["+callbacks.step_timer._target_=bench.framework_tax.StepTimer", f"+callbacks.step_timer.path={out}.json"]
    res = subprocess.run([sys.executable, str(ROOT / "run.py"), *overrides(out, steps, cached, extra), *timer],
                         cwd=ROOT, env=env, capture_output=True, text=True)
    if res.returncode:
        sys.exit(f"task=train failed:\n{res.stderr[-4000:]}")
    return json.loads(Path(f"{out}.json").read_text())


def bare_run(out: Path, steps: int, cached: bool, extra: list[str], env: dict) -> list[float]:
    res = subprocess.run([sys.executable, __file__, "--bare", str(out), str(steps), str(cached), "--", *extra],
                         cwd=ROOT, env=env, capture_output=True, text=True)
    if res.returncode:
        sys.exit(f"bare loop failed:\n{res.stderr[-4000:]}")
    return json.loads(Path(f"{out}.json").read_text())


def bare(out: Path, steps: int, cached: bool, extra: list[str]) -> None:
    """The floor: the module's own loss in a plain loop (run in its own process by ``bare_run``)."""
    import torch
    from hydra.utils import instantiate

    from tests.conftest import compose_cfg
    from tests.helpers import one_process_trainer
    from toolkit.callbacks.encoded_cache import EncodedCache

    cfg = compose_cfg(overrides(out, steps, cached, extra), out)
    dm = instantiate(cfg.data)
    dm.setup("fit")
    module = instantiate(cfg.module)
    if cached:   # the same warm cache task=train reads (the toolkit runs first)
        EncodedCache(cfg.callbacks.encoded_cache.dirpath, dtype=cfg.callbacks.encoded_cache.dtype).on_fit_start(
            one_process_trainer(dm), module)
    module.train()
    module.vae.eval()
    for enc in module.text_encoders:
        enc.eval()
    params = module.denoiser_lora_params + module.text_lora_params
    opt = instantiate(cfg.module.optimizer)(params)
    sched = instantiate(cfg.module.lr_scheduler)(optimizer=opt, num_training_steps=steps)
    done, times = 0, []
    while done < steps:
        for batch in dm.train_dataloader():
            times.append(time.perf_counter())
            loss = module.diffusion_loss(batch)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            done += 1
            if done == steps:
                break
    times.append(time.perf_counter())
    Path(f"{out}.json").write_text(json.dumps(times))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--warmup", type=int, default=20, help="steps left out of the timing")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--bare", nargs=3, help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides (after --)")
    args = ap.parse_args()
    if args.bare:
        out, steps, cached = args.bare
        return bare(Path(out), int(steps), cached == "True", args.overrides)
    work = Path(tempfile.mkdtemp(prefix="tax-bench-"))
    env = {**os.environ, "TOOLKIT_CACHE": str(work / "cache"), "PYTHONPATH": str(ROOT), "WANDB_MODE": "offline",
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    extra = [f"data.global_batch_size={args.batch}", *args.overrides]
    report: dict = {"settings": {"steps": args.steps, "warmup": args.warmup, "repeats": args.repeats,
                                 "batch": args.batch, "overrides": args.overrides}}
    toolkit_run(work / "warmup", 2, True, extra, env)   # fills the cache (and the OS file cache) for all
    for path in ("naive", "cached"):
        cached = path == "cached"
        pairs = []   # toolkit, bare in turn: a drift of the machine's speed hits both sides of a pair
        for i in range(args.repeats):
            pairs.append(tuple(rate(fn(work / f"{name}-{path}-{i}", args.steps, cached, extra, env), args.warmup,
                                    args.batch) for name, fn in (("toolkit", toolkit_run), ("bare", bare_run))))
        report[path] = {"toolkit_img_per_s": round(statistics.median(t for t, _ in pairs), 2),
                        "bare_img_per_s": round(statistics.median(b for _, b in pairs), 2),
                        "toolkit_over_bare": round(statistics.median(t / b for t, b in pairs), 3),
                        "runs": [[round(t, 1), round(b, 1)] for t, b in pairs]}
    report["cached_over_bare_naive"] = round(report["cached"]["toolkit_img_per_s"]
                                             / report["naive"]["bare_img_per_s"], 3)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
