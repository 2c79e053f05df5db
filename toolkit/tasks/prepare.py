"""Task ``prepare``: a captioned dataset into tar shards with a wids index (``toolkit.data.shards``),
in a local folder or an S3-compatible prefix (``toolkit.data.storage``).

    python run.py task=prepare data.path=my_data prepare.output=/data/my_data_shards
    AWS_ENDPOINT_URL=http://minio:9000 python run.py task=prepare data.path=my_data prepare.output=s3://b/my_data

The data policy (``data.policy``) runs here, once, as the pre-training scan does: rejected items
are listed in ``prepare_report.json`` (next to the shards and in the run dir) and never reach a
shard. Kept items keep their order; shard ``j`` holds kept items ``[j·S, (j+1)·S)``.

Resumable without duplicates or losses: the plan (source fingerprint, policy, shard size) is
written first; each shard is written to a file one sample at a time and published whole (a local
rename; an S3 upload, multipart above ``prepare.multipart_mb``), then its sidecar with its count
and SHA-256; a shard counts as done when its sidecar is there. Memory does not grow with the
shard's size (``bench/prepare_memory.py``). Run the same command
again after a kill: the done shards are skipped, the rest written, the index last. An output
holding another dataset's or other settings' shards is refused, never overwritten.

Spread over processes (``torchrun --nproc-per-node N run.py task=prepare …``, or N srun tasks):
rank ``r`` of ``W`` scans the ``r``-th contiguous block of the source rows and writes its own
sub-stream ``part-<r>/``; rank zero merges the parts, in rank order, into the one index. The
kept items come out in the same order as from one process (only the shard boundaries differ);
the processes meet through files in the output (no process group), so they may run on any
machines that reach it. A killed prepare is continued with the same number of processes.

``prepare.encode=true`` also stores the frozen encoders' rows (``toolkit.callbacks.encoded_cache``:
VAE posterior parameters per flip variant, micro-conditioning, text embeddings per caption and
field) under ``encoded/<store>/`` with ``encoded.json`` naming each store's settings (encoder
fingerprints, preprocessing) and files' SHA-256; each process encodes its block. Training from the
set fetches them instead of encoding (and refuses rows made with other encoders, naming both
fingerprints). Several models' rows can be added to one set, one ``task=prepare`` each.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from toolkit.data.datamodule import CaptionedImages
from toolkit.data.names import UnsafeName
from toolkit.data.prepared import deciding
from toolkit.data.shards import (
    ENCODED,
    ENCODED_SCHEMA,
    INDEX,
    PART_SCHEMA,
    PLAN,
    PLAN_SCHEMA,
    REPORT,
    REPORT_SCHEMA,
    SIDECAR_SCHEMA,
    STORES_SCHEMA,
    Sample,
    check_encoded,
    check_shard,
    index,
    member_spans,
    shard_name,
    sidecar,
    sidecar_name,
    write_tar,
)
from toolkit.data.sources import fingerprint_listing, image_bytes, load_captioned
from toolkit.data.storage import StorageError, open_store, read_json
from toolkit.data.validate import DataPolicy, ScanResult, check_caption, item_name, require_items, save_scan, scan
from toolkit.run.identity import identity
from toolkit.run.world import job_world

log = logging.getLogger(__name__)


def image_ext(data: bytes) -> str:
    fmt = (Image.open(io.BytesIO(data)).format or "bin").lower()
    return {"jpeg": "jpg", "tiff": "tif"}.get(fmt, fmt)


def run(cfg: DictConfig) -> dict[str, Any]:
    d, p = cfg.data, cfg.prepare
    rank, world = job_world().rank, job_world().size
    policy = DataPolicy(**OmegaConf.to_container(d.policy, resolve=True))
    min_side = policy.min_side or d.resolution   # data.resolution: the model's, from run.py (toolkit.model_defaults)
    if not min_side:
        raise ValueError("task=prepare needs data.resolution or data.policy.min_side (the smallest side kept); "
                         "run.py sets data.resolution from model.name_or_path")
    store = open_store(str(p.output), p.endpoint_url, p.multipart_mb)
    store.check()
    ds = load_captioned(d.path, split=d.split, image_column=d.image_column, caption_column=d.caption_column,
                        revision=d.revision)
    local = Path(str(d.path)).expanduser()
    source = {"path": str(d.path), "split": d.split, "revision": d.revision, "rows": len(ds),
              "fingerprint": fingerprint_listing(local) if local.is_dir() else ds._fingerprint}
    # the policy's fields that decide which items are kept (training compares them: PreparedDataset.check_plan),
    # and the shards' identity: data + prepare settings but what cannot change them (toolkit.run.identity,
    # view plan)
    plan = {"source": source, "policy": policy.deciding(), "min_side": int(min_side),
            "samples_per_shard": int(p.samples_per_shard), "format": "webdataset tar + wids index v1",
            "identity": identity(cfg, "plan").keys}
    if world > 1:   # a one-process prepare's plan (and layout) stays as it was
        plan["processes"] = world
    if store.exists(PLAN):
        # compared by meaning: prepares made before the plan recorded the policy's deciding fields
        # recorded its repr, and before it recorded the identity none (they are continued and extended
        # as they were)
        before, now = (as_meant(x) for x in (read_json(store, PLAN, PLAN_SCHEMA), plan))
        if "identity" not in before:
            del now["identity"]
        if before != now:
            changed = sorted(k for k in now.keys() | before.keys() if before.get(k) != now.get(k))
            if "identity" in changed and isinstance(before.get("identity"), dict):   # name the keys
                was, ident = before["identity"], now["identity"]
                changed = [*(k for k in changed if k != "identity"),
                           *sorted(k for k in was.keys() | ident.keys() if was.get(k) != ident.get(k))]
            hint = (f" (it was started with {before.get('processes', 1)} processes: continue it with as many)"
                    if changed == ["processes"] else "")
            raise StorageError(f"{store.url} holds a prepare of another dataset or other settings (differs in: "
                               f"{', '.join(changed)}){hint}; it is never overwritten: choose another prepare.output")
    elif rank == 0:
        store.put(PLAN, json.dumps(plan, indent=1, sort_keys=True).encode())
    if store.exists(INDEX):
        log.info("%s is already prepared (%s)", store.url, INDEX)
        counts = read_json(store, REPORT, REPORT_SCHEMA)["counts"]
    else:
        write_part(cfg, store, ds, policy, int(min_side), rank, world)
        counts = merge_parts(cfg, store, source, plan, world) if rank == 0 else {}
    if p.encode:
        wait_for(store, [INDEX], "the index (rank 0 merges the parts)", p.wait_s)
        counts = {**counts, **encode(cfg, store, rank, world)}
    return counts


def as_meant(plan: dict[str, Any]) -> dict[str, Any]:
    """A plan with its policy as the fields that decide what is kept (``toolkit.data.prepared.deciding``)."""
    return {**plan, "policy": deciding(plan["policy"])}


def part_name(rank: int, world: int) -> str:
    return f"parts/{rank:03d}-of-{world:03d}.json"


def write_part(cfg: DictConfig, store: Any, ds: Any, policy: DataPolicy, min_side: int, rank: int,
               world: int) -> None:
    """This process's sub-stream: scan its block of source rows, shard the kept ones, publish."""
    d, size = cfg.data, int(cfg.prepare.samples_per_shard)
    if store.exists(part_name(rank, world)):
        return
    lo, hi = len(ds) * rank // world, len(ds) * (rank + 1) // world
    wrap = CaptionedImages(ds, d.image_column, d.caption_column, min_side, True, False, policy)
    result = scan(len(ds), wrap.raw, policy, min_side, desc="checking data", rows=range(lo, hi))
    prefix = f"part-{rank:03d}/" if world > 1 else ""
    shards, written = [], 0
    for j, start in enumerate(range(0, len(result.keep), size)):
        name = shard_name(j, prefix)
        if store.exists(sidecar_name(name)):   # published by an earlier attempt
            where = f"{store.url}/{sidecar_name(name)}"
            side = read_json(store, sidecar_name(name), SIDECAR_SCHEMA)
            meta = check_shard({k: v for k, v in side.items() if k != "samples"}, where)
            if meta["url"] != name:
                raise UnsafeName(f"{where}: names shard {meta['url']!r}, not {name!r}; refused")
            shards.append(meta)
            continue
        rows = shard_samples(wrap, result.keep[start: start + size], result.sizes[start: start + size], policy)
        with store.staged(name) as f:   # published whole on leaving the block (a rename; an S3 upload)
            written_samples = write_tar(f, rows)
            spans = member_spans(f)
            meta = sidecar(name, len(written_samples), f)
        # what training reads at start-up: captions, sizes, and where each image's bytes lie
        rows_meta = [{"caption": x.caption, **x.meta, "span": spans[f"{x.key}.{x.ext}"]} for x in written_samples]
        store.put(sidecar_name(name), json.dumps({**meta, "samples": rows_meta}).encode())   # after the shard
        shards.append(meta)
        written += 1
    store.put(part_name(rank, world), json.dumps({"shards": shards, "written_now": written,
                                                  "scan": asdict(result)}).encode())
    log.info("prepare rank %d/%d: source rows [%d, %d): %s; %d shards (%d written now)", rank, world, lo, hi,
             result.summary(), len(shards), written)


