"""What the entry's allocator policy (``toolkit/allocator.py``: glibc's mmap threshold held at
128 KiB) costs a training step: the miniature's LoRA step, glibc's default against the policy,
each in a fresh process, alternating (A B A B ...), median of the pairs' ratios.

    python bench/allocator.py --pairs 3 --steps 8
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


def one(policy: bool, steps: int, batch: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    if policy:   # what toolkit.allocator.fix_mmap_threshold sets, given to glibc at start
        env["MALLOC_MMAP_THRESHOLD_"] = str(128 * 1024)
    env["PYTHONPATH"] = str(ROOT)
    out = subprocess.run([sys.executable, "-c", CHILD, str(ROOT / "data" / "miniature" / "sd"), str(steps),
                          str(batch)], capture_output=True, text=True, env=env, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch", type=int, default=16)
    args = ap.parse_args()
    ratios = []
    for i in range(args.pairs):
        a, b = one(False, args.steps, args.batch), one(True, args.steps, args.batch)
        ratios.append(b["ms"] / a["ms"])
        print(f"pair {i}: glibc default {a['ms']:.0f} ms/step, peak RSS {a['peak_rss'] / 2**30:.2f} GiB · "
              f"policy {b['ms']:.0f} ms/step, peak RSS {b['peak_rss'] / 2**30:.2f} GiB · ratio {ratios[-1]:.3f}",
              flush=True)
    print(f"policy / default, step time: median {statistics.median(ratios):.3f} over {args.pairs} pairs")


if __name__ == "__main__":
    main()
