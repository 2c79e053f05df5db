"""Image transforms for training: resize, crop, flip, to a [-1, 1] tensor, and the micro-conditioning
that describes the result (SDXL's original size and crop top-left, Podell et al. 2023 §2.2).

Written with PIL + numpy rather than torchvision: torchvision from PyPI pins its own torch
build and breaks the CPU/CUDA torch the user installed.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

RESAMPLE = Image.Resampling.BICUBIC


def to_rgb(img: Image.Image) -> Image.Image:
    return img if img.mode == "RGB" else img.convert("RGB")


def as_wh(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def resize_to_cover(img: Image.Image, size: int | tuple[int, int]) -> Image.Image:
    """Scale so the image covers ``size`` (an int: a square) with the least enlargement."""
    (tw, th), (w, h) = as_wh(size), img.size
    scale = max(tw / w, th / h)
    new = (max(tw, round(w * scale)), max(th, round(h * scale)))
    return img if new == (w, h) else img.resize(new, RESAMPLE)


def crop_box(width: int, height: int, size: int | tuple[int, int], center: bool, rng: np.random.Generator
             ) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of a ``size`` crop: centred, or uniformly random."""
    cw, ch = as_wh(size)
    if center:
        left, top = (width - cw) // 2, (height - ch) // 2
    else:
        left = int(rng.integers(0, width - cw + 1))
        top = int(rng.integers(0, height - ch + 1))
    return left, top, left + cw, top + ch


def to_tensor(img: Image.Image) -> torch.Tensor:
    """uint8 HWC RGB -> float CHW in [-1, 1]."""
    arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def micro_conditioning(original: tuple[int, int], resized: tuple[int, int], box: tuple[int, int, int, int],
                       flipped: bool) -> tuple[int, int, int, int, int, int]:
    """SDXL's ``time_ids`` for one training image: (original h, w, crop top, crop left, target h, w).

    ``original`` and ``resized`` are (width, height); the crop's top-left is in the resized image,
    seen the way the model sees it: after a horizontal flip its left edge is the mirrored one (as
    diffusers' SDXL script, which flips before it crops, reports it)."""
    (ow, oh), (rw, _), (left, top, right, bottom) = original, resized, box
    return oh, ow, top, (rw - right) if flipped else left, bottom - top, right - left


def train_transform(img: Image.Image, resolution: int | tuple[int, int], center_crop: bool, random_flip: bool,
                    rng: np.random.Generator, flip: bool | None = None
                    ) -> tuple[torch.Tensor, tuple[int, int, int, int, int, int]]:
    """Resize to cover ``resolution`` (side, or (width, height) of a bucket), crop, maybe flip.

    Returns the pixels and their micro-conditioning. ``flip`` forces the flip decision (the latent
    cache encodes both variants); otherwise it is drawn from ``rng`` after the crop."""
    original = to_rgb(img)
    img = resize_to_cover(original, resolution)
    box = crop_box(*img.size, resolution, center_crop, rng)
    resized, img = img.size, img.crop(box)
    if flip is None:
        flip = random_flip and rng.random() < 0.5
    if flip:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return to_tensor(img), micro_conditioning(original.size, resized, box, flip)
