"""What identifying the model by content costs: the first SHA-256 of a multi-GB weights file, then
the cached look-up (path + size + mtime) every later run pays.

    python bench/content_hash.py --gb 5 [--dir /tmp]      # writes, hashes and deletes a file of random bytes

Prints one JSON line: the file size, the first hash's seconds and GB/s, the cached look-up's
milliseconds (median of 100), and the same after the page cache was dropped where that is allowed
(as root: the cold read from disk), else "not measured".
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from toolkit.run.fingerprint import file_digest  # noqa: E402


def drop_page_cache() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
        return True
    except OSError:
        return False


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gb", type=float, default=5.0)
    ap.add_argument("--dir", default="/tmp")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="content-hash-", dir=args.dir))
    weights, cache = work / "model.safetensors", work / "cache"
    try:
        block = os.urandom(1 << 26)   # 64 MiB, repeated (the hash reads every byte either way)
        with open(weights, "wb") as fh:
            for _ in range(int(args.gb * (1 << 30)) // len(block)):
                fh.write(block)
        size = weights.stat().st_size
        cold = None
        if drop_page_cache():
            t = time.perf_counter()
            file_digest(weights, None)
            cold = time.perf_counter() - t
        t = time.perf_counter()
        digest = file_digest(weights, cache)   # first hash: reads the whole file, records it
        first = time.perf_counter() - t
        cached = []
        for _ in range(100):
            t = time.perf_counter()
            assert file_digest(weights, cache) == digest
            cached.append(time.perf_counter() - t)
        print(json.dumps({"bytes": size, "first_s": round(first, 2), "first_GB_per_s": round(size / first / 1e9, 2),
                          "cold_from_disk_s": round(cold, 2) if cold is not None else "not measured",
                          "cached_ms_median": round(statistics.median(cached) * 1e3, 3),
                          "cached_ms_max": round(max(cached) * 1e3, 3)}))
    finally:
        for f in sorted(work.rglob("*"), reverse=True):
            f.unlink() if f.is_file() else f.rmdir()
        work.rmdir()


if __name__ == "__main__":
    main()
