"""A 2-cell sweep three ways, through the real entry point: ``hydra/launcher=slurm`` (each cell a
SLURM job; a one-host cluster is started here as the tests start it, tests/slurm.py, unless
``--slurm-conf`` names a running one), ``hydra/launcher=local`` (each cell a process of its own on
this machine) and sequential (Hydra's basic launcher: the cells one after another in one process).

    python bench/slurm_sweep.py                     # 2 eval cells of the embedded miniature, CPU
    python bench/slurm_sweep.py --repeats 2 -- eval.num_images=64

The cells are ``task=eval`` cells (``eval.seed=0,1``), one process and one CPU each, so the two
launchers run both cells at once on 2 cores and sequential runs them back to back. Each cell
records the time its task took (``bench/timed_task.py``). Printed per launcher: the sweep's wall
time, the cells' task time, and the overhead per cell: ``(wall − Σ task / cells at once) / cells``
(process start-up, imports, Hydra, scheduling; for sequential the one process's start-up shared
by its cells). Modes alternate (A B C A B C ...); the figure is the median over repeats.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def sweep(mode: str, work: Path, args: argparse.Namespace, slurm_env: dict[str, str]) -> dict:
    out = work / f"{mode}-{time.time_ns()}"
    launcher = {"slurm": ["hydra/launcher=slurm", "hydra.launcher.partition=test", "hydra.launcher.gpus_per_node=0",
                          "hydra.launcher.tasks_per_node=1", "hydra.launcher.cpus_per_task=1",
                          "hydra.launcher.timeout_min=30"],
                "local": ["hydra/launcher=local"], "sequential": []}[mode]
    cmd = [sys.executable, str(ROOT / "run.py"), "-m", "task=eval", "+task_module=bench.timed_task", "logger=none",
           "eval.num_images=16", "eval.steps=4", "eval.num_ref=32", "eval.save_images=false", "fabric.accelerator=cpu",
           f"metrics.cache_dir={work / 'reference'}", f"hydra.sweep.dir={out}", *launcher, "eval.seed=0,1",
           *args.overrides]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TOOLKIT_CACHE": str(work / "cache"),
           **(slurm_env if mode == "slurm" else {})}
    start = time.time()
    res = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)
    wall = time.time() - start
    if res.returncode != 0:
        sys.exit(f"{mode} sweep failed:\n{res.stderr[-4000:]}")
    cells = [json.loads(p.read_text()) for p in sorted(out.glob("*/cell_time.json"))]
    if len(cells) != 2:
        sys.exit(f"{mode} sweep: {len(cells)} cells timed, expected 2")
    at_once = 1 if mode == "sequential" else 2
    task = sum(c["seconds"] for c in cells)
    return {"mode": mode, "wall_s": wall, "cell_task_s": [c["seconds"] for c in cells],
            "overhead_per_cell_s": (wall - task / at_once) / len(cells)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--slurm-conf", help="a running cluster's slurm.conf (default: start a one-host cluster here)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "slurm_sweep_cpu.json"))
    p.add_argument("overrides", nargs="*", help="more overrides for every cell (after --)")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="slurm-sweep-"))
    cluster = None
    if args.slurm_conf:
        slurm_env = {"SLURM_CONF": args.slurm_conf}
    else:
        from tests.slurm import start_cluster

        cluster = start_cluster(work / "cluster")
        slurm_env = {"SLURM_CONF": str(cluster.conf)}
    try:
        sweep("sequential", work, args, slurm_env)   # warm-up: reference features and caches, not measured
        runs = [sweep(m, work, args, slurm_env) for _ in range(args.repeats) for m in ("slurm", "local", "sequential")]
    finally:
        if cluster is not None:
            cluster.stop()
    table = []
    for mode in ("slurm", "local", "sequential"):
        mine = [r for r in runs if r["mode"] == mode]
        table.append({"mode": mode, "wall_s": statistics.median(r["wall_s"] for r in mine),
                      "cell_task_s": statistics.median(t for r in mine for t in r["cell_task_s"]),
                      "overhead_per_cell_s": statistics.median(r["overhead_per_cell_s"] for r in mine)})
    print("| launcher | sweep wall (s) | task per cell (s) | overhead per cell (s) |\n|---|---|---|---|")
    for row in table:
        print(f"| {row['mode']} | {row['wall_s']:.1f} | {row['cell_task_s']:.1f} | {row['overhead_per_cell_s']:.1f} |")
    Path(args.out).write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count(),
                                          "load_average_at_end": os.getloadavg(), "table": table, "runs": runs},
                                         indent=1))
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
