"""Task ``prepare``: a captioned dataset into tar shards with a wids index (``toolkit.data.shards``),
in a local folder or an S3-compatible prefix (``toolkit.data.storage``).

    python run.py task=prepare data.path=my_data prepare.output=/data/my_data_shards
    AWS_ENDPOINT_URL=http://minio:9000 python run.py task=prepare data.path=my_data prepare.output=s3://b/my_data

The data policy (``data.policy``) runs here, once, as the pre-training scan does: rejected items
are listed in ``prepare_report.json`` (next to the shards and in the run dir) and never reach a
shard. Kept items keep their order; shard ``j`` holds kept items ``[j·S, (j+1)·S)``.

Resumable without duplicates or losses: the plan (source fingerprint, policy, shard size) is
written first; each shard is published whole (a local rename, one S3 PUT), then its sidecar with
its count and SHA-256; a shard counts as done when its sidecar is there. Run the same command
again after a kill: the done shards are skipped, the rest written, the index last. An output
holding another dataset's or other settings' shards is refused, never overwritten.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from PIL import Image

from toolkit.callbacks.encoded_cache import image_bytes
from toolkit.data.datamodule import CaptionedImages
from toolkit.data.shards import INDEX, PLAN, REPORT, Sample, index, shard_name, sidecar, sidecar_name, tar_bytes
from toolkit.data.sources import fingerprint_listing, load_captioned
from toolkit.data.storage import StorageError, open_store
from toolkit.data.validate import DataPolicy, check_caption, item_name, require_items, save_scan, scan

log = logging.getLogger(__name__)


def image_ext(data: bytes) -> str:
    fmt = (Image.open(io.BytesIO(data)).format or "bin").lower()
    return {"jpeg": "jpg", "tiff": "tif"}.get(fmt, fmt)


def run(cfg: DictConfig) -> dict[str, Any]:
    d, p = cfg.data, cfg.prepare
    policy = DataPolicy(**OmegaConf.to_container(d.policy, resolve=True))
    min_side = policy.min_side or d.resolution
    if not min_side:
        raise ValueError("task=prepare needs data.resolution or data.policy.min_side (the smallest side kept)")
    store = open_store(str(p.output), p.endpoint_url)
    store.check()
    ds = load_captioned(d.path, split=d.split, image_column=d.image_column, caption_column=d.caption_column,
                        revision=d.revision)
    local = Path(str(d.path)).expanduser()
    source = {"path": str(d.path), "split": d.split, "revision": d.revision, "rows": len(ds),
              "fingerprint": fingerprint_listing(local) if local.is_dir() else ds._fingerprint}
    plan = {"source": source, "policy": repr(policy), "min_side": int(min_side),
            "samples_per_shard": int(p.samples_per_shard), "format": "webdataset tar + wids index v1"}
    if store.exists(PLAN):
        before = json.loads(store.get(PLAN))
        if before != plan:
            changed = sorted(k for k in plan if before.get(k) != plan[k])
            raise StorageError(f"{store.url} holds a prepare of another dataset or other settings (differs in: "
                               f"{', '.join(changed)}); it is never overwritten: choose another prepare.output")
        if store.exists(INDEX):
            log.info("%s is already prepared (%s): nothing to do", store.url, INDEX)
            return json.loads(store.get(REPORT))["counts"]
    else:
        store.put(PLAN, json.dumps(plan, indent=1, sort_keys=True).encode())

    wrap = CaptionedImages(ds, d.image_column, d.caption_column, int(min_side), True, False, policy)
    result = scan(len(ds), wrap.raw, policy, int(min_side), desc="checking data")
    require_items(result, str(d.path))
    size = int(p.samples_per_shard)
    shards, written = [], 0
    for j, start in enumerate(range(0, len(result.keep), size)):
        rows = list(zip(result.keep[start: start + size], result.sizes[start: start + size]))
        if store.exists(sidecar_name(j)):   # published by an earlier attempt
            shards.append({k: v for k, v in json.loads(store.get(sidecar_name(j))).items() if k != "samples"})
            continue
        samples = []
        for n, (row, (w, h)) in enumerate(rows, start):
            image, caption, problem = wrap.raw(row)
            data = image_bytes(image)
            samples.append(Sample(f"{n:09d}", data, image_ext(data), check_caption(caption, problem, policy),
                                  {"width": w, "height": h, "source": item_name(image, row),
                                   "sha256": hashlib.sha256(data).hexdigest()}))
        blob = tar_bytes(samples)
        store.put(shard_name(j), blob)
        meta = sidecar(j, samples, blob)
        rows_meta = [{"caption": x.caption, **x.meta} for x in samples]   # what training reads at start-up
        store.put(sidecar_name(j), json.dumps({**meta, "samples": rows_meta}).encode())   # after the shard: "done"
        shards.append(meta)
        written += 1
    report = {"source": source, "counts": {"total": result.total, "kept": len(result.keep),
                                           "rejected": len(result.rejected), "shards": len(shards),
                                           "shards_written_now": written},
              "rejected": result.rejected, "converted": result.converted, "summary": result.summary()}
    store.put(REPORT, json.dumps(report, indent=1).encode())
    save_scan(result, Path(cfg.paths.output_dir) / "data_report.json")
    (Path(cfg.paths.output_dir) / REPORT).write_text(json.dumps(report, indent=1))
    store.put(INDEX, json.dumps(index(shards, Path(str(d.path)).name, plan), indent=1).encode())   # last
    (log.warning if result.rejected else log.info)("prepare %s -> %s: %s; %d shards (%d written now)",
                                                   d.path, store.url, result.summary(), len(shards), written)
    return report["counts"]