def shard_samples(wrap: CaptionedImages, rows: list[int], sizes: list[list[int]], policy: DataPolicy
                  ) -> Iterator[Sample]:
    """The kept rows as tar samples, one at a time (a shard is never held in memory)."""
    for row, (w, h) in zip(rows, sizes, strict=True):
        image, caption, problem = wrap.raw(row)
        data = image_bytes(image)
        yield Sample(f"{row:09d}", data, image_ext(data), check_caption(caption, problem, policy),
                     {"width": w, "height": h, "source": item_name(image, row),
                      "sha256": hashlib.sha256(data).hexdigest()})


def wait_for(store: Any, names: list[str], what: str, timeout_s: float) -> None:
    """Until every name exists in the store (the processes of a prepare meet through its files)."""
    t0 = last = time.monotonic()
    while missing := [n for n in names if not store.exists(n)]:
        now = time.monotonic()
        if now - t0 > timeout_s:
            raise TimeoutError(f"{store.url}: after {timeout_s:.0f} s still no {', '.join(missing)} ({what}): did a "
                               "process of this prepare fail? Run the same command again to continue it")
        if now - last > 60:
            log.info("waiting for %d of %d: %s", len(missing), len(names), what)
            last = now
        time.sleep(1.0)


def merge_parts(cfg: DictConfig, store: Any, source: dict[str, Any], plan: dict[str, Any], world: int
                ) -> dict[str, Any]:
    """Rank zero: the parts, in rank order, into one report and one index (published last)."""
    d = cfg.data
    wait_for(store, [part_name(r, world) for r in range(world)], "the other processes' parts", cfg.prepare.wait_s)
    parts = [read_json(store, part_name(r, world), PART_SCHEMA) for r in range(world)]
    result = ScanResult(keep=[], total=0)
    for part in parts:
        scanned = ScanResult(**{k: part["scan"][k] for k in ("keep", "total", "rejected", "converted", "sizes")})
        result.keep += scanned.keep
        result.sizes += scanned.sizes
        result.total += scanned.total
        result.rejected += scanned.rejected
        result.converted += scanned.converted
    require_items(result, str(d.path))
    shards = [check_shard(s, f"{store.url}/{part_name(r, world)} shard {j}")
              for r, part in enumerate(parts) for j, s in enumerate(part["shards"])]
    report = {"source": source, "counts": {"total": result.total, "kept": len(result.keep),
                                           "rejected": len(result.rejected), "shards": len(shards),
                                           "shards_written_now": sum(part["written_now"] for part in parts),
                                           "processes": world},
              "rejected": result.rejected, "converted": result.converted, "summary": result.summary()}
    store.put(REPORT, json.dumps(report, indent=1).encode())
    save_scan(result, Path(cfg.paths.output_dir) / "data_report.json")
    (Path(cfg.paths.output_dir) / REPORT).write_text(json.dumps(report, indent=1))
    store.put(INDEX, json.dumps(index(shards, Path(str(d.path)).name, plan), indent=1).encode())   # last
    (log.warning if result.rejected else log.info)("prepare %s -> %s: %s; %d shards in %d parts", d.path,
                                                   store.url, result.summary(), len(shards), world)
    return report["counts"]


