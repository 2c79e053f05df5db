"""A prepared dataset: webdataset-layout tar shards with a wids index (``index.json``), readable
by ``wids.ShardListDataset`` (map-style: any item by its index, so the toolkit's own resumable
sampler keeps its exact-resume and world-size guarantees on it).

Sample ``k`` is the members ``<k>.<ext>`` (the image file's bytes, unchanged), ``<k>.txt`` (the
caption) and ``<k>.json`` (caption, size after decoding, source name, SHA-256 of the image
bytes). Tars are written deterministically (sorted members, zero mtimes and owners): the same
items give the same bytes, so a shard's SHA-256 in the index identifies its content. A shard is
written to its file one sample at a time (``write_tar``): its size is bounded by the disk, not
by memory.

Readers never extract a tar: training reads each sample at the byte span its sidecar records
(``PreparedDataset``), so the member names inside a shard never become paths. What the index and
the sidecars say is checked before use (``check_shard``, ``check_sidecar``, ``check_encoded``,
with ``toolkit.data.names``): names inside the set, SHA-256s as hex, counts that agree, spans
inside their shard.

Why tar + wids and not mosaicml-streaming or litdata (measured with pip's resolver, 2026-12):
``mosaicml-streaming`` 0.13.0 would downgrade numpy to 2.1.3 and transformers to 4.57 and
replace torch 2.13 with 2.14 (+ torchvision); ``litdata`` 0.2.76 would replace torch with 2.14
for torchvision 0.29. ``wids`` 0.1.11 needs only braceexpand, numpy and pyyaml.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass
from typing import IO, Any

from toolkit.data.names import MAX_JSON_BYTES, UnsafeName, check_count, check_name, check_schema, check_sha256

INDEX = "index.json"
PLAN = "prepare_plan.json"
REPORT = "prepare_report.json"
ENCODED = "encoded.json"   # prepare.encode=true: the frozen encoders' rows, per store (``encoded/<store>/``)

# The shape of every JSON file of a set, as task=prepare writes it (``toolkit.data.names.check_schema``):
# read_json checks it before any field is used, so a misfit is a refusal naming the file and field,
# never an AttributeError / TypeError deep in a reader. What the values mean (names, SHA-256s,
# counts, spans) is checked by the functions below.
_SHARD = {"url": str, "nsamples": int, "filesize": int, "sha256": str}
_POLICY = (dict, str, type(None))   # a dict since 0.1.0 (DataPolicy.deciding()); before, the policy's repr
PLAN_SCHEMA = {"source": dict, "policy": _POLICY, "min_side": int, "samples_per_shard": int, "format": str,
               "processes?": int, "identity?": dict}
INDEX_SCHEMA = {"shardlist": [_SHARD], "toolkit?": {"policy?": _POLICY, "min_side?": (int, type(None))}}
SIDECAR_SCHEMA = {**_SHARD, "samples": [{"span": [int], "sha256": str, "width": int, "height": int, "caption": str,
                                         "source": str}]}
PART_SCHEMA = {"shards": [_SHARD], "written_now": int,
               "scan": {"keep": [int], "total": int, "rejected": [dict], "converted": [dict], "sizes": [[int]]}}
REPORT_SCHEMA = {"counts": {str: int}}
STORES_SCHEMA = {str: {"settings": dict, "files": {str: str}, "sizes?": {str: int}}}
ENCODED_SCHEMA = {"stores": STORES_SCHEMA, "jobs": {str: {"counts": {str: int}}}}
KEYS_SCHEMA = [str]   # an encoded store's ``<shard>.keys.json``: the key of each row of ``<shard>.npy``


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


def write_tar(f: IO[bytes], samples: Iterable[Sample]) -> list[Sample]:
    """The samples' members into a tar written to ``f``, one sample at a time (each sample's image
    bytes are dropped once written); returns the samples without their image bytes."""
    out = []
    with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for s in samples:
            meta = json.dumps({**s.meta, "caption": s.caption}, sort_keys=True).encode()
            for name, data in ((f"{s.key}.{s.ext}", s.image), (f"{s.key}.json", meta),
                               (f"{s.key}.txt", s.caption.encode())):
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                tar.addfile(info, io.BytesIO(data))
            out.append(dataclasses.replace(s, image=b""))
    return out


def member_spans(f: IO[bytes]) -> dict[str, tuple[int, int]]:
    """(byte offset, size) of each member's data in the tar file ``f``, as ``tarfile`` reads it back
    (headers only: it seeks over the data): what lets a reader take one sample with one ``pread``,
    whatever the number of shards."""
    f.seek(0)
    with tarfile.open(fileobj=f, mode="r") as tar:
        return {m.name: (m.offset_data, m.size) for m in tar.getmembers()}


def sidecar(name: str, nsamples: int, f: IO[bytes]) -> dict[str, Any]:
    """The shard's entry in the index: its name, count, size and SHA-256 (read from ``f``)."""
    f.seek(0)
    sha = hashlib.file_digest(f, "sha256").hexdigest()
    return {"url": name, "nsamples": nsamples, "filesize": f.tell(), "sha256": sha}


