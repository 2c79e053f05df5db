"""Throughput options of cached training, one by one, against the bare naive loop (CPU).

    python bench/cpu_options.py                       # embedded miniature, default LoRA, batch 16
    python bench/cpu_options.py --repeats 3 -- module=lora

For each option: ``task=train`` from the warm latent/text caches with that option, paired with a
run of the bare naive loop (``bench/framework_tax.py``: the floor of a trainer that encodes every
step), alternating A B A B so the ratio holds when the machine's speed drifts; prints img/s of
each and the median ratio cached-with-option / bare-naive. Options: ``module.speed.channels_last``,
``module.speed.compile`` (inductor), ``trainer.precision=bf16-mixed`` (autocast; this CPU's AMX), foreach
AdamW, ``data.num_workers``, and their combination.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.framework_tax import bare_run, rate, toolkit_run  # noqa: E402

OPTIONS = {
    "cached": [],
    "channels_last": ["module.speed.channels_last=true"],
    "compile": ["module.speed.compile=true"],
    "bf16_autocast": ["trainer.precision=bf16-mixed"],
    "foreach_adamw": ["module.optimizer.foreach=true"],
    "loader_workers_2": ["data.num_workers=2"],
    "compile_channels_last": ["module.speed.compile=true", "module.speed.channels_last=true"],
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--warmup", type=int, default=30, help="steps left out (compilation happens here)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--only", nargs="*", help="a subset of the options")
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides (after --)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="cpu-options-"))
    env = {**os.environ, "TOOLKIT_CACHE": str(work / "cache"), "PYTHONPATH": str(ROOT), "WANDB_MODE": "offline",
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    extra = [f"data.global_batch_size={args.batch}", *args.overrides]
    toolkit_run(work / "warmup", 2, True, extra, env)   # fills the caches
    report: dict = {"settings": {"steps": args.steps, "warmup": args.warmup, "repeats": args.repeats,
                                 "batch": args.batch, "overrides": args.overrides}}
    for name, opts in OPTIONS.items():
        if args.only and name not in args.only:
            continue
        pairs = []
        for i in range(args.repeats):
            b = rate(bare_run(work / f"bare-{name}-{i}", args.steps, False, extra, env), args.warmup, args.batch)
            t = rate(toolkit_run(work / f"{name}-{i}", args.steps, True, extra + opts, env), args.warmup, args.batch)
            pairs.append((t, b))
        report[name] = {"img_per_s": round(statistics.median(t for t, _ in pairs), 2),
                        "bare_naive_img_per_s": round(statistics.median(b for _, b in pairs), 2),
                        "over_bare_naive": round(statistics.median(t / b for t, b in pairs), 3),
                        "runs": [[round(t, 1), round(b, 1)] for t, b in pairs]}
        print(name, json.dumps(report[name]), flush=True)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
