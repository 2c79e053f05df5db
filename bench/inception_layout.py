"""Inception (FID) features with channels-last vs contiguous input: img/s and how far the features move.

    python bench/inception_layout.py [--images 50] [--rounds 4] [--json out.json]

The TF-Inception TorchScript network of the evaluation, one batch of random 299 px images, the two
layouts alternating in one process (A B A B …) so a drift of the machine's speed hits both; the
first round is warm-up. Prints img/s per round, the median ratio, and the largest feature
difference relative to the largest feature (float rounding of different convolution kernels).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from toolkit.metrics.inception import default_weights


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--json")
    args = ap.parse_args()
    net = torch.jit.load(str(default_weights())).eval()
    x = torch.rand(args.images, 3, 299, 299, generator=torch.Generator().manual_seed(0)) * 2 - 1
    layouts = {"contiguous": x, "channels_last": x.contiguous(memory_format=torch.channels_last)}
    rates: dict[str, list[float]] = {k: [] for k in layouts}
    feats = {}
    with torch.inference_mode():
        for _ in range(args.rounds):
            for name, inp in layouts.items():
                t = time.perf_counter()
                feats[name] = net(inp).double()
                rates[name].append(args.images / (time.perf_counter() - t))
    ratios = [c / p for c, p in zip(rates["channels_last"][1:], rates["contiguous"][1:])]
    diff = float((feats["channels_last"] - feats["contiguous"]).abs().max() / feats["contiguous"].abs().max())
    out = {"images": args.images, "rounds": args.rounds, "img_per_s": rates,
           "channels_last_over_contiguous": round(statistics.median(ratios), 3),
           "max_feature_diff_relative": diff, "torch": torch.__version__}
    print(json.dumps(out, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
