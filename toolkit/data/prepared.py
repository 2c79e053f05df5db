"""A prepared dataset (``task=prepare``: tar shards + wids index, local or on S3) as the rows the
training data reads (``CaptionedImages``): ``data.path=<folder or s3://bucket/prefix>``.

Start-up reads the index and one small sidecar per shard (captions, sizes, each image's byte span
in its tar), never the images: the cost grows with the number of shards. A shard is fetched on
first use into ``data.local`` (node-local scratch; files named by their SHA-256, checked on
arrival, so runs sharing the folder share the files safely); a sample is one read at its span,
checked against its SHA-256. Map-style (any sample by its index), so the toolkit's resumable
sampler keeps exact resume and world-size independence; the shards stay readable by wids and
webdataset (tested). The data policy ran at prepare time: the scan is not repeated (``scan_result``).
"""

from __future__ import annotations

import hashlib
import json
import os
from bisect import bisect_right
from pathlib import Path
from typing import Any

import numpy as np

from toolkit.atomic import atomic_open
from toolkit.data.shards import ENCODED, INDEX, sidecar_name
from toolkit.data.storage import StorageError, open_store
from toolkit.data.validate import ScanResult


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
        raw = store.get(INDEX)
        self.index = json.loads(raw)
        self._fingerprint = hashlib.sha256(raw).hexdigest()
        self.shards = self.index["shardlist"]
        self.samples = [s for meta in self.shards for s in json.loads(store.get(sidecar_name(meta["url"])))["samples"]]
        # prepare.encode=true: {store folder: {"settings", "files": {name: sha256}}} (EncodedCache reads them)
        self.encoded = json.loads(store.get(ENCODED))["stores"] if store.exists(ENCODED) else {}
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

    def _fetch(self, name: str, sha256: str, path: Path, listed_in: str = INDEX) -> Path:
        """``name`` from the store into ``path`` (once; checked against the ``sha256`` that
        ``listed_in`` records, written whole)."""
        if not path.is_file():
            if self._store is None:
                self._store = open_store(self.url, self.endpoint_url)
            data = self._store.get(name)
            if hashlib.sha256(data).hexdigest() != sha256:
                raise BadShard(f"{self.url}/{name}: its bytes do not match the SHA-256 in {listed_in} "
                               f"({sha256[:12]}…): the file changed or was damaged; prepare the set again")
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_open(path) as f:
                f.write(data)
        return path

    def _shard_file(self, j: int) -> Path:
        meta = self.shards[j]
        return self._fetch(meta["url"], meta["sha256"], self.local / f"{meta['sha256']}.tar")

    def fetch_encoded(self, name: str, settings: dict[str, Any], dest: Path) -> bool:
        """The prepared rows of encoded store ``name`` into ``dest`` (an ``ArrayStore`` folder; arrays
        first, key lists last, so a reader never sees a half). False when the set carries none of this
        kind; ``EncodedMismatch`` when it carries some made otherwise (naming what differs)."""
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
        for file in sorted(entry["files"], key=lambda f: (f.endswith(".keys.json"), f)):
            self._fetch(f"encoded/{name}/{file}", entry["files"][file], dest / file, ENCODED)
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
        offset, size = meta["span"]
        with open(self._shard_file(bisect_right(self.starts, row) - 1), "rb") as f:   # fetched and verified
            data = os.pread(f.fileno(), size, offset)
        if hashlib.sha256(data).hexdigest() != meta["sha256"]:
            raise BadShard(f"{self.url}: sample {row} ({meta['source']}) does not match its SHA-256 in the sidecar")
        return {self.image_column: {"bytes": data, "path": meta["source"]}, self.caption_column: meta["caption"]}


class _Captions:
    """The captions of a prepared set's rows, from its sidecars (no image is read)."""

    def __init__(self, ds: PreparedDataset) -> None:
        self.ds = ds

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {self.ds.caption_column: self.ds.samples[self.ds.rows[i]]["caption"]}
