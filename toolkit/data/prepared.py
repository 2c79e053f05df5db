"""A prepared dataset (``task=prepare``: tar shards + wids index, local or on S3) as the rows the
training data reads (``CaptionedImages``): ``data.path=<folder or s3://bucket/prefix>``.

Start-up reads the index and one small sidecar per shard (captions, sizes, each image's byte span
in its tar), never the images: the cost grows with the number of shards. A shard is fetched on
first use into ``data.local`` (node-local scratch; files named by their SHA-256, checked on
arrival, so runs sharing the folder share the files safely); a sample is one read at its span,
checked against its SHA-256. Map-style (any sample by its index), so the toolkit's resumable
sampler keeps exact resume and world-size independence; the shards stay readable by wids and
webdataset (tested). The data policy ran at prepare time: the scan is not repeated
(``scan_result``), and a run whose policy would keep other items is refused (``check_plan``).

A prepared set is untrusted input. Start-up checks all of it before anything is fetched: the
JSON files' sizes (``toolkit.data.names.MAX_JSON_BYTES``) and shapes (``toolkit.data.shards``'
schemas), every name that becomes a path (shard URLs, sidecars, encoded files:
``toolkit.data.names``), every SHA-256, and each sample's byte span against its shard's recorded
size. A fetch streams to disk, hashing as it goes, and stops at the first byte past the recorded
size; the tar is never extracted, so its member names never become paths. Encoded rows serve only
the set's own captions and images (``fetch_encoded``), from a cache folder of the set's own.
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import re
from bisect import bisect_right
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import numpy as np

from toolkit.atomic import atomic_open
from toolkit.data.names import UnsafeName, shown
from toolkit.data.shards import (
    ENCODED,
    ENCODED_SCHEMA,
    INDEX,
    INDEX_SCHEMA,
    KEYS_SCHEMA,
    SIDECAR_SCHEMA,
    check_encoded,
    check_shard,
    check_sidecar,
    sidecar_name,
)
from toolkit.data.storage import StorageError, open_store, parse_json, read_json
from toolkit.data.validate import DataPolicy, ScanResult
from toolkit.hashing import digest_key, text_key

CHUNK = 4 * 2**20   # a fetch streams in pieces of this size


class BadShard(RuntimeError):
    """A shard whose bytes do not match the SHA-256 its index records."""


class EncodedMismatch(ValueError):
    """A prepared set's encoded rows were made with other encoders or preprocessing than the run's."""


def is_prepared(path: str) -> bool:
    return str(path).startswith("s3://") or (Path(str(path)).expanduser() / INDEX).is_file()


class PreparedDataset:
    def __init__(self, url: str, image_column: str, caption_column: str, local: str | Path,
                 endpoint_url: str | None = None) -> None:
        self.url, self.image_column, self.caption_column = url, image_column, caption_column
        self.endpoint_url, self.local = endpoint_url, Path(local).expanduser()
        store = open_store(url, endpoint_url)
        if not store.exists(INDEX):
            raise StorageError(f"{url} is not a prepared dataset (no {INDEX}): write one with "
                               f"python run.py task=prepare data.path=<your data> prepare.output={url}")
        raw = store.get(INDEX)   # below MAX_JSON_BYTES
        self.index = parse_json(raw, f"{url}/{INDEX}", INDEX_SCHEMA)
        self.shards = [check_shard(meta, f"{url}/{INDEX} shard {j}") for j, meta in enumerate(self.index["shardlist"])]
        # The set's identity (reference-feature caches, its encoded rows' folder): the index and every
        # sidecar (captions, sizes, spans), so an edited sidecar is another set.
        identity = hashlib.sha256(hashlib.sha256(raw).digest())
        self.samples = []
        for meta in self.shards:
            side = store.get(sidecar_name(meta["url"]))
            identity.update(hashlib.sha256(side).digest())
            where = f"{url}/{sidecar_name(meta['url'])}"
            self.samples += check_sidecar(parse_json(side, where, SIDECAR_SCHEMA), meta, where)
        self.identity = self._fingerprint = identity.hexdigest()   # _fingerprint: as datasets.Dataset names it
        # prepare.encode=true: {store folder: {"settings", "files": {name: sha256}, "sizes": {name: bytes}}}
        encoded = read_json(store, ENCODED, ENCODED_SCHEMA) if store.exists(ENCODED) else {"stores": {}}
        self.encoded = check_encoded(encoded["stores"], f"{url}/{ENCODED}")
        self.starts = list(np.cumsum([0] + [s["nsamples"] for s in self.shards])[:-1])
        self.rows = list(range(len(self.samples)))
        self.column_names = [image_column, caption_column]
        self._store = store

    def __getstate__(self) -> dict[str, Any]:   # DataLoader workers open their own store and reader
        return {**self.__dict__, "_store": None}

    def __len__(self) -> int:
        return len(self.rows)

    def view(self, rows: list[int]) -> PreparedDataset:
        out = object.__new__(PreparedDataset)
        out.__dict__.update({**self.__dict__, "rows": [self.rows[r] for r in rows]})
        return out

    def train_test_split(self, test_size: float, seed: int) -> dict[str, PreparedDataset]:
        """A seeded split of the prepared rows (``data.val_fraction``)."""
        perm = np.random.default_rng(seed).permutation(len(self))
        n_test = max(1, int(np.ceil(test_size * len(self))))
        return {"train": self.view(sorted(perm[n_test:].tolist())), "test": self.view(sorted(perm[:n_test].tolist()))}

    def select_columns(self, columns: list[str]) -> _Captions:
        return _Captions(self)

    def scan_result(self) -> ScanResult:
        """The prepare's verdict: every prepared row usable, at its recorded size."""
        return ScanResult(keep=list(range(len(self))), total=len(self),
                          sizes=[[self.samples[r]["width"], self.samples[r]["height"]] for r in self.rows])

    def _download(self, name: str, sha256: str, size: int, out: IO[bytes], listed_in: str) -> None:
        """``name`` from the store into ``out``: streamed, hashed as it arrives, stopped at the first
        byte past ``size``; ``BadShard`` unless its size and the ``sha256`` that ``listed_in``
        records match. Hand-written rather than boto3's managed download: that writes parts out of
        order, so the SHA-256 could not be computed as the bytes arrive."""
        if self._store is None:
            self._store = open_store(self.url, self.endpoint_url)
        digest, n = hashlib.sha256(), 0
        with self._store.open_read(name) as src:
            while chunk := src.read(CHUNK):
                n += len(chunk)
                if n > size:
                    raise BadShard(f"{self.url}/{name} holds more than the {size:,} bytes {listed_in} records; "
                                   "stopped reading it (nothing was kept): the set was damaged or tampered with")
                digest.update(chunk)
                out.write(chunk)
        if n != size:
            raise BadShard(f"{self.url}/{name} holds {n:,} bytes, {listed_in} records {size:,}: the file "
                           "changed or was damaged; prepare the set again")
        if digest.hexdigest() != sha256:
            raise BadShard(f"{self.url}/{name}: its bytes do not match the SHA-256 in {listed_in} "
                           f"({sha256[:12]}…): the file changed or was damaged; prepare the set again")

    def _fetch(self, name: str, sha256: str, size: int, path: Path, listed_in: str = INDEX,
               check: Callable[[IO[bytes]], None] | None = None) -> Path:
        """``name`` from the store into ``path`` (once, ``_download``), published whole only when
        verified (and ``check``, given the file, raises nothing)."""
        if path.is_file():
            return path
        with atomic_open(path, "w+b") as out:
            self._download(name, sha256, size, out, listed_in)
            if check is not None:
                out.seek(0)
                check(out)
        return path

    def _shard_file(self, j: int) -> Path:
        meta = self.shards[j]   # checked at start-up: a name inside the set, a hex SHA-256, a size
        return self._fetch(meta["url"], meta["sha256"], meta["filesize"], self.local / f"{meta['sha256']}.tar")

    def check_plan(self, min_side: int, policy: DataPolicy) -> None:
        """Refuse a run whose data policy would keep other items than the set holds (training never
        rescans a prepared set), naming both settings."""
        plan = self.index.get("toolkit") or {}
        prepared, run = kept_by(plan.get("policy"), plan.get("min_side")), kept_by(policy, min_side)
        if "skip" not in (prepared["small_images"], run["small_images"]):   # upscaled: kept whatever the side
            del prepared["min_side"], run["min_side"]
        if prepared != run:
            diff = "; ".join(f"{k}: {prepared[k]} (prepared) ≠ {run[k]} (this run)"
                             for k in run if prepared[k] != run[k])
            raise ValueError(f"{self.url} was prepared with a data policy that keeps other items than this run's "
                             f"({diff}); training never rescans a prepared set: prepare it again with this run's "
                             "data.policy and data.resolution (or model), or train with the settings it was prepared "
                             "with")

    def own_keys(self, kind: str) -> set[str]:
        """The cache keys (``toolkit.hashing``) this set's encoded rows may carry: for ``kind="text"``
        its captions' and the empty caption's (caption dropout; task=prepare encodes it too), for
        the image stores (latents, micro-conditioning, masks) its images' SHA-256-derived keys."""
        if kind == "text":
            return {text_key("")} | {text_key(s["caption"].strip()) for s in self.samples}
        return {digest_key(s["sha256"]) for s in self.samples}

    def fetch_encoded(self, name: str, settings: dict[str, Any], dest: Path) -> bool:
        """The prepared rows of encoded store ``name`` into ``dest`` (an ``ArrayStore`` folder; arrays
        first, key lists last, so a reader never sees a half). False when the set carries none of this
        kind; ``EncodedMismatch`` when it carries some made otherwise (naming what differs).

        Each key list is checked before it is published: JSON strings, each a key of this set's own
        (``own_keys``), once, as many as its array's rows. ``dest`` should be a folder of this set's
        own (``EncodedCache`` puts it under ``prepared-<identity>``): the check stops rows for other
        captions or images, the folder stops the set's rows reaching runs on other data at all."""
        entry = self.encoded.get(name)
        if entry is None:
            same = [e["settings"] for e in self.encoded.values()
                    if all(e["settings"].get(k) == settings.get(k) for k in ("kind", "field"))]
            if not same:
                return False
            closest = min(same, key=lambda s: sum(s.get(k) != v for k, v in settings.items()))
            diff = "; ".join(f"{k}: {closest.get(k)} (prepared) ≠ {v} (this run)" for k, v in sorted(settings.items())
                             if closest.get(k) != v)
            raise EncodedMismatch(
                f"{self.url} carries {settings['kind']} rows encoded otherwise than this run needs ({diff}): the "
                "fingerprints hash each encoder's config and weights. Prepare again with this run's model and data "
                "settings (task=prepare prepare.encode=true), or encode here: "
                "callbacks.encoded_cache.from_prepared=false")
        listed_in = f"{self.url}/{ENCODED} store {name}"
        files, sizes = entry["files"], entry.get("sizes", {})   # names checked at start-up
        if unsized := sorted(set(files) - set(sizes)):
            # The recorded size is what stops a fetch at the first byte too many: without it a file could
            # fill the disk before its SHA-256 is found wrong (sets prepared before sizes were recorded).
            raise StorageError(f"{listed_in}: no size recorded for {unsized[0]} (a set prepared by an older "
                               "version); its rows are not fetched without one: encode here with "
                               "callbacks.encoded_cache.from_prepared=false, or prepare the set again into a new "
                               "prepare.output with prepare.encode=true")
        stems = sorted(f.removesuffix(".npy") for f in files if f.endswith(".npy"))
        if sorted(files) != sorted([f"{x}.npy" for x in stems] + [f"{x}.keys.json" for x in stems]):
            raise UnsafeName(f"{listed_in}: files {shown(sorted(files))} are not pairs <shard>.npy + "
                             "<shard>.keys.json; refused: not what task=prepare writes")
        # Every key list first (below MAX_JSON_BYTES: checked at start-up), checked before any file of
        # the store is published; then the arrays, each checked against its list's length; the lists
        # last, since a list is what makes its rows visible: nothing of a refused store is ever read.
        own, lists = self.own_keys(settings["kind"]), {}
        for stem in stems:
            file, buf = f"{stem}.keys.json", io.BytesIO()
            self._download(f"encoded/{name}/{file}", files[file], sizes[file], buf, ENCODED)
            lists[stem] = (buf.getvalue(), check_keys(buf.getvalue(), f"{listed_in} file {file}", own,
                                                      settings["kind"]))
        for stem in stems:
            file = f"{stem}.npy"
            self._fetch(f"encoded/{name}/{file}", files[file], sizes[file], dest / file, ENCODED,
                        functools.partial(check_rows, where=f"{listed_in} file {file}", n=len(lists[stem][1])))
        for stem in stems:
            if not (dest / f"{stem}.keys.json").is_file():
                with atomic_open(dest / f"{stem}.keys.json") as f:
                    f.write(lists[stem][0])
        return True

    def select(self, rows: Any) -> PreparedDataset:   # as ``datasets.Dataset.select``
        return self.view(list(rows))

    def __getitem__(self, i: int | str) -> Any:
        if isinstance(i, str):   # a column, as ``datasets.Dataset`` gives it: the captions, from the sidecars
            if i != self.caption_column:
                raise KeyError(f"{self.url}: only the caption column {self.caption_column!r} is read whole")
            return [self.samples[r]["caption"] for r in self.rows]
        row = self.rows[i]
        meta = self.samples[row]
        if "span" not in meta:
            raise BadShard(f"{self.url} was prepared before samples' byte spans were recorded: prepare it again "
                           "(task=prepare, into a new prepare.output)")
        # One pread at the span task=prepare recorded, not wids' reader: wids opens a shard by indexing
        # every tar member in Python and keeps 10 open, so a shuffled order over more shards than
        # that re-opens one on nearly every sample (measured: 57 -> 23.5 img/s at 100 shards).
        offset, size = meta["span"]   # checked at start-up: inside the shard's recorded size
        with open(self._shard_file(bisect_right(self.starts, row) - 1), "rb") as f:   # fetched and verified
            data = os.pread(f.fileno(), size, offset)
        if len(data) != size or hashlib.sha256(data).hexdigest() != meta["sha256"]:
            raise BadShard(f"{self.url}: sample {row} ({meta['source']}) does not match its SHA-256 in the sidecar")
        return {self.image_column: {"bytes": data, "path": meta["source"]}, self.caption_column: meta["caption"]}


