"""What the entry's allocator policy (``toolkit/allocator.py``: glibc's mmap threshold held at a
fixed value) costs a training step: the miniature's LoRA step, glibc's default against the policy at
each ``--thresholds`` value, each in a fresh process, alternating (A B C ... A B C ...), median of the
rounds' ratios to the default.

    python bench/allocator.py --pairs 3 --steps 8 --thresholds 128K
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHILD = r"""
import json, sys, time, torch
from diffusers import UNet2DConditionModel
from peft import LoraConfig
from toolkit.adapters.inject import add_lora
torch.manual_seed(0)
unet = UNet2DConditionModel.from_pretrained(sys.argv[1], subfolder="unet").requires_grad_(False)
params = add_lora(unet, LoraConfig(r=8, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
opt = torch.optim.AdamW(params, lr=1e-4)
s, batch = unet.config.sample_size, int(sys.argv[3])
x, t = torch.randn(batch, 4, s, s), torch.randint(0, 1000, (batch,))
ctx = torch.randn(batch, 77, unet.config.cross_attention_dim)
def step():
    unet(x, t, ctx).sample.pow(2).mean().backward(); opt.step(); opt.zero_grad(set_to_none=True)
for _ in range(3): step()
t0 = time.perf_counter()
for _ in range(int(sys.argv[2])): step()
ms = (time.perf_counter() - t0) / int(sys.argv[2]) * 1000
rss = int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) * 1024
print(json.dumps({"ms": ms, "peak_rss": rss}))
"""


def one(threshold: int | None, steps: int, batch: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    if threshold:   # what toolkit.allocator.fix_mmap_threshold sets, given to glibc at start
        env["MALLOC_MMAP_THRESHOLD_"] = str(threshold)
    env["PYTHONPATH"] = str(ROOT)
    out = subprocess.run([sys.executable, "-c", CHILD, str(ROOT / "data" / "miniature" / "sd"), str(steps),
                          str(batch)], capture_output=True, text=True, env=env, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--thresholds", default="128K", help="comma-separated fixed thresholds (K/M suffixes)")
    args = ap.parse_args()
    sizes = [int(float(t[:-1]) * {"K": 2**10, "M": 2**20}[t[-1].upper()]) if t[-1].isalpha() else int(t)
             for t in args.thresholds.split(",")]
    ratios: dict[int, list[float]] = {t: [] for t in sizes}
    for i in range(args.pairs):
        a = one(None, args.steps, args.batch)
        line = [f"round {i}: glibc default {a['ms']:.0f} ms/step, peak RSS {a['peak_rss'] / 2**30:.2f} GiB"]
        for t in sizes:
            b = one(t, args.steps, args.batch)
            ratios[t].append(b["ms"] / a["ms"])
            line.append(f"{t // 1024} KiB {b['ms']:.0f} ms/step, peak RSS {b['peak_rss'] / 2**30:.2f} GiB "
                        f"(x{ratios[t][-1]:.3f})")
        print(" · ".join(line), flush=True)
    for t in sizes:
        print(f"threshold {t // 1024} KiB / default, step time: median {statistics.median(ratios[t]):.3f} "
              f"over {args.pairs} rounds")


if __name__ == "__main__":
    main()
