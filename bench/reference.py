"""``task=train`` against the script users would otherwise run: diffusers'
``examples/text_to_image/train_text_to_image_lora.py`` (not shipped here: pass its path).

    python bench/reference.py --script ~/diffusers/examples/text_to_image/train_text_to_image_lora.py
    python bench/reference.py --script ... --python /venv/bin/python --rounds 3 --default-job

Both sides train the embedded miniature on its style/train images at 32 px, batch 16, LoRA r 4 on
the attention projections (``module=lora``; the script's own targets), fp32, AdamW at 1e-4,
gradient clipping at 1, with no validation, sampling, checkpoints or loggers (the script still
logs to its default tensorboard tracker: it has no "none"). Three sides, in turn in every round so
a drift of the machine's speed hits all alike:

- ``reference``: the script, unmodified, run by ``runpy`` in a child process;
- ``naive``: ``task=train`` with the latent and text caches off (the VAE and text encoder run
  every step, as in the script);
- ``cached``: ``task=train`` as users run it (defaults: both caches on; the first round builds
  them, later rounds read them), plus ``--cached-overrides`` (e.g. ``module.speed.compile=true``).

Each child registers torch's global optimizer post-step hook and records the clock at every
optimizer step, the same hook on both sides. img/s = batch / median interval between steps after
``--warmup`` steps; start-up = wall time from starting the process to the first step's start
(first step end minus one median step). The first round warms the OS file cache, the datasets
cache and the latent/text caches and is reported apart (``cold``); the figures are the medians of
the later rounds, and each ratio is the median of the per-round ratios.

The script needs torchvision, which does not import beside the CPU torch this project pins
(``README.md``); run both sides in one interpreter that has it (``--python``), e.g. a venv with
``pip install torch==2.14.1 torchvision==0.29.1 accelerate datasets`` and this project.
"""

from __future__ import annotations

import argparse
import json
import os
import runpy
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL, DATA = ROOT / "data/miniature/sd", ROOT / "data/world/style/train"


def child(stamps_path: str, argv: list[str]) -> None:
    """Run ``argv[0]`` as ``__main__`` with the step clock installed; write the stamps at exit."""
    import atexit

    from torch.optim.optimizer import register_optimizer_step_post_hook

    stamps: list[float] = []
    register_optimizer_step_post_hook(lambda *_: stamps.append(time.time()))
    atexit.register(lambda: Path(stamps_path).write_text(json.dumps(stamps)))
    sys.argv = list(argv)
    sys.path.insert(0, str(Path(argv[0]).resolve().parent))
    runpy.run_path(argv[0], run_name="__main__")


def reference_argv(script: str, out: Path, steps: int, batch: int) -> list[str]:
    return [script, f"--pretrained_model_name_or_path={MODEL}", f"--train_data_dir={DATA}", "--caption_column=text",
            "--resolution=32", "--center_crop", f"--train_batch_size={batch}", "--rank=4", f"--max_train_steps={steps}",
            "--learning_rate=1e-4", "--lr_scheduler=constant", "--max_grad_norm=1", "--seed=0", f"--output_dir={out}",
            "--checkpointing_steps=100000000", "--dataloader_num_workers=0"]


def toolkit_argv(out: Path, steps: int, batch: int, cached: bool, extra: list[str]) -> list[str]:
    flag = str(cached).lower()
    return [str(ROOT / "run.py"), "task=train", "module=lora", f"hydra.run.dir={out}", "logger=none",
            f"trainer.max_steps={steps}", f"data.global_batch_size={batch}", "trainer.limit_val_batches=0",
            "trainer.val_check_interval=100000000", "~callbacks.sample_grid", "trainer.enable_progress_bar=false",
            "callbacks.model_checkpoint.every_n_train_steps=100000000",
            f"callbacks.encoded_cache.latents={flag}", f"callbacks.encoded_cache.text={flag}", *extra]


def timed(python: str, argv: list[str], out: Path, env: dict, cwd: Path) -> dict:
    """One child run: img/s over the steps after the warm-up, start-up, wall."""
    stamps = out.with_suffix(".json")
    t0 = time.time()
    res = subprocess.run([python, __file__, "--child", str(stamps), "--", *argv], cwd=cwd, env=env,
                         capture_output=True, text=True)
    wall = time.time() - t0
    if res.returncode:
        sys.exit(f"{argv[0]} failed (exit {res.returncode}):\n{res.stderr[-4000:]}")
    return {"stamps": [t - t0 for t in json.loads(stamps.read_text())], "wall_s": wall}


