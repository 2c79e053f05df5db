"""The first job, cold: ``python run.py`` (the default job) with a fresh ``TOOLKIT_CACHE``, two code
versions alternating (A B A B ...), with every run's stage times and the two sides' metrics compared.

    git archive <old commit> | tar -x -C /tmp/before          # the old code, without touching a checkout
    python bench/first_job.py --before /tmp/before [--after .] [--pairs 2] [--json bench/results/first_job_cpu.json]
    python bench/first_job.py --stage reference [--pairs 2]    # only the step that changed, in one process

Each run is ``python <checkout>/run.py hydra.run.dir=<tmp>`` from that checkout, as a user runs it
after cloning (offline wandb, the default logger), with its own empty cache folder. Prints each
run's wall time and where it went (training; each evaluation's reference features, generation,
features of the generated images, CLIP scores, metrics; the rest is start-up, data scan, encoding
caches, loading models, report), the median per side and the median of the after/before ratios of
the pairs, and the largest relative difference of any metric between the two sides (features
made on another CPU kind than the shipped ones may differ in the last digits).

``--stage reference`` times only what the shipped features replace, on a loaded machine where whole
jobs take too long: the default job's reference features computed (``metrics.shipped_reference=null``,
what the old code always did) against found shipped, alternating in one process, each into an empty
cache, and checks the two arrays are equal.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

STAGES = ("seconds_reference", "seconds_generate", "seconds_inception", "seconds_clip_score", "seconds_scores")
TRAINED = re.compile(r"training (?:done|stopped) at step \d+/\d+: \d+ steps in ([\d:]+)")   # callbacks/progress.py


def seconds(clock: str) -> float:
    """``1:02:03`` / ``2:03`` (toolkit.logs.duration) in seconds."""
    total = 0
    for part in clock.split(":"):
        total = 60 * total + int(part)
    return total


def run_once(checkout: Path, work: Path, name: str) -> dict:
    """One cold default job from ``checkout``; its wall time, stage times and metrics."""
    out, cache = work / name, work / f"{name}-cache"
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(cache, ignore_errors=True)
    env = {**os.environ, "TOOLKIT_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "WANDB_MODE": "offline", "PYTHONPATH": str(checkout)}
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "run.py", f"hydra.run.dir={out}"], cwd=checkout, env=env,
                         capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if res.returncode:
        raise SystemExit(f"{name}: the default job failed (rc {res.returncode}):\n{res.stderr[-3000:]}")
    log = res.stdout + res.stderr
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines() if line.strip()]
    trained = next((seconds(m.group(1)) for m in TRAINED.finditer(log)), None)
    evals = {("finetuned" if r["settings"].get("adapters") else "base"): r for r in rows}
    stages = {"train": trained, **{f"{side}_{k.removeprefix('seconds_')}": r["metrics"].get(k)
                                   for side, r in evals.items() for k in STAGES}}
    shipped = [line for line in log.splitlines() if "reference features (" in line and ("shipped" in line)]
    return {"name": name, "wall_s": wall, "stages_s": stages, "shipped_lines": shipped,
            "metrics": {side: {k: v for k, v in r["metrics"].items() if not k.startswith(("seconds_", "images_per"))}
                        for side, r in evals.items()}}


def largest_difference(a: dict, b: dict) -> tuple[float, str]:
    worst, where = 0.0, ""
    for side in a:
        for k, x in a[side].items():
            y = b[side].get(k)
            if isinstance(x, (int, float)) and isinstance(y, (int, float)):
                d = abs(x - y) / max(abs(x), abs(y), 1e-12)
                if d > worst:
                    worst, where = d, f"{side}.{k}: {x!r} vs {y!r}"
    return worst, where


def reference_stage(pairs: int, work: Path) -> dict:
    """Seconds of the default job's reference features, computed vs shipped (A B A B), in this process."""
    from lightning import Fabric
    from omegaconf import open_dict

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # the miniature's factory is not installed
    from miniature.reference_features import compose
    from toolkit.evaluation import job
    from toolkit.evaluation.scores import parse_metrics
    from toolkit.metrics.clip import load_clip

    cfg = compose([])
    m = cfg.metrics
    fabric = Fabric(accelerator="cpu", devices=1)
    extractors = job.feature_models(m, parse_metrics(m.compute), load_clip(m.clip_model), fabric.device)
    refset = job.reference_set(cfg)
    ref, identity, column = refset.rows, refset.identity, refset.image_column
    size = job.reference_size(cfg)
    times: dict[str, list[float]] = {"computed": [], "shipped": []}
    feats = {}
    for i in range(pairs):
        for side, shipped in (("computed", None), ("shipped", "auto")):
            with open_dict(m):
                m.cache_dir, m.shipped_reference = str(work / f"cache-{side}{i}"), shipped
            t0 = time.perf_counter()
            real, _, source = job.reference_features(fabric, m, ref, column, size, identity, extractors)
            times[side].append(time.perf_counter() - t0)
            assert set(source.values()) == {side}, source
            feats[side] = real
            print(f"{side}{i}: {times[side][-1]:.2f} s", flush=True)
    equal = all(np.array_equal(feats["computed"][s], feats["shipped"][s]) for s in feats["computed"])
    return {"seconds": times, "median_saved_s": statistics.median(a - b for a, b in zip(*times.values())),
            "features_equal_bit_for_bit": equal, "load_average_end": os.getloadavg(), "cpus": os.cpu_count()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--stage", choices=["job", "reference"], default="job")
    ap.add_argument("--before", help="checkout of the old code (A); --stage job")
    ap.add_argument("--after", default=str(Path(__file__).resolve().parents[1]), help="checkout of the new code (B)")
    ap.add_argument("--pairs", type=int, default=2)
    ap.add_argument("--work", default=None, help="folder for the runs and caches (default: a temp folder)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    work = Path(a.work or tempfile.mkdtemp(prefix="first_job-"))
    if a.stage == "reference":
        summary = reference_stage(a.pairs, work)
        print(json.dumps(summary, indent=1))
        if a.json:
            Path(a.json).write_text(json.dumps(summary, indent=1))
        return
    if not a.before:
        ap.error("--before <checkout of the old code> is needed for --stage job")
    sides = {"before": Path(a.before).resolve(), "after": Path(a.after).resolve()}
    runs: dict[str, list[dict]] = {"before": [], "after": []}
    for i in range(a.pairs):
        for side, checkout in sides.items():   # A B A B: a drift of a shared machine hits both sides alike
            r = run_once(checkout, work, f"{side}{i}")
            runs[side].append(r)
            stages = ", ".join(f"{k} {v:.0f}" for k, v in r["stages_s"].items() if v is not None)
            print(f"{r['name']}: {r['wall_s']:.0f} s wall ({stages})", flush=True)
            for line in r["shipped_lines"]:
                print("   ", line.strip()[:200])
    med = {s: statistics.median(r["wall_s"] for r in rs) for s, rs in runs.items()}
    ratios = [b["wall_s"] / a_["wall_s"] for a_, b in zip(runs["before"], runs["after"])]
    diff, where = largest_difference(runs["before"][0]["metrics"], runs["after"][0]["metrics"])
    summary = {"median_wall_s": med, "saved_s": med["before"] - med["after"], "ratios_after_over_before": ratios,
               "median_ratio": statistics.median(ratios), "largest_metric_rel_difference": diff, "where": where,
               "load_average_end": os.getloadavg(), "cpus": os.cpu_count()}
    print(json.dumps(summary, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps({"summary": summary, "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
