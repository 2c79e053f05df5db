"""Start-up time and training img/s from a folder (scan cold, scan cached) against the same data
prepared as tar shards (``task=prepare``) on local disk and on a local S3 server (moto), through
the real ``task=train`` entry point; peak RSS of each run.

    python bench/prepared_data.py --images 10000          # synthetic captioned 32 px images
    python bench/prepared_data.py --images 100000 --steps 40

Start-up = wall time of a whole run with ``trainer.max_steps=1`` (process start, config, data
listing / scan / index, model load, one step); img/s = median of Lightning's ThroughputMonitor
over the second half of a ``--steps`` run. The encoded cache is off in the first five cases, so
each step decodes images (the path prepared data changes); the last two train with the caches on
(the default), from an empty cache dir: encoding at start-up against fetching the rows
``prepare.encode=true`` stored. The S3 server runs in this process (``ThreadedMotoServer``), so
its figures include moto's own CPU time on the same cores.
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


def make_data(root: Path, n: int) -> None:
    import numpy as np
    from PIL import Image

    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    with open(root / "metadata.jsonl", "w") as meta:
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), np.uint8)).save(root / f"{i:07d}.png")
            meta.write(json.dumps({"file_name": f"{i:07d}.png", "text": f"a picture number {i % 97}"}) + "\n")


def run(args: list[str], env: dict[str, str], out: Path) -> dict:
    timer = ["/usr/bin/time", "-f", "MAXRSS_KB %M"] if Path("/usr/bin/time").exists() else []
    t0 = time.time()
    res = subprocess.run([*timer, sys.executable, str(ROOT / "run.py"), *args, f"hydra.run.dir={out}"], cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT), **env}, capture_output=True, text=True)
    wall = time.time() - t0
    if res.returncode:
        sys.exit(f"failed: {' '.join(args)}\n{res.stderr[-3000:]}")
    rss = next((int(line.split()[1]) // 1024 for line in res.stderr.splitlines() if line.startswith("MAXRSS_KB")),
               None)
    speed = []
    for f in out.glob("csv/*/metrics.csv"):
        with open(f) as fh:
            speed = [float(r["train/device/samples_per_sec"]) for r in csv.DictReader(fh)
                     if r.get("train/device/samples_per_sec")]
    return {"wall_s": round(wall, 1), "peak_rss_mb": rss,
            "img_per_s": round(statistics.median(speed[len(speed) // 2:]), 1) if speed else None}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=10_000)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--skip", nargs="*", default=[], help="leave out the training cases whose name starts with "
                    "one of these (e.g. folder: its figures do not depend on the shard reader)")
    a = ap.parse_args()
    import boto3
    from moto.server import ThreadedMotoServer

    work = Path(tempfile.mkdtemp(prefix="bench-prepared-"))
    make_data(work / "folder", a.images)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    import logging

    logging.getLogger("werkzeug").setLevel(logging.ERROR)   # moto's request log
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    s3 = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
          "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    boto3.client("s3", endpoint_url=s3["AWS_ENDPOINT_URL"], aws_access_key_id="bench", aws_secret_access_key="bench",
                 region_name="us-east-1").create_bucket(Bucket="bench")
    prep = {}
    for name, output in (("local", str(work / "shards")), ("s3", "s3://bench/data")):
        prep[name] = run(["task=prepare", f"data.path={work / 'folder'}", "data.resolution=32",
                          f"prepare.output={output}"], s3, work / f"prepare-{name}")
        print("prepare", name, prep[name], flush=True)
    # the frozen encoders' rows added to the S3 set (the shards are there: this is the encoding alone)
    prep["s3, encode=true (rows added)"] = run(["task=prepare", f"data.path={work / 'folder'}", "data.resolution=32",
                                                "prepare.output=s3://bench/data", "prepare.encode=true",
                                                f"paths.cache_dir={work / 'cache-prepare'}"], s3,
                                               work / "prepare-encode")
    print("prepare encode", prep["s3, encode=true (rows added)"], flush=True)
    common = ["task=train", "logger=csv", "data.resolution=32", "data.val_fraction=0", "trainer.limit_val_batches=0",
              "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false",
              "callbacks.sample_grid.every_n_steps=1000000", "callbacks.model_checkpoint.every_n_train_steps=1000000",
              f"paths.cache_dir={work / 'cache'}"]
    off = ["callbacks.encoded_cache.latents=false", "callbacks.encoded_cache.text=false"]
    s3_set = ["data=streaming", "data.remote=s3://bench/data", f"data.local={work / 'scratch-s3'}"]
    cases = {"folder, scan cold": [*off, f"data.path={work / 'folder'}"],
             "folder, scan cached": [*off, f"data.path={work / 'folder'}"],
             "shards, local disk": [*off, f"data.path={work / 'shards'}", f"data.local={work / 'scratch-local'}"],
             "shards, S3 (moto), first run": [*off, *s3_set, "callbacks.encoded_cache.from_prepared=false"],
             "shards, S3, shards already in data.local": [*off, *s3_set],
             # the caches on (the default), each start with an empty cache dir: encoding at start-up...
             "shards, S3, encoded at start-up (cache cold)": [*s3_set, "callbacks.encoded_cache.from_prepared=false"],
             # ...against fetching the rows task=prepare stored (the step runs the UNet alone in both)
             "shards with encoded rows, S3 (fetched)": s3_set}
    table = {}
    for i, (name, extra) in enumerate(cases.items()):
        if any(name.startswith(x) for x in a.skip):
            continue
        if "encoded" in name:   # an empty cache dir for each of these runs
            extra = [*extra, f"paths.cache_dir={work / f'cache-{i}-start'}"]
        start = run([*common, *extra, "trainer.max_steps=1"], s3, work / f"start-{i}")
        table[name] = {"start_to_step1_wall_s": start["wall_s"]}
        if "encoded" in name:
            extra = [*extra[:-1], f"paths.cache_dir={work / f'cache-{i}-speed'}"]
        if i not in (1, 4):   # the throughput of a second start is the first's
            speed = run([*common, *extra, f"trainer.max_steps={a.steps}"], s3, work / f"speed-{i}")
            table[name].update(img_per_s=speed["img_per_s"], peak_rss_mb=speed["peak_rss_mb"])
        print(name, table[name], flush=True)
    server.stop()
    result = {"images": a.images, "steps": a.steps, "prepare": prep, "train": table}
    print(json.dumps(result, indent=1))
    if a.json:
        a.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
