"""Per-image loss masks: where an image should be learned (white) and where not (black).

``data.masks``: ``alpha`` (the image's own alpha channel; an image without one is learned
everywhere) or a folder holding one grayscale mask per image with the image's file stem
(``cat.png`` → ``<folder>/cat.png``, or .jpg/.webp). The mask is turned and cut exactly as its image
(EXIF orientation, resize, crop, flip) and the module averages it down to the latent grid, where
it weights the loss (``module.masked_loss``; ``toolkit.models.objectives.weighted_loss``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PIL import Image, ImageOps

from toolkit.data.validate import BadItem, DataPolicy, _open, item_path

MASK_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def mask_file(item: Any, folder: str | Path) -> Path:
    path = item_path(item)
    if path is None:
        raise BadItem("no mask", "the image has no file name to find its mask by")
    for suffix in MASK_SUFFIXES:
        cand = Path(folder) / (Path(path).stem + suffix)
        if cand.is_file():
            return cand
    raise BadItem("no mask", f"no {Path(path).stem}{{{','.join(MASK_SUFFIXES)}}} in {folder}")


def load_mask(item: Any, source: str, policy: DataPolicy, size: tuple[int, int]) -> Image.Image:
    """The mask of one image as an 8-bit grayscale image of the decoded image's ``size`` (w, h)."""
    if source == "alpha":
        path = item_path(item)
        data = item["bytes"] if isinstance(item, dict) and item.get("bytes") is not None else Path(path).read_bytes()
        img = ImageOps.exif_transpose(_open(data, policy))
        if img.mode == "P" and "transparency" in img.info:
            img = img.convert("RGBA")
        mask = img.getchannel("A") if "A" in img.getbands() else Image.new("L", img.size, 255)
    else:
        mask = ImageOps.exif_transpose(Image.open(mask_file(item, source))).convert("L")
    if mask.size != tuple(size):
        raise BadItem("mask size differs", f"mask {mask.size[0]}x{mask.size[1]}, image {size[0]}x{size[1]}")
    return mask
