"""Training throughput of 2 nodes × 1 process against 1 node × 2 processes, the same global batch,
through the real entry point under ``torchrun`` (two agents on 127.0.0.1 = two "nodes", gloo).

    python bench/multinode.py                       # embedded miniature, CPU, 60 steps, 2 repeats
    python bench/multinode.py --steps 100 -- model=sd15 trainer.accelerator=gpu ...

Each side runs ``--repeats`` times, alternating (A B A B …); img/s is the median of Lightning's
ThroughputMonitor (global samples/s) over the second half of the steps, so start-up, rendezvous,
data scan and cache building are left out; the ratio is the median of the pairs' ratios. The
2-node side gives each "node" its own cache folder (node-local, each builds its own copy; built
before the measured runs), the 1-node side one shared folder. Also printed: wall time per run.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(nodes: int, procs: int, work: Path, name: str, args: argparse.Namespace) -> dict:
    port, out = free_port(), work / "outputs" / name
    common = ["task=train", "trainer=ddp", f"trainer.devices={procs}", f"trainer.num_nodes={nodes}",
              "trainer.accelerator=cpu", f"hydra.run.dir={out}", "logger=csv", f"trainer.max_steps={args.steps}",
              f"data.global_batch_size={args.batch}", "trainer.log_every_n_steps=1",
              "trainer.val_check_interval=1000000", "trainer.limit_val_batches=0",
              "callbacks.sample_grid.every_n_steps=1000000", "callbacks.model_checkpoint.every_n_train_steps=1000000",
              "trainer.enable_progress_bar=false", *args.overrides]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(args.threads),
           "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    start, agents = time.time(), []
    for node in range(nodes):
        cache = work / (f"cache-node{node}" if nodes > 1 else "cache-shared")
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nodes}", f"--nproc-per-node={procs}",
               "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id={name}",
               str(ROOT / "run.py"), *common, f"paths.cache_dir={cache}"]
        agents.append(subprocess.Popen(cmd, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                       text=True))
    logs = [a.communicate()[0] for a in agents]
    wall = time.time() - start
    if any(a.returncode for a in agents):
        sys.exit("a run failed:\n" + "\n\n".join(log[-3000:] for log in logs))
    with open(next(out.glob("csv/*/metrics.csv"))) as f:
        rows = list(csv.DictReader(f))
    speed = [float(r["train/samples_per_sec"]) for r in rows if r.get("train/samples_per_sec")]
    return {"img_per_s": statistics.median(speed[len(speed) // 2:]) if speed else float("nan"), "wall_s": wall}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="OMP threads per process")
    ap.add_argument("--json", type=Path)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-multinode-"))
    # Warm both cache layouts first (not measured): each "node" its own copy, and the shared one.
    warm = argparse.Namespace(**{**vars(args), "steps": 2})
    run(2, 1, work, "warm-2x1", warm)
    run(1, 2, work, "warm-1x2", warm)
    a, b = [], []
    for i in range(args.repeats):
        a.append(run(2, 1, work, f"nodes2x1-{i}", args))
        b.append(run(1, 2, work, f"nodes1x2-{i}", args))
        print(f"pair {i}: 2 nodes x 1 {a[-1]['img_per_s']:.1f} img/s ({a[-1]['wall_s']:.0f} s wall) | "
              f"1 node x 2 {b[-1]['img_per_s']:.1f} img/s ({b[-1]['wall_s']:.0f} s wall)", flush=True)
    ratios = [x["img_per_s"] / y["img_per_s"] for x, y in zip(a, b)]
    result = {"steps": args.steps, "global_batch": args.batch, "threads_per_process": args.threads,
              "two_nodes_x1_img_per_s": statistics.median(x["img_per_s"] for x in a),
              "one_node_x2_img_per_s": statistics.median(y["img_per_s"] for y in b),
              "ratio_pairs": [round(r, 3) for r in ratios], "ratio": round(statistics.median(ratios), 3),
              "wall_s": {"two_nodes": [round(x["wall_s"], 1) for x in a],
                         "one_node": [round(y["wall_s"], 1) for y in b]}}
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
