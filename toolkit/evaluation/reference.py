"""Reference (real-image) features, cached on disk.

The cache key is a hash of the reference set's identity (the dataset fingerprint: file contents
for local data, the ``datasets`` fingerprint + revision for hub data; the split or the held-out
definition; the columns; the number of images), the feature extractor's weights hash and the
preprocessing protocol (``reference_size`` included); a change to any of them gives a new key.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from toolkit.atomic import atomic_open
from toolkit.data.prepared import PreparedDataset
from toolkit.data.sources import PATH_OUTSIDE, detect_format, fingerprint_files, held_out, load_captioned
from toolkit.data.transforms import crop_box, resize_to_cover
from toolkit.data.validate import BadItem, DataPolicy, decode_image, item_name
from toolkit.metrics.intervals import Reference

log = logging.getLogger(__name__)


def dataset_fingerprint(path: str, ds: Any, revision: str | None = None) -> str:
    if isinstance(ds, PreparedDataset):   # task=prepare's shards: its index names every shard's SHA-256
        return f"prepared:{ds._fingerprint}"
    if detect_format(path) == "hub":
        return f"hub:{path}@{revision or 'main'}:{ds._fingerprint}"
    return f"files:{fingerprint_files(path)}"


def load_reference(path: str, image_column: str, caption_column: str, split: str,
                   num: int | None, revision: str | None = None, local: str | None = None
                   ) -> tuple[Any, dict[str, Any]]:
    """The first ``num`` rows (all when None) of the reference set and its identity: the dataset
    fingerprint, split, columns and size, everything the reference features depend on. ``path``
    may be a prepared set (``task=prepare``; a folder or ``s3://``): its shards are fetched into ``local``."""
    ds = load_captioned(path, split=split, image_column=image_column, caption_column=caption_column,
                        revision=revision, local=local)
    ident = {"data": dataset_fingerprint(path, ds, revision), "split": split}
    return _first(ds, num, path, ident, image_column, caption_column)


def load_held_out(data: Any, num: int | None) -> tuple[Any, dict[str, Any]]:
    """``eval.dataset=held_out``: the rows of ``data.path`` its training run holds out (the
    datamodule's own split), and their identity (the split's definition included)."""
    ds = held_out(data.path, data.split, data.validation_split, data.val_fraction, data.seed,
                  data.image_column, data.caption_column, data.revision, data.get("local"))
    if not len(ds):
        raise ValueError(f"eval.dataset=held_out, but data.path={data.path!r} holds nothing out of training "
                         "(data.val_fraction=0 and no data.validation_split): pass eval.dataset=<a reference set>")
    ident = {"data": dataset_fingerprint(data.path, ds, data.revision),
             "held_out": {"split": data.split, "validation_split": data.validation_split,
                          "val_fraction": data.val_fraction, "seed": data.seed}}
    return _first(ds, num, f"the held-out part of {data.path!r}", ident, data.image_column, data.caption_column)


def _first(ds: Any, num: int | None, what: str, ident: dict[str, Any], image_column: str, caption_column: str
           ) -> tuple[Any, dict[str, Any]]:
    if num is not None:
        if num > len(ds):
            raise ValueError(f"eval.num_ref={num} but {what} has only {len(ds)} images")
        ds = ds.select(range(num))
    return ds, {**ident, "image_column": image_column, "caption_column": caption_column, "n": len(ds)}


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


def cache_key(identity: dict[str, Any], protocol: dict[str, Any]) -> str:
    """The reference features' key: the set's identity (``load_reference``) and the extractor's protocol."""
    blob = json.dumps({"reference": identity, "protocol": protocol}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


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
