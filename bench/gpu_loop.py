"""The real training loop (``task=train``) at SD-1.5 size on a GPU: img/s, peak memory, MFU.

    python bench/gpu_loop.py --batch 32 --steps 60 --work /tmp/gpu_loop     # then: -- module.speed.compile=true ...

No SD-1.5 weights exist offline, so a pipeline with SD-1.5's component configs and random weights
is built on the GPU and saved with ``save_pretrained`` (cost per step depends on shapes, not
values), with a synthetic captioned 512 px image folder. Each configuration is one
``python run.py task=train`` process (latent and text caches warm: the first run fills them),
timed by a callback that reads the clock at each batch start; img/s is over the steps after
``--warmup`` (compilation and cache building left out). MFU = FLOPs of the step (counted once
with ``torch.utils.flop_counter`` on the same cached step, ``bench/step.py``) × steps/s over the
GPU's dense bf16 peak.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.framework_tax import rate  # noqa: E402


def build_model(out: Path, model: str) -> None:
    """A pipeline folder of ``bench/step.py``'s shapes (random weights), saved as a hub model is."""
    import torch
    from diffusers import DDPMScheduler

    from bench.step import MODELS, base_models
    from miniature.tokenizer import load_clip_tokenizer

    spec = MODELS[model]
    family = spec["family"]
    unet, vae, encoders = base_models(spec, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    parts = {"unet": unet, "vae": vae, **dict(zip(family.text_encoders, encoders)),
             **{t: load_clip_tokenizer() for t in family.tokenizers}}
    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                          steps_offset=1)
    pipe = family.pipeline(parts, sched)
    pipe.to(torch.bfloat16 if torch.cuda.is_available() else torch.float32).save_pretrained(out)


def build_data(out: Path, n: int, size: int) -> None:
    from PIL import Image

    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):   # smooth random fields compress like photos (noise would not)
        small = rng.integers(0, 255, (8, 8, 3), np.uint8)
        Image.fromarray(small).resize((size, size), Image.Resampling.BICUBIC).save(out / f"{i:04d}.jpg", quality=90)
        (out / f"{i:04d}.txt").write_text(f"a picture number {i} of colourful shapes, soft light, high detail")


class PeakMemory:
    """Writes torch.cuda.max_memory_allocated() at the end of training to ``path``."""

    def __new__(cls, path: str):
        import lightning as L
        import torch

        class _Peak(L.Callback):
            def on_train_start(self, *args: object) -> None:
                if torch.cuda.is_available():
                    torch.cuda.reset_peak_memory_stats()

            def on_train_end(self, *args: object) -> None:
                peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
                Path(path).write_text(json.dumps(peak))

        return _Peak()


def train(work: Path, name: str, args: argparse.Namespace, extra: list[str]) -> dict:
    out = work / name
    cmd = [sys.executable, str(ROOT / "run.py"), "task=train", f"hydra.run.dir={out}", "logger=none",
           f"model.name_or_path={work / args.model}", f"model.dtype={'bfloat16' if args.gpu else 'float32'}",
           f"data.path={work / 'data'}",
           f"data.resolution={args.resolution}", f"data.global_batch_size={args.batch}", "data.val_fraction=0",
           f"trainer={'gpu' if args.gpu else 'cpu'}",
           "module=lora", f"trainer.max_steps={args.steps}", "trainer.val_check_interval=1000000",
           "trainer.limit_val_batches=0", "~callbacks.sample_grid",
           "callbacks.model_checkpoint.every_n_train_steps=100000",
           "trainer.enable_progress_bar=false", "data.num_workers=4", "data.pin_memory=true",
           "+callbacks.step_timer._target_=bench.framework_tax.StepTimer", f"+callbacks.step_timer.path={out}.json",
           "+callbacks.peak._target_=bench.gpu_loop.PeakMemory", f"+callbacks.peak.path={out}.mem", *extra]
    env = {**os.environ, "TOOLKIT_CACHE": str(work / "cache"), "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": f"{ROOT}:{os.environ.get('PYTHONPATH', '')}"}
    start = time.time()
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if res.returncode:
        return {"error": res.stderr[-2500:]}
    times = json.loads(Path(f"{out}.json").read_text())
    return {"img_per_s": rate(times, args.warmup, args.batch),
            "peak_mem_gib": json.loads(Path(f"{out}.mem").read_text()),
            "first_steps_s": round(times[args.warmup] - times[0], 1), "wall_s": round(time.time() - start, 1),
            "overrides": extra}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="/tmp/gpu_loop")
    ap.add_argument("--model", default="sd15", help="a config of bench/step.py (tiny: a CPU dry run)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=15)
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--tflop-per-step", type=float, help="FLOPs of one cached step (bench/step.py) for the MFU")
    ap.add_argument("--peak", type=float, default=989e12, help="dense bf16 FLOP/s of the GPU")
    ap.add_argument("--configs", default='{"cached": [], "cached_compile": ["module.speed.compile=true"]}')
    ap.add_argument("--json")
    args = ap.parse_args()
    import torch

    from bench.step import MODELS

    work = Path(args.work)
    args.gpu, args.resolution = torch.cuda.is_available(), MODELS[args.model]["res"]
    t0 = time.time()
    if not (work / args.model / "model_index.json").is_file():
        build_model(work / args.model, args.model)
    if not (work / "data").is_dir():
        build_data(work / "data", args.images, args.resolution)
    report: dict = {"setup_s": round(time.time() - t0, 1), "batch": args.batch, "steps": args.steps,
                    "warmup": args.warmup}
    train(work, "fill-cache", argparse.Namespace(**{**vars(args), "steps": 2, "warmup": 0}), [])
    for name, extra in json.loads(args.configs).items():
        r = train(work, name, args, extra)
        if "img_per_s" in r and args.tflop_per_step:
            r["mfu"] = args.tflop_per_step * 1e12 * r["img_per_s"] / args.batch / args.peak
        report[name] = r
        print(name, json.dumps(r)[:600], flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
