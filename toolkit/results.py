"""The results table of an evaluation (or a sweep of them): one JSON line per cell.

A cell is keyed by the hash of its settings, so re-running an interrupted sweep skips the cells
that already have a row. Rows are appended with a single ``write`` + fsync, under a lock file when
cells run concurrently (``append_new_row``); a torn last line (crash mid-write) is ignored with a
warning when reading.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def stored_path(path: str | Path, table_dir: str | Path) -> str:
    """``path`` as a row stores it: relative to the results table's folder when under it, so a
    sweep moved elsewhere keeps its files (and its paired comparisons)."""
    path, table_dir = Path(path).resolve(), Path(table_dir).resolve()
    return os.path.relpath(path, table_dir) if path.is_relative_to(table_dir) else str(path)


def resolved(row: dict[str, Any], table_dir: str | Path) -> dict[str, Any]:
    """``row`` with its ``files`` as paths a reader can open (relative ones are under ``table_dir``)."""
    files = {k: str(Path(table_dir) / v) if v and not Path(v).is_absolute() else v
             for k, v in (row.get("files") or {}).items()}
    return {**row, "files": files} if "files" in row else row


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a results table, their files resolved (``resolved``)."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(resolved(json.loads(line), path.parent))
        except json.JSONDecodeError:
            log.warning("%s:%d is not valid JSON (interrupted write?); ignored", path, n)
    return rows


def without_identity(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows made before identities were recorded (``toolkit.run.identity``): another identity, never reused."""
    return [r for r in rows if "identity" not in r and "identity" not in (r.get("train") or {})]


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


def append_new_row(path: str | Path, row: dict[str, Any], timeout: float = 600) -> bool:
    """Append ``row`` unless a row with its key is in the table already; False if one was. Cells
    of a sweep that run as separate jobs (Hydra's submitit launcher) finish concurrently: the
    check and the append hold the table's lock file (``<table>.lock``), so no row is lost or
    written twice, also where an append is not atomic (NFS)."""
    from filelock import FileLock

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{path}.lock", timeout=timeout):
        if find_row(path, row["key"]) is not None:
            return False
        append_row(path, row)
        return True
