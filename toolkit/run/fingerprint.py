"""What a file, folder or hub id holds, as one digest: the content half of a result's identity.

    local file      sha256 of its bytes, cached by (path, size, mtime): a 5 GB checkpoint is read once
    local folder    sha256 over every file's relative path and content digest (each cached as above)
    hub id          the commit its revision points to, read offline from huggingface_hub's cache
                    (``refs/<revision>``, or ``snapshots/<commit>`` when a commit is given); online, one
                    metadata request when the cache has no ref yet
    URL (s3://...)  the URL itself: a prepared set (``task=prepare``) is never rewritten in place, and its
                    shards are checked against the SHA-256 its index names when fetched

The cache lives in ``<paths.cache_dir>/content_hashes/``, one small JSON file per hashed path; a
file whose size or modification time changed is hashed again. Cost (docs/models.md): the first
hash of a multi-GB file runs at the disk's and SHA-256's speed, a cached one costs a ``stat``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

from toolkit.atomic import atomic_open

COMMIT = re.compile(r"[0-9a-f]{40}")
CHUNK = 1 << 24   # 16 MiB reads


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def file_digest(path: str | Path, cache_dir: str | Path | None) -> str:
    """SHA-256 of a file's bytes, from the cache when its path, size and mtime are unchanged."""
    path = Path(path).expanduser().resolve()
    st = path.stat()
    if cache_dir is None:
        return _sha256(path)
    entry = Path(cache_dir) / "content_hashes" / f"{hashlib.sha256(str(path).encode()).hexdigest()[:32]}.json"
    stamp = {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    try:
        hit = json.loads(entry.read_text())
        if {k: hit.get(k) for k in stamp} == stamp and re.fullmatch(r"[0-9a-f]{64}", str(hit.get("sha256"))):
            return hit["sha256"]
    except (OSError, ValueError):
        pass   # no entry yet, or a torn one: hash again
    digest = _sha256(path)
    with atomic_open(entry, "w") as fh:
        json.dump({**stamp, "sha256": digest}, fh)
    return digest


def folder_digest(root: str | Path, cache_dir: str | Path | None) -> str:
    """One digest over every file under ``root`` (relative path + content digest)."""
    root = Path(root).expanduser().resolve()
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(f"{f.relative_to(root)}\0{file_digest(f, cache_dir)}\n".encode())
    return h.hexdigest()


def hub_commit(repo_id: str, revision: str | None, repo_type: str = "model") -> str | None:
    """The commit ``revision`` (default ``main``) of a hub repo points to: from the local hub cache
    (offline), else one request when online; None when neither knows it (offline and not cached:
    the loader that runs next fails, naming what to do)."""
    from huggingface_hub import constants

    rev = revision or "main"
    if COMMIT.fullmatch(rev):
        return rev
    folder = Path(constants.HF_HUB_CACHE) / f"{repo_type}s--{repo_id.replace('/', '--')}"
    ref = folder / "refs" / rev
    if ref.is_file() and COMMIT.fullmatch(commit := ref.read_text().strip()):
        return commit
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return None
    from huggingface_hub import HfApi

    try:
        return HfApi().repo_info(repo_id, repo_type=repo_type, revision=rev, timeout=5.0).sha
    except Exception:   # noqa: BLE001 - unreachable or unknown: the loader reports it properly next
        return None


def fingerprint(value: str, cache_dir: str | Path | None, revision: str | None = None,
                repo_type: str = "model") -> str:
    """The content of what a config value names (a path, a hub id or a URL), as a short string."""
    value = str(value)
    if "://" in value:
        return f"url:{value}"
    path = Path(value).expanduser()
    if path.is_file():
        return f"sha256:{file_digest(path, cache_dir)}"
    if path.is_dir():
        return f"sha256:{folder_digest(path, cache_dir)}"
    commit = hub_commit(value, revision, repo_type)
    return f"hub:{value}@{commit}" if commit else f"unresolved:{value}@{revision or 'main'}"