def encode(cfg: DictConfig, store: Any, rank: int, world: int) -> dict[str, Any]:
    """The frozen encoders' rows of this process's block of prepared rows, into ``encoded/``; rank
    zero adds the stores to ``encoded.json`` once every process has published its part."""
    settings = {"model": OmegaConf.to_container(cfg.model, resolve=True),
                "pretrained": OmegaConf.to_container(cfg.module.pretrained, resolve=True),
                "data": {k: OmegaConf.to_container(cfg.data, resolve=True).get(k) for k in (
                    "resolution", "center_crop", "random_flip", "buckets", "policy", "masks", "tags")},
                # the encoding batch follows memory.budget_gib; where traces are kept: no
                "cache": {**{k: v for k, v in OmegaConf.to_container(cfg.callbacks.encoded_cache, resolve=True).items()
                             if k not in ("dirpath", "from_prepared", "memory")},
                          "budget_gib": cfg.memory.budget_gib},
                # the model by content: new weights at the same path (or a moved hub revision) are another job
                "content": {k: v for k, v in identity(cfg, "run").keys.items() if k.startswith("content.model")}}
    job = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]
    done = read_json(store, ENCODED, ENCODED_SCHEMA) if store.exists(ENCODED) else {"stores": {}, "jobs": {}}
    if job in done["jobs"]:
        log.info("%s already carries these encoders' rows (%s)", store.url, ENCODED)
        return done["jobs"][job]["counts"]
    part = f"encoded/parts/{job}-{rank:03d}-of-{world:03d}.json"
    if not store.exists(part):
        store.put(part, json.dumps(encode_block(cfg, store, rank, world)).encode())
    if rank != 0:
        return {}
    names = [f"encoded/parts/{job}-{r:03d}-of-{world:03d}.json" for r in range(world)]
    wait_for(store, names, "the other processes' encoded rows", cfg.prepare.wait_s)
    stores: dict[str, Any] = {}
    for name in names:
        for folder, entry in check_encoded(read_json(store, name, STORES_SCHEMA), f"{store.url}/{name}").items():
            merge_store(stores, folder, entry)
    counts = {"encoded_stores": len(stores), "encoded_files": sum(len(e["files"]) for e in stores.values())}
    done = read_json(store, ENCODED, ENCODED_SCHEMA) if store.exists(ENCODED) else {"stores": {}, "jobs": {}}
    check_encoded(done["stores"], f"{store.url}/{ENCODED}")
    for folder, entry in stores.items():
        merge_store(done["stores"], folder, entry)
    done["jobs"][job] = {"settings": settings, "counts": counts, "processes": world}
    store.put(ENCODED, json.dumps(done, indent=1, sort_keys=True, default=str).encode())
    log.info("prepare: encoded rows of %s in %s (%s)", cfg.model.name_or_path, store.url, counts)
    return counts


