"""Captioned image datasets from three sources, all as HF ``datasets.Dataset``.

1. a hub dataset id (``lambdalabs/naruto-blip-captions``) with configurable columns;
2. a local folder with ``metadata.jsonl`` / ``metadata.csv`` (the ``imagefolder`` convention);
3. a local folder of images with same-name ``.txt`` caption files (the kohya convention).
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import datasets

log = logging.getLogger(__name__)

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
METADATA_FILES = ("metadata.jsonl", "metadata.csv")


def detect_format(path: str | Path) -> str:
    """``imagefolder``, ``sidecar`` (kohya .txt captions) or ``hub``."""
    p = Path(path).expanduser()
    if not p.exists():
        if str(path).startswith(("/", ".", "~")):
            raise FileNotFoundError(f"dataset path {path!r} does not exist")
        return "hub"
    if not p.is_dir():
        raise NotADirectoryError(f"dataset path {path!r} is a file; pass its folder or a hub id")
    if any(next(p.glob(f"**/{m}"), None) for m in METADATA_FILES):
        return "imagefolder"
    return "sidecar"


def image_files(root: Path) -> list[Path]:
    return sorted(f for f in root.rglob("*") if f.suffix.lower() in IMAGE_EXTS and f.is_file())


def sidecar_dataset(root: Path, caption_column: str) -> datasets.Dataset:
    images, captions = [], []
    for img in image_files(root):
        txt = img.with_suffix(".txt")
        if not txt.is_file():
            log.warning("skipping %s: no caption file %s", img, txt.name)
            continue
        images.append(str(img))
        captions.append(txt.read_text(encoding="utf-8").strip())
    if not images:
        raise ValueError(f"{root}: found no image with a same-name .txt caption file")
    ds = datasets.Dataset.from_dict({"image": images, caption_column: captions})
    return ds.cast_column("image", datasets.Image())


def load_captioned(path: str, split: str = "train", image_column: str = "image",
                   caption_column: str = "text", revision: str | None = None) -> datasets.Dataset:
    """Load one split and check that its image and caption columns exist.

    Args:
        path: hub dataset id or local folder (imagefolder or sidecar layout).
        split: split to read (hub and imagefolder sources).
        image_column: name of the image column.
        caption_column: name of the caption column.
        revision: hub revision.
    """
    fmt = detect_format(path)
    if fmt == "sidecar":
        ds = sidecar_dataset(Path(path).expanduser(), caption_column)
    elif fmt == "imagefolder":
        ds = datasets.load_dataset("imagefolder", data_dir=str(Path(path).expanduser()), split=split)
    else:
        ds = datasets.load_dataset(path, split=split, revision=revision)
    for role, col in (("image_column", image_column), ("caption_column", caption_column)):
        if col not in ds.column_names:
            raise KeyError(f"data.{role}={col!r} is not a column of {path!r}; "
                           f"its columns are {ds.column_names}")
    return ds


def fingerprint_files(root: str | Path) -> str:
    """Hash of every file's relative path, size and content under ``root`` (dataset identity)."""
    h = hashlib.sha256()
    root = Path(root)
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(root)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]