def summarise(run: dict, warmup: int, batch: int) -> dict:
    s = run["stamps"]
    if len(s) <= warmup + 2:
        sys.exit(f"only {len(s)} optimizer steps recorded; --steps must exceed --warmup + 2")
    step = statistics.median(b - a for a, b in zip(s[warmup:], s[warmup + 1:]))
    return {"img_per_s": batch / step, "startup_s": s[0] - step, "wall_s": run["wall_s"], "steps": len(s)}


def default_job(python: str, work: Path, env: dict) -> dict:
    """``python run.py`` (the README's first command) with empty caches: wall time and the FID ratio."""
    out = work / "default_job"
    t0 = time.time()
    res = subprocess.run([python, str(ROOT / "run.py"), f"hydra.run.dir={out}"], cwd=ROOT,
                         env={**env, "TOOLKIT_CACHE": str(work / "default_job_cache")}, capture_output=True, text=True)
    wall = time.time() - t0
    if res.returncode:
        sys.exit(f"default job failed:\n{res.stderr[-4000:]}")
    base, tuned = (json.loads(line)["metrics"] for line in (out / "results.jsonl").read_text().splitlines())
    return {"wall_s": round(wall, 1), "fid_base": base["fid"], "fid_finetuned": tuned["fid"],
            "fid_ratio": tuned["fid"] / base["fid"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--script", help="diffusers' examples/text_to_image/train_text_to_image_lora.py")
    ap.add_argument("--python", default=sys.executable, help="interpreter for both sides (needs torchvision)")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=20, help="steps left out of img/s")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3, help="the first warms the caches and is reported apart")
    ap.add_argument("--cached-overrides", nargs="*", default=[], help="extra overrides of the cached side")
    ap.add_argument("--default-job", action="store_true",
                    help="also time `python run.py` from empty caches (with --python, like both sides)")
    ap.add_argument("--json", help="write the figures here too")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("argv", nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child, args.argv)
    if not args.script or not Path(args.script).is_file():
        sys.exit(f"--script {args.script!r}: give the path of diffusers' train_text_to_image_lora.py "
                 "(examples/text_to_image/ in a clone of github.com/huggingface/diffusers)")
    if args.rounds < 2:
        sys.exit("--rounds must be at least 2 (the first only warms caches)")
    work = Path(tempfile.mkdtemp(prefix="reference-bench-"))
    env = {**os.environ, "TOOLKIT_CACHE": str(work / "cache"), "HF_DATASETS_CACHE": str(work / "datasets"),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline", "PYTHONPATH": str(ROOT)}
    sides = {
        "reference": lambda o: (reference_argv(str(Path(args.script).resolve()), o, args.steps, args.batch), work),
        "naive": lambda o: (toolkit_argv(o, args.steps, args.batch, False, []), ROOT),
        "cached": lambda o: (toolkit_argv(o, args.steps, args.batch, True, args.cached_overrides), ROOT),
    }
    rounds: list[dict] = []
    for r in range(args.rounds):
        one = {}
        for name, make in sides.items():
            out = work / f"{name}-{r}"
            argv, cwd = make(out)
            one[name] = summarise(timed(args.python, argv, out, env, cwd), args.warmup, args.batch)
            print(f"round {r} {name:9s} {one[name]['img_per_s']:7.1f} img/s  start-up {one[name]['startup_s']:5.1f} s"
                  f"  wall {one[name]['wall_s']:5.1f} s", file=sys.stderr)
        rounds.append(one)
    warm = rounds[1:]
    report: dict = {"settings": {"steps": args.steps, "warmup": args.warmup, "batch": args.batch,
                                 "rounds": args.rounds, "cached_overrides": args.cached_overrides,
                                 "python": args.python, "script": str(args.script)},
                    "cold": {k: {m: round(v, 2) for m, v in d.items()} for k, d in rounds[0].items()}}
    for name in sides:
        report[name] = {m: round(statistics.median(o[name][m] for o in warm), 2)
                        for m in ("img_per_s", "startup_s", "wall_s")}
        report[name]["img_per_s_rounds"] = [round(o[name]["img_per_s"], 1) for o in warm]
    for name in ("naive", "cached"):   # goal 1: naive >= 1.0x, start-up <= the reference's; goal 2: cached >= 2.0x
        report[f"{name}_over_reference"] = round(statistics.median(
            o[name]["img_per_s"] / o["reference"]["img_per_s"] for o in warm), 3)
        report[f"{name}_startup_minus_reference_s"] = round(statistics.median(
            o[name]["startup_s"] - o["reference"]["startup_s"] for o in warm), 2)
    if args.default_job:   # goal 3: <= 2 min from empty caches
        report["default_job"] = default_job(args.python, work, env)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")


if __name__ == "__main__":
    main()