def merge_store(stores: dict[str, Any], folder: str, entry: dict[str, Any]) -> None:
    """``entry`` (settings, files, sizes) into ``stores[folder]``."""
    into = stores.setdefault(folder, {"settings": entry["settings"], "files": {}, "sizes": {}})
    into["files"].update(entry["files"])
    into.setdefault("sizes", {}).update(entry.get("sizes", {}))


def encode_block(cfg: DictConfig, store: Any, rank: int, world: int) -> dict[str, Any]:
    """Encode rows ``[lo, hi)`` of the prepared set (this process's share) with the module training
    builds (same weights, dtypes and speed settings: same fingerprints), through the training cache's
    own code; upload each store's files. Returns {store folder: {"settings", "files"}}."""
    staging = Path(cfg.paths.output_dir) / f"encoded-staging-{rank:03d}"
    data = OmegaConf.to_container(cfg.data, resolve=True)   # the training data's settings, on the prepared rows
    data.update(path=store.url, remote=None, val_fraction=0.0, validation_split=None, report_dir=None,
                scan_cache_dir=None, local=data.get("local") or f"{cfg.paths.cache_dir}/prepared")
    dm = instantiate(data)
    dm.setup("fit")
    s = dm.train_set
    lo, hi = len(s) * rank // world, len(s) * (rank + 1) // world
    s.indices = s.indices[lo:hi]
    s.sizes = s.sizes[lo:hi] if s.sizes is not None else None
    device = cfg.prepare.device
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    module = instantiate(cfg.module).to(device)
    cache = instantiate(cfg.callbacks.encoded_cache, dirpath=str(staging), from_prepared=False)
    used = cache.encode(module, dm, {"rank": 0, "world_size": 1}, f"prepare rank {rank}")
    out = {}
    for folder, settings in used.items():
        files, sizes = {}, {}
        for f in sorted((staging / folder).iterdir(), key=lambda f: (f.name.endswith(".keys.json"), f.name)):
            with open(f, "rb") as src, store.staged(f"encoded/{folder}/{f.name}") as dst:   # streamed: any size
                shutil.copyfileobj(src, dst, 4 * 2**20)
                src.seek(0)
                files[f.name] = hashlib.file_digest(src, "sha256").hexdigest()
                sizes[f.name] = src.tell()
        out[folder] = {"settings": settings, "files": files, "sizes": sizes}
    log.info("prepare rank %d/%d: encoded prepared rows [%d, %d) into %d stores", rank, world, lo, hi, len(out))
    return out
