"""A prepared dataset: webdataset-layout tar shards with a wids index (``index.json``), readable
by ``wids.ShardListDataset`` (map-style: any item by its index, so the toolkit's own resumable
sampler keeps its exact-resume and world-size guarantees on it).

Sample ``k`` is the members ``<k>.<ext>`` (the image file's bytes, unchanged), ``<k>.txt`` (the
caption) and ``<k>.json`` (caption, size after decoding, source name, SHA-256 of the image
bytes). Tars are written deterministically (sorted members, zero mtimes and owners): the same
items give the same bytes, so a shard's SHA-256 in the index identifies its content.

Why tar + wids and not mosaicml-streaming or litdata (measured with pip's resolver, 2026-12):
``mosaicml-streaming`` 0.13.0 would downgrade numpy to 2.1.3 and transformers to 4.57 and
replace torch 2.13 with 2.14 (+ torchvision); ``litdata`` 0.2.76 would replace torch with 2.14
for torchvision 0.29. ``wids`` 0.1.11 needs only braceexpand, numpy and pyyaml.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from dataclasses import dataclass
from typing import Any

INDEX = "index.json"
PLAN = "prepare_plan.json"
REPORT = "prepare_report.json"
ENCODED = "encoded.json"   # prepare.encode=true: the frozen encoders' rows, per store (``encoded/<store>/``)


@dataclass(frozen=True)
class Sample:
    key: str
    image: bytes
    ext: str
    caption: str
    meta: dict[str, Any]


def shard_name(j: int, part: str = "") -> str:
    """Shard ``j`` of a sub-stream (``part``: ``part-<rank>/`` of a prepare spread over processes)."""
    return f"{part}shard-{j:06d}.tar"


def sidecar_name(shard: str) -> str:
    """Published after its shard: a shard counts as done when this exists."""
    return shard.removesuffix(".tar") + ".json"


def tar_bytes(samples: list[Sample]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for s in samples:
            meta = json.dumps({**s.meta, "caption": s.caption}, sort_keys=True).encode()
            for name, data in ((f"{s.key}.{s.ext}", s.image), (f"{s.key}.json", meta),
                               (f"{s.key}.txt", s.caption.encode())):
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def member_spans(blob: bytes) -> dict[str, tuple[int, int]]:
    """(byte offset, size) of each member's data in a tar, as ``tarfile`` reads it back: what lets a
    reader take one sample with one ``pread``, whatever the number of shards."""
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r") as tar:
        return {m.name: (m.offset_data, m.size) for m in tar.getmembers()}


def sidecar(name: str, samples: list[Sample], data: bytes) -> dict[str, Any]:
    return {"url": name, "nsamples": len(samples), "filesize": len(data),
            "sha256": hashlib.sha256(data).hexdigest()}


def index(shards: list[dict[str, Any]], name: str, plan: dict[str, Any]) -> dict[str, Any]:
    """The wids descriptor (``shardlist`` with relative URLs) plus what the toolkit checks."""
    return {"__kind__": "wids-shard-index-v1", "wids_version": 1, "name": name, "shardlist": shards,
            "toolkit": plan}
