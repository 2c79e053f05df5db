"""What sharded evaluation costs per 10k generated images, beyond generating them: the shard files
(disk), rank 0 reading them back and combining their float64 moments (time, memory), and the
consistency check's FID from those moments. Synthetic Inception-like features (d = 2048, ReLU of
a Gaussian), the real functions of ``toolkit.evaluation.job`` and ``toolkit.metrics.moments``.

    python bench/eval_shards.py                 # 10k images, shards of 256
    python bench/eval_shards.py --images 30000 --shard 1024
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import numpy as np

from toolkit.evaluation.job import read_shards, shard_plan, write_shard
from toolkit.metrics.distances import psd_sqrt
from toolkit.metrics.moments import fid_from_moments


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=10_000)
    ap.add_argument("--shard", type=int, default=256)
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    mix = (rng.standard_normal((args.dim, args.dim)) / np.sqrt(args.dim)).astype(np.float32)   # float32, as Inception
    plan = shard_plan(args.images, args.shard, 1)
    work = Path(tempfile.mkdtemp(prefix="bench-shards-"))
    t_write = 0.0
    for a, b in plan:   # what the ranks write, one shard at a time
        feats = np.maximum(rng.standard_normal((b - a, args.dim)).astype(np.float32) @ mix, 0).astype(np.float64)
        t0 = time.perf_counter()
        write_shard(work / f"{a:08d}-{b:08d}.npz", np.arange(a, b), {"inception": feats},
                    {"clip_score": rng.random(b - a)})
        t_write += time.perf_counter() - t0
    disk = sum(f.stat().st_size for f in work.glob("*.npz"))
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    _, _, moments = read_shards(work, plan, ["inception"])
    t_read = time.perf_counter() - t0
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    ref = np.maximum(rng.standard_normal((5000, args.dim)).astype(np.float32) @ mix, 0).astype(np.float64)
    mu, sigma = ref.mean(0), np.cov(ref, rowvar=False)
    sqrt = psd_sqrt(sigma)
    t0 = time.perf_counter()
    fid_from_moments(mu, sigma, moments, sqrt)
    t_fid = time.perf_counter() - t0
    per10k = 10_000 / args.images
    out = {"images": args.images, "shard_images": args.shard, "shards": len(plan), "dim": args.dim,
           "disk_mb_per_10k": round(disk / 2**20 * per10k, 1),
           "write_s_per_10k": round(t_write * per10k, 2),
           "read_and_combine_s_per_10k": round(t_read * per10k, 2),
           "rank0_peak_rss_growth_mb": round((rss1 - rss0) / 1024, 1),
           "assembled_features_mb_per_10k (float64)": round(10_000 * args.dim * 8 / 2**20, 1),
           "moments_mb (mean + d x d scatter, float64)": round((args.dim + args.dim**2) * 8 / 2**20, 1),
           "fid_from_moments_s": round(t_fid, 2)}
    print(json.dumps(out, indent=1))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