def check_keys(data: bytes, where: str, own: set[str], kind: str) -> list[str]:
    """A key list from a set: JSON strings, each one of ``own`` (the set's own keys), none twice;
    else a refusal naming ``where``."""
    keys = parse_json(data, where, KEYS_SCHEMA)
    foreign = next((k for k in keys if k not in own), None)
    if foreign is not None:
        what = "captions (or the empty caption)" if kind == "text" else "images"
        raise UnsafeName(f"{where}: row key {shown(foreign)} is none of this set's {what}; refused: a set's encoded "
                         "rows may serve only its own captions and images (the set may have been tampered with)")
    if len(set(keys)) != len(keys):
        raise UnsafeName(f"{where}: a row key appears twice; refused: not what task=prepare writes")
    return keys


def check_rows(f: IO[bytes], where: str, n: int) -> None:
    """An array file from a set (``f``, not yet published): a ``.npy`` of ``n`` numeric rows, as
    many as its key list names (read from its header; the rows themselves are memory-mapped later)."""
    readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    try:
        version = np.lib.format.read_magic(f)
        shape, _, dtype = readers[version](f)
    except (ValueError, KeyError, EOFError) as err:
        raise UnsafeName(f"{where}: not a .npy array file ({type(err).__name__}: {err}); refused") from None
    if dtype.hasobject or shape[:1] != (n,):
        raise UnsafeName(f"{where}: an array of shape {shape} and dtype {dtype} for the {n} keys of its list; "
                         "refused: not what task=prepare writes")


