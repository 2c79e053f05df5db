"""Read a wandb offline run folder's transaction log (``run-<id>.wandb``) in the tests.

wandb writes records in LevelDB's log format (32 KiB blocks; each chunk: crc32, length, type
FULL/FIRST/MIDDLE/LAST) after a 7-byte ``:W&B`` header; each record is a ``wandb_internal_pb2.Record``.
wandb ships no public reader for offline runs, hence these few lines.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def records(path: str | Path) -> Iterator[Any]:
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a wandb transaction log"
    pos, block, buf = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:   # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos: pos + 7])
        chunk = data[pos + 7: pos + 7 + length]
        pos += 7 + length
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            yield rec


def run_info(path: str | Path) -> dict[str, Any]:
    """group, job type, name and the summary keys of one offline run."""
    info: dict[str, Any] = {"summary": set(), "artifacts": []}
    for rec in records(path):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            info.update(group=rec.run.run_group, job_type=rec.run.job_type, name=rec.run.display_name)
        elif kind == "summary":
            info["summary"] |= {item.key for item in rec.summary.update}
        elif kind == "artifact":
            info["artifacts"].append((rec.artifact.type, rec.artifact.name))
    return info
