"""Reference features shipped with a reference set (the embedded miniature's test set: Inception and
CLIP features of its 500 images, ``data/miniature/reference_features/``), the way clean-fid and
torch-fidelity ship the statistics of the standard sets: the first job skips ~60 s of feature
extraction on 2 CPU cores.

A shipped file is named and found by the reference-feature cache's own key
(``reference.cache_key``: the set's identity, the extractor's weights hash and preprocessing), so it
is used exactly where the cache would hold the same features; any other key computes them, and
when the folder holds features of the same images under another key the log says which setting
differs. ``index.json`` records, per key, the identity and protocol it was made from, the array's
shape and SHA-256, and the machine that made it (features made on another CPU kind may differ
from a local computation in the last digits, ~1e-7 relative). Written by
``python -m miniature.reference_features`` (``data/miniature/rebuild.sh``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import re
from pathlib import Path
from typing import Any

import numpy as np

from toolkit.atomic import atomic_open
from toolkit.evaluation.reference import LOCATION_KEYS

log = logging.getLogger(__name__)

INDEX = "index.json"
KEY = re.compile(r"^[0-9a-f]{20}$")   # reference.cache_key's shape: a key names a file only if it has it


def _flat(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for k, v in node.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: node}


def _short(v: Any) -> str:
    s = json.dumps(v)
    return s if len(s) <= 40 else s[:37] + "..."


def differences(entry: dict[str, Any], identity: dict[str, Any], protocol: dict[str, Any]) -> list[str]:
    """``key: shipped X, this job Y`` for every field of the key that differs (locations left out, as in the key)."""
    ours = _flat(json.loads(json.dumps(   # as the key and the index hold them (tuples as lists)
        {"reference": identity, "protocol": {k: v for k, v in protocol.items() if k not in LOCATION_KEYS}})))
    theirs = _flat({"reference": entry.get("reference", {}),
                    "protocol": {k: v for k, v in entry.get("protocol", {}).items() if k not in LOCATION_KEYS}})
    return [f"{k}: shipped {_short(theirs.get(k, '(absent)'))}, this job {_short(ours.get(k, '(absent)'))}"
            for k in sorted(set(ours) | set(theirs)) if ours.get(k, "(absent)") != theirs.get(k, "(absent)")]


def read_index(folder: Path) -> dict[str, Any]:
    path = folder / INDEX
    if not path.is_file():
        return {}
    try:
        index = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        log.warning("shipped reference features: %s is unreadable (%s); computing instead", path, err)
        return {}
    return {k: v for k, v in index.items() if KEY.match(str(k)) and isinstance(v, dict)} \
        if isinstance(index, dict) else {}


def load(folder: Path, key: str, entry: dict[str, Any], n: int) -> np.ndarray:
    """The shipped array of ``key`` as float64, checked against its index entry (a file read from disk
    is untrusted: its SHA-256, dtype, shape and values)."""
    path = folder / f"{key}.npy"
    if not path.is_file():
        raise ValueError(f"{path} is listed in {folder / INDEX} but missing")
    with open(path, "rb") as fh:
        digest = hashlib.file_digest(fh, "sha256").hexdigest()
    if digest != entry.get("sha256"):
        raise ValueError(f"{path} has SHA-256 {digest[:12]}..., its index says {str(entry.get('sha256'))[:12]}... "
                         "(a Git LFS pointer or a damaged file?)")
    feats = np.load(path, allow_pickle=False)
    if feats.dtype != np.float32 or feats.ndim != 2 or feats.shape[0] != n or \
            list(feats.shape) != list(entry.get("shape", [])) or not np.isfinite(feats).all():
        raise ValueError(f"{path} holds {feats.dtype} {feats.shape}, expected float32 ({n}, d) as its index says "
                         f"{entry.get('shape')}, all finite")
    return feats.astype(np.float64)   # the features are float32 network outputs: exact


def lookup(folder: str | Path | None, key: str, space: str, identity: dict[str, Any], protocol: dict[str, Any]
           ) -> np.ndarray | None:
    """The shipped features under ``key`` (float64, as the cache holds them), or None, logging why:
    a warning when the folder holds features of the same images under another key (naming the
    settings that differ), an info line when it holds none of these images."""
    if not folder:
        return None
    folder = Path(folder)
    index = read_index(folder)
    entry = index.get(key)
    if entry is not None:
        try:
            feats = load(folder, key, entry, int(identity["n"]))
        except ValueError as err:
            log.warning("reference features (%s): the shipped ones are not usable: %s; computing them", space, err)
            return None
        made = entry.get("made_on", {})
        log.info("reference features (%s): shipped, key %s matches (%s, made on %s, torch %s); not computed",
                 space, key, folder / f"{key}.npy", made.get("cpu", "?"), made.get("torch", "?"))
        return feats
    same = [(k, e) for k, e in index.items() if e.get("space") == space
            and (e.get("reference") or {}).get("data") == identity.get("data")]
    if not same:
        log.info("reference features (%s): none shipped for this reference set (%s holds other sets); computing "
                 "them", space, folder)
        return None
    k, e = min(same, key=lambda ke: len(differences(ke[1], identity, protocol)))
    why = "; ".join(differences(e, identity, protocol)) or "the key's definition changed"
    log.warning("reference features (%s): the shipped ones for these images (key %s, %s) do not match this job's "
                "key %s, so its %s are computed: %s", space, k, folder, key, identity.get("n"), why)
    return None


def cpu_name() -> str:
    """The CPU's model name (Linux), else the platform's processor string."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def write(folder: str | Path, key: str, space: str, identity: dict[str, Any], protocol: dict[str, Any],
          feats: np.ndarray) -> Path:
    """Ship ``feats`` under ``key``: ``<key>.npy`` as float32 (refused unless exact: the cache's
    float64 arrays hold float32 network outputs) and its entry in ``index.json``."""
    import torch

    if not KEY.match(key):
        raise ValueError(f"{key!r} is not a reference cache key")
    small = np.asarray(feats).astype(np.float32)
    if not np.array_equal(small.astype(np.float64), feats):
        raise ValueError(f"the {space} reference features are not float32 values: shipping them as float32 would "
                         "change them")
    folder = Path(folder)
    path = folder / f"{key}.npy"
    with atomic_open(path) as fh:
        np.save(fh, small)
    index = read_index(folder)
    index = {k: e for k, e in index.items() if not (e.get("space") == space and e.get("reference") == identity)}
    with open(path, "rb") as fh:
        digest = hashlib.file_digest(fh, "sha256").hexdigest()
    where = {k: v for k, v in protocol.items() if k not in LOCATION_KEYS}   # not in the key: no local path shipped
    index[key] = {"space": space, "reference": identity, "protocol": where, "shape": list(small.shape),
                  "dtype": "float32", "sha256": digest,
                  "made_on": {"cpu": cpu_name(), "torch": torch.__version__, "numpy": np.__version__}}
    for old in folder.glob("*.npy"):   # the entries replaced above
        if old.stem not in index:
            old.unlink()
    with atomic_open(folder / INDEX, "w") as fh:
        json.dump(index, fh, indent=1, sort_keys=True)
        fh.write("\n")
    return path
