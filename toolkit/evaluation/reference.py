"""Reference sets and their (real-image) features, cached on disk.

A reference set goes through the training data's policy (``data.policy``: the same scan, the same
rejections, counted in each row's protocol): its captions are the prompts, so a row without one is
rejected (``captions: skip``) or the empty prompt (``captions: empty``), never the word "None".
The features' cache key is a hash of the set's identity (the dataset fingerprint: file contents
for local data, the ``datasets`` fingerprint + revision for hub data, the index and every sidecar
for a prepared set (``PreparedDataset.identity``); the split or the held-out definition; the
columns; the policy; the number of images), the feature extractor's weights hash and the
preprocessing protocol (``reference_size`` included); a change to any of them gives a new key.
Where the feature model was found (its hub id or folder) is not part of the key: its weights hash
is. Features shipped with a reference set are found by the same key (``shipped.py``).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import OmegaConf
from PIL import Image

from toolkit.atomic import atomic_open
from toolkit.config import data_dir
from toolkit.data.datamodule import CaptionedImages, scan_split
from toolkit.data.prepared import PreparedDataset
from toolkit.data.sources import (
    CAPTION_PROBLEM,
    PATH_OUTSIDE,
    detect_format,
    fingerprint_files,
    held_out,
    load_captioned,
)
from toolkit.data.transforms import crop_box, resize_to_cover
from toolkit.data.validate import BadItem, DataPolicy, ScanResult, check_caption, decode_image, item_name
from toolkit.metrics.intervals import Reference

log = logging.getLogger(__name__)


def dataset_fingerprint(path: str, ds: Any, revision: str | None = None) -> str:
    if isinstance(ds, PreparedDataset):   # task=prepare's shards: its index (every shard's SHA-256) and sidecars
        return f"prepared:{ds.identity}"
    if detect_format(path) == "hub":
        return f"hub:{path}@{revision or 'main'}:{ds._fingerprint}"
    return f"files:{fingerprint_files(path)}"


@dataclass
class ReferenceSet:
    """The usable rows of a reference set (the data policy's scan: ``toolkit.data.validate``), their
    identity (everything the reference features depend on), their image column, their captions as
    the policy reads them (never ``str(None)``), and what the scan rejected (the row's protocol)."""

    rows: Any
    identity: dict[str, Any]
    image_column: str
    captions: list[str]
    scan: dict[str, Any]


def load_reference(path: str, image_column: str, caption_column: str, split: str, num: int | None,
                   revision: str | None = None, local: str | None = None, policy: DataPolicy | None = None,
                   resolution: int | None = None, scan_cache_dir: str | None = None) -> ReferenceSet:
    """The first ``num`` usable rows (all when None) of the reference set. ``path`` may be a prepared
    set (``task=prepare``; a folder or ``s3://``): its shards are fetched into ``local``. The rows
    go through the training data's policy (``policy``, smallest side ``policy.min_side`` or
    ``resolution``): a corrupt image or a missing caption is rejected and counted, never evaluated."""
    ds = load_captioned(path, split=split, image_column=image_column, caption_column=caption_column,
                        revision=revision, local=local)
    ident = {"data": dataset_fingerprint(path, ds, revision), "split": split}
    rows = CaptionedImages(ds, image_column, caption_column, resolution, True, False, policy or DataPolicy())
    result = scan_split(rows, path, [revision, split, None, 0.0, None, "reference"], scan_cache_dir, "reference")
    return _usable(rows, result, num, path, ident)


def load_held_out(data: Any, num: int | None) -> ReferenceSet:
    """``eval.dataset=held_out``: the usable rows of ``data.path`` its training run holds out (the
    datamodule's own split, scanned with the same key as the training run's scan of it, so a
    finetune_eval job rejects a bad held-out image before it trains), and their identity."""
    ds = held_out(data.path, data.split, data.validation_split, data.val_fraction, data.seed,
                  data.image_column, data.caption_column, data.revision, data.get("local"))
    if not len(ds):
        raise ValueError(f"eval.dataset=held_out, but data.path={data.path!r} holds nothing out of training "
                         "(data.val_fraction=0 and no data.validation_split): pass eval.dataset=<a reference set>")
    ident = {"data": dataset_fingerprint(data.path, ds, data.revision),
             "held_out": {"split": data.split, "validation_split": data.validation_split,
                          "val_fraction": data.val_fraction, "seed": data.seed}}
    policy = DataPolicy(**OmegaConf.to_container(data.policy, resolve=True))
    rows = CaptionedImages(ds, data.image_column, data.caption_column, data.resolution, True, False, policy)
    result = scan_split(rows, data.path, [data.revision, data.split, data.validation_split, data.val_fraction,
                                          data.seed, "val"], data.get("scan_cache_dir"), "val")
    return _usable(rows, result, num, f"the held-out part of {data.path!r}", ident)


def _usable(rows: CaptionedImages, result: ScanResult, num: int | None, what: str, ident: dict[str, Any]
            ) -> ReferenceSet:
    keep = result.keep
    if num is not None:
        if num > len(keep):
            raise ValueError(f"eval.num_ref={num} but {what} has only {len(keep)} usable images ({result.summary()}; "
                             "the data policy's rejections, data.policy): lower eval.num_ref or fix the rejected files")
        keep = keep[:num]
    ds, image_column, caption_column = rows.ds.select(keep), rows.image_column, rows.caption_column
    texts = ds.select_columns([c for c in (caption_column, CAPTION_PROBLEM) if c in ds.column_names])
    captions = [check_caption(r[caption_column], r.get(CAPTION_PROBLEM), rows.policy) for r in texts]
    if result.rejected:
        log.warning("reference set %s: %s", what, result.summary())
    ident = {**ident, "image_column": image_column, "caption_column": caption_column, "n": len(ds),
             "policy": repr(rows.policy), "min_side": rows.policy.min_side or rows.resolution or 1}
    scan_info = {"total": result.total, "usable": len(result.keep), "rejected": result.counts(),
                 "converted": len(result.converted)}
    return ReferenceSet(ds, ident, image_column, captions, scan_info)


def reference_image(item: Any, size: tuple[int, int] | None = None, problem: str | None = None) -> Image.Image:
    """A reference image as 8-bit RGB (the loader hands out undecoded path/bytes items), brought
    to the generated images' ``size`` (width, height) the way training data is (bicubic resize
    to cover, centre crop): real and generated images then reach Inception through the same
    upscaling, as in the ADM evaluation protocol. A bad reference file stops the evaluation
    naming it: silently dropping one would change N; so does a metadata row naming a file outside
    the dataset (``problem``: the source's verdict on the row; that file is never read)."""
    if problem and problem.startswith(PATH_OUTSIDE):
        raise ValueError(f"reference image {item_name(item, -1)}: {problem}; fix or remove its metadata row")
    try:
        img = decode_image(item, DataPolicy(), min_side=1)[0]
    except BadItem as bad:
        raise ValueError(f"reference image {item_name(item, -1)}: {bad}; fix or remove it") from None
    if size is None or img.size == tuple(size):
        return img
    img = resize_to_cover(img, size)
    return img.crop(crop_box(*img.size, size, True, np.random.default_rng(0)))


# Protocol fields that say where a feature model was found, not what it computes (its weights' SHA-256
# is in the protocol): left out of the key, so a moved checkout, or a hub id and its local copy, keep
# their features, and the miniature's shipped features match in any checkout.
LOCATION_KEYS = ("model",)
SHIPPED = "miniature/reference_features"   # the miniature's shipped reference features, under its data dir


def cache_key(identity: dict[str, Any], protocol: dict[str, Any]) -> str:
    """The reference features' key: the set's identity (``load_reference``) and the extractor's
    protocol, less ``LOCATION_KEYS``."""
    what = {k: v for k, v in protocol.items() if k not in LOCATION_KEYS}
    blob = json.dumps({"reference": identity, "protocol": what}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def shipped_folder(setting: str | None) -> Path | None:
    """``metrics.shipped_reference``: a folder of shipped features, none (null), or ``auto``: the embedded
    miniature's (``SHIPPED`` under ``toolkit.config.data_dir``) where the miniature is installed."""
    if setting != "auto":
        return Path(setting) if setting else None
    try:
        return Path(data_dir()) / SHIPPED
    except FileNotFoundError:   # an installed package without the miniature: nothing shipped
        return None


def cache_path(cache_dir: str | Path, key: str) -> Path:
    return Path(cache_dir) / f"{key}.npy"


def load_cached(cache_dir: str | Path, key: str) -> np.ndarray | None:
    f = cache_path(cache_dir, key)
    if f.is_file():
        log.info("reference features: cache hit %s", f)
        return np.load(f)
    return None


def save_cached(cache_dir: str | Path, key: str, feats: np.ndarray) -> Path:
    """Write atomically: a temp file in the same folder, then rename."""
    path = cache_path(cache_dir, key)
    with atomic_open(path) as fh:
        np.save(fh, feats)
    return path


def statistics(path: str | Path) -> Reference:
    """The FID/KID statistics of the reference features in ``path`` (a d×d eigh and an m² kernel
    pass: seconds at d = 2048), computed once per file and process — the base and fine-tuned cells,
    their paired Δ and the report all read the same reference."""
    st = Path(path).stat()
    return _statistics(str(Path(path).resolve()), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=2)
def _statistics(path: str, mtime_ns: int, size: int) -> Reference:
    return Reference.from_features(np.load(path))