def deciding(policy: DataPolicy | dict[str, Any] | str | None) -> dict[str, Any]:
    """The policy fields that decide which items a prepare keeps, and with which captions
    (``DataPolicy.deciding``), from the policy, the dict a prepare records, or the policy's repr
    that prepares made before 0.1.0 recorded (so their plans still compare by meaning)."""
    if isinstance(policy, DataPolicy):
        policy = policy.deciding()
    elif isinstance(policy, str):
        found = {m.group(1): m.group(2) for m in re.finditer(r"(\w+)=('[^']*'|None|\d+)", policy)}
        policy = {k: None if v == "None" else int(v) if v.isdigit() else v.strip("'") for k, v in found.items()}
    return {k: (policy if isinstance(policy, dict) else {}).get(k) for k in DataPolicy().deciding()}


def kept_by(policy: DataPolicy | dict[str, Any] | str | None, min_side: int | None) -> dict[str, Any]:
    """What decides which items a prepare keeps, and with which captions: the policy's ``deciding``
    fields and the smallest side (which counts only where small images are skipped: upscaled ones
    are kept whatever it is)."""
    return {**deciding(policy), "min_side": min_side}


class _Captions:
    """The captions of a prepared set's rows, from its sidecars (no image is read)."""

    def __init__(self, ds: PreparedDataset) -> None:
        self.ds = ds

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {self.ds.caption_column: self.ds.samples[self.ds.rows[i]]["caption"]}
