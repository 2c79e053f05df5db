"""Where a training step's time goes: Lightning's SimpleProfiler over a real ``task=train`` run.

    python bench/profile_step.py                       # this checkout, embedded miniature, CPU, caches warm
    python bench/profile_step.py --root /tmp/old       # another checkout of the project (before/after)
    python bench/profile_step.py -- module=lora        # extra Hydra overrides

Runs ``task=train`` for ``--steps`` steps with periodic validation, sample grids and checkpoints
pushed past the end (they are not per-step costs), then prints the profiler's actions sorted by
time per optimizer step: the model's forward/backward, the optimizer step, the data fetch, and
every Lightning and callback hook with what it costs per step. Two steps are run first in a
separate process so the encoded caches are warm (as users run it). Lightning's
profiler is used rather than torch.profiler because the question is which *framework* action
costs time; the tensor maths is the same in any loop.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_train(root: Path, out: Path, steps: int, extra: list[str], profile: bool) -> None:
    far = steps + 1000
    args = [sys.executable, "run.py", "task=train", f"hydra.run.dir={out}", "logger=none",
            f"trainer.max_steps={steps}", f"trainer.val_check_interval={far}",
            f"callbacks.sample_grid.every_n_steps={far}", f"callbacks.model_checkpoint.every_n_train_steps={far}",
            *extra]
    if profile:
        args += ["+trainer.profiler._target_=lightning.pytorch.profilers.SimpleProfiler",
                 f"+trainer.profiler.dirpath={out}", "+trainer.profiler.filename=profile"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="offline", PYTHONPATH=str(root))
    subprocess.run(args, cwd=root, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def parse(report: str) -> list[tuple[str, float, int, float]]:
    """(action, mean s, calls, total s) rows of a SimpleProfiler report."""
    rows = []
    for line in report.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 5:
            continue
        try:
            rows.append((cells[0], float(cells[1]), int(cells[2]), float(cells[3])))
        except ValueError:
            continue
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default=str(ROOT), help="checkout of the project to profile")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--json")
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides (after --)")
    args = ap.parse_args()
    root = Path(args.root).resolve()
    with tempfile.TemporaryDirectory() as tmp:
        run_train(root, Path(tmp) / "warm", 2, args.overrides, profile=False)   # builds the caches
        out = Path(tmp) / "prof"
        run_train(root, out, args.steps, args.overrides, profile=True)
        report = "\n".join(p.read_text() for p in sorted(out.glob("*profile*")))
    rows = [r for r in parse(report) if r[0] not in ("Total", "run_training_epoch", "_run_stage",
                                                     "_run_train_routine")]
    rows.sort(key=lambda r: -r[3])
    steps = args.steps
    print(f"root {root} ({steps} steps; ms per optimizer step = total / {steps})")
    print(f"{'ms/step':>9}  {'calls':>6}  action")
    for name, _mean, calls, total in rows[: args.top]:
        print(f"{1000 * total / steps:9.2f}  {calls:6d}  {name}")
    if args.json:
        Path(args.json).write_text(json.dumps({"root": str(root), "steps": steps, "overrides": args.overrides,
                                               "rows": [dict(action=a, mean_s=m, calls=c, total_s=t)
                                                        for a, m, c, t in rows]}, indent=1))


if __name__ == "__main__":
    main()
