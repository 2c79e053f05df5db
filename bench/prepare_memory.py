"""Peak RSS of ``task=prepare`` and of a first fetch against the shard size: does memory grow with
a shard? One shard of S MB of large random-noise PNGs (2048², stored uncompressed: ~12.6 MB each,
so the shard's size is the images'), prepared to a folder and to an S3 server (moto in this
process), then fetched once from each into an empty ``data.local`` (``PreparedDataset(...)[0]``),
each in a process of its own, measured with ``/usr/bin/time``.

    python bench/prepare_memory.py --sizes 50 200 800                       # this checkout
    python bench/prepare_memory.py --sizes 50 200 800 --roots before=/tmp/old after=.   # A/B

``--roots`` runs the same steps against other checkouts (e.g. ``git archive`` of an older commit,
with ``data/`` linked in), alternating per size. The images live in a temp folder (``$TMPDIR``),
deleted after each size; about 4x the largest size is needed on disk.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SIDE = 2048
FETCH = "import sys; from toolkit.data.prepared import PreparedDataset; PreparedDataset(*sys.argv[1:])[0]"


def make_images(folder: Path, n: int) -> None:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.frombytes("RGB", (SIDE, SIDE), rng.bytes(SIDE * SIDE * 3)).save(folder / f"{i:04d}.png",
                                                                             compress_level=0)
        (folder / f"{i:04d}.txt").write_text(f"noise {i}")


def peak_rss_mb(cmd: list[str], root: Path, env: dict[str, str]) -> int:
    """Peak RSS of ``cmd`` (a Python process run in checkout ``root``), in MB."""
    res = subprocess.run(["/usr/bin/time", "-f", "MAXRSS_KB %M", *cmd], cwd=root, capture_output=True, text=True,
                         env={**os.environ, **env, "PYTHONPATH": str(root)})
    if res.returncode:
        sys.exit(f"failed in {root}: {' '.join(cmd)}\n{res.stderr[-3000:]}")
    return next(int(line.split()[1]) // 1024 for line in res.stderr.splitlines() if line.startswith("MAXRSS_KB"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[50, 200, 800], help="shard sizes, MB")
    ap.add_argument("--roots", nargs="+", default=[f"this={ROOT}"], help="name=checkout, one or more")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    roots = {r.split("=", 1)[0]: Path(r.split("=", 1)[1]).resolve() for r in a.roots}
    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    s3 = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
          "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    client = boto3.client("s3", endpoint_url=s3["AWS_ENDPOINT_URL"], aws_access_key_id="bench",
                          aws_secret_access_key="bench", region_name="us-east-1")
    client.create_bucket(Bucket="bench")
    rows = []
    for size in a.sizes:
        n = max(1, round(size * 2**20 / (SIDE * SIDE * 3)))
        work = Path(tempfile.mkdtemp(prefix="bench-prepare-memory-"))
        try:
            make_images(work / "images", n)
            for name, root in roots.items():
                out = {"shard_mb": size, "images": n, "checkout": name}
                for where, url in (("local", str(work / f"{name}-shards")), ("s3", f"s3://bench/{name}-{size}")):
                    out[f"prepare_{where}_mb"] = peak_rss_mb(
                        [sys.executable, "run.py", "task=prepare", f"data.path={work / 'images'}", "data.resolution=64",
                         f"prepare.output={url}", f"prepare.samples_per_shard={n}",
                         f"hydra.run.dir={work / f'{name}-run-{where}'}"], root, s3)
                    out[f"fetch_{where}_mb"] = peak_rss_mb(
                        [sys.executable, "-c", FETCH, url, "image", "text", str(work / f"{name}-local-{where}")], root,
                        s3)
                out["shard_bytes"] = next((work / f"{name}-shards").glob("*.tar")).stat().st_size
                print(json.dumps(out), flush=True)
                rows.append(out)
                for obj in client.list_objects_v2(Bucket="bench", Prefix=f"{name}-{size}/").get("Contents", []):
                    client.delete_object(Bucket="bench", Key=obj["Key"])
        finally:
            shutil.rmtree(work)
    server.stop()
    print("\n| checkout | shard | prepare → folder | prepare → S3 | first fetch, folder | first fetch, S3 |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['checkout']} | {r['shard_bytes'] / 2**20:.0f} MB ({r['images']} images) | "
              f"{r['prepare_local_mb']} MB | {r['prepare_s3_mb']} MB | {r['fetch_local_mb']} MB | "
              f"{r['fetch_s3_mb']} MB |")
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
