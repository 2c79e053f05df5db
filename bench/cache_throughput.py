"""Naive (decode + VAE-encode + text-encode every step) vs cached LoRA training, same batch
and seed, through the real ``task=train`` entry point.

    python bench/cache_throughput.py                      # embedded miniature, CPU
    python bench/cache_throughput.py --steps 100 --batch 16 -- trainer=gpu model=sd15 ...

Runs three trainings in fresh processes: naive, cached with an empty cache (includes building
it), cached with the cache warm. Prints img/s and step time (median of Lightning's
ThroughputMonitor over the second half of the steps), wall time, peak RSS, and how close the
per-step training losses of the naive and cached runs are (same seed: the same noise,
timesteps, posterior draws and caption dropout, so they differ only by cache rounding).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def train(out: Path, cache_dir: Path, cached: bool, args: argparse.Namespace) -> dict:
    flag = str(cached).lower()
    cmd = [sys.executable, str(ROOT / "run.py"), "task=train", f"hydra.run.dir={out}", "logger=csv",
           f"trainer.max_steps={args.steps}", f"data.global_batch_size={args.batch}", "trainer.log_every_n_steps=1",
           "trainer.val_check_interval=1000000", "trainer.limit_val_batches=0",
           "callbacks.sample_grid.every_n_steps=1000000",
           "callbacks.model_checkpoint.every_n_train_steps=1000000", "trainer.enable_progress_bar=false",
           f"callbacks.encoded_cache.latents={flag}", f"callbacks.encoded_cache.text={flag}", *args.overrides]
    env = {**os.environ, "TOOLKIT_CACHE": str(cache_dir), "PYTHONPATH": str(ROOT)}
    timer = ["/usr/bin/time", "-f", "MAXRSS_KB %M"] if Path("/usr/bin/time").exists() else []
    start = time.time()
    res = subprocess.run(timer + cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.time() - start
    if res.returncode:
        sys.exit(f"training failed:\n{res.stderr[-4000:]}")
    with open(next(out.glob("csv/*/metrics.csv"))) as f:
        rows = list(csv.DictReader(f))
    losses = {int(r["step"]): float(r["train/loss"]) for r in rows if r.get("train/loss")}
    speed = [float(r["train/device/samples_per_sec"]) for r in rows if r.get("train/device/samples_per_sec")]
    ips = statistics.median(speed[len(speed) // 2:])
    rss = next((int(line.split()[1]) // 1024 for line in res.stderr.splitlines() if line.startswith("MAXRSS_KB")), None)
    return {"img_per_s": round(ips, 2), "step_s": round(args.batch / ips, 4), "wall_s": round(wall, 1),
            "peak_rss_mb": rss, "losses": losses}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides (after --)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="cache-bench-"))
    cache = work / "cache"
    runs = {"naive": train(work / "naive", cache, False, args),
            "cached_cold": train(work / "cold", cache, True, args),
            "cached_warm": train(work / "warm", cache, True, args)}
    a, b = runs["naive"]["losses"], runs["cached_warm"]["losses"]
    steps = sorted(set(a) & set(b))
    x, y = np.array([a[s] for s in steps]), np.array([b[s] for s in steps])
    report = {name: {k: v for k, v in r.items() if k != "losses"} for name, r in runs.items()}
    report["speedup_warm"] = round(runs["cached_warm"]["img_per_s"] / runs["naive"]["img_per_s"], 2)
    report["loss_match"] = {"steps": len(steps), "max_abs_diff": float(np.abs(x - y).max()),
                            "mean_abs_diff": float(np.abs(x - y).mean()),
                            "step_to_step_std_naive": float(np.std(np.diff(x))),
                            "mean_loss_naive": float(x.mean()), "mean_loss_cached": float(y.mean())}
    report["settings"] = {"steps": args.steps, "batch": args.batch, "overrides": args.overrides}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
