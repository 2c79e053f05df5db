"""The results table of an evaluation (or a sweep of them): one JSON line per cell.

A cell is keyed by the hash of its settings, so re-running an interrupted sweep skips the cells
that already have a row. Rows are appended with a single ``write`` + fsync; a torn last line
(crash mid-write) is ignored with a warning when reading.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file (adapters, weights, references: recorded with every result)."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def settings_key(settings: dict[str, Any]) -> str:
    blob = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            log.warning("%s:%d is not valid JSON (interrupted write?); ignored", path, n)
    return rows


def find_row(path: str | Path, key: str) -> dict[str, Any] | None:
    return next((r for r in read_rows(path) if r.get("key") == key), None)


def append_row(path: str | Path, row: dict[str, Any]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = (json.dumps(row, sort_keys=True, default=str) + "\n").encode()
    if path.is_file() and path.stat().st_size and not path.read_bytes().endswith(b"\n"):
        data = b"\n" + data   # an interrupted earlier append: start on a fresh line (it is ignored)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)   # the umask decides
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
