"""The loss gap of an int8 base (``model.quantize=int8``) to the unquantized base over a short run:
two ``task=train`` runs of the embedded miniature, same seed and data, one with the int8 UNet; the
per-step training losses compared, and each run's peak resident memory.

    python bench/quantize_loss.py --steps 40
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def train(out: Path, steps: int, extra: list[str]) -> dict:
    cmd = [sys.executable, str(ROOT / "run.py"), "task=train", "logger=csv", f"trainer.max_steps={steps}",
           "trainer.log_every_n_steps=1", "callbacks.sample_grid.every_n_steps=0", "trainer.enable_progress_bar=false",
           f"hydra.run.dir={out}", *extra]
    cmd = ["/usr/bin/time", "-f", "%M", *cmd]   # peak RSS (KiB) on stderr's last line
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if res.returncode:
        raise RuntimeError(res.stderr[-3000:])
    with open(next(out.glob("csv/*/metrics.csv"))) as f:
        losses = {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")}
    return {"losses": [losses[k] for k in sorted(losses)], "peak_rss": int(res.stderr.strip().splitlines()[-1]) * 1024}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        full = train(Path(tmp) / "full", args.steps, [])
        q = train(Path(tmp) / "int8", args.steps, ["model.quantize=int8"])
    a, b = full["losses"], q["losses"]
    n = min(len(a), len(b))
    gap = [abs(x - y) / abs(x) for x, y in zip(a[:n], b[:n])]
    tail = max(n // 4, 1)
    row = {"steps": n, "loss_full_last_quarter": sum(a[n - tail:n]) / tail,
           "loss_int8_last_quarter": sum(b[n - tail:n]) / tail,
           "relative_gap_median": sorted(gap)[n // 2], "relative_gap_max": max(gap),
           "peak_rss_full": full["peak_rss"], "peak_rss_int8": q["peak_rss"]}
    print(json.dumps(row, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps({**row, "losses_full": a, "losses_int8": b}, indent=1))


if __name__ == "__main__":
    main()