def check_shard(meta: Any, listed_in: str) -> dict[str, Any]:
    """A shard entry (index, sidecar or part record): its name inside the set, its SHA-256, its
    count and size as integers. Raises ``UnsafeName`` naming ``listed_in`` and the value."""
    check_schema(meta, _SHARD, listed_in)
    check_name(meta.get("url"), f"{listed_in} url")
    check_name(sidecar_name(meta["url"]), f"{listed_in} url (its sidecar)")
    check_sha256(meta.get("sha256"), f"{listed_in} ({meta['url']})")
    check_count(meta.get("nsamples"), f"{listed_in} ({meta['url']})", "nsamples")
    check_count(meta.get("filesize"), f"{listed_in} ({meta['url']})", "filesize")
    return meta


def check_sidecar(side: Any, meta: dict[str, Any], listed_in: str) -> list[dict[str, Any]]:
    """A shard's sidecar against its (checked) index entry: the same shard, as many samples as the
    index counts, each with a SHA-256 and a byte span inside the shard. Returns the samples."""
    samples = check_schema(side, SIDECAR_SCHEMA, listed_in)["samples"]
    for key in ("url", "nsamples", "filesize", "sha256"):
        if side.get(key) != meta[key]:
            raise UnsafeName(f"{listed_in}: {key} {side.get(key)!r} differs from the index's {meta[key]!r}; refused: "
                             "the set may have been tampered with")
    if len(samples) != meta["nsamples"]:
        raise UnsafeName(f"{listed_in}: lists {len(samples)} samples, the index counts {meta['nsamples']}; refused")
    for i, s in enumerate(samples):
        where = f"{listed_in} sample {i}"
        if len(s["span"]) != 2:
            raise UnsafeName(f"{where}: no byte span [offset, size]")
        offset, size = check_count(s["span"][0], where, "span offset"), check_count(s["span"][1], where, "span size", 1)
        if offset + size > meta["filesize"]:
            raise UnsafeName(f"{where}: byte span [{offset}, {size}] ends at {offset + size}, past the shard's end "
                             f"({meta['filesize']} bytes, as the index records); refused: the set may have been "
                             "tampered with")
        check_sha256(s["sha256"], where)
        for key in ("width", "height"):
            check_count(s[key], where, key, 1)
    return samples


def check_encoded(stores: Any, listed_in: str) -> dict[str, Any]:
    """The stores of ``encoded.json`` (or of a part of it): each store's folder and file names
    single names inside the set, each file's SHA-256 hex and its size (when recorded) a
    non-negative integer, a key list's below ``MAX_JSON_BYTES`` (it is read whole)."""
    check_schema(stores, STORES_SCHEMA, listed_in)
    for folder, entry in stores.items():
        check_name(folder, f"{listed_in} store", single=True)
        sizes = entry.get("sizes", {})
        for file, sha in entry["files"].items():
            check_name(file, f"{listed_in} store {folder} file", single=True)
            check_sha256(sha, f"{listed_in} store {folder} file {file}")
            if file in sizes:
                high = MAX_JSON_BYTES if file.endswith(".keys.json") else None
                check_count(sizes[file], f"{listed_in} store {folder} file {file}", "size", high=high)
    return stores


def index(shards: list[dict[str, Any]], name: str, plan: dict[str, Any]) -> dict[str, Any]:
    """The wids descriptor (``shardlist`` with relative URLs) plus what the toolkit checks."""
    return {"__kind__": "wids-shard-index-v1", "wids_version": 1, "name": name, "shardlist": shards,
            "toolkit": plan}
