"""Image transforms for training: resize, crop, flip, to a [-1, 1] tensor.

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


def train_transform(img: Image.Image, resolution: int | tuple[int, int], center_crop: bool, random_flip: bool,
                    rng: np.random.Generator) -> torch.Tensor:
    """Resize to cover ``resolution`` (side, or (width, height) of a bucket), crop, maybe flip."""
    img = resize_to_cover(to_rgb(img), resolution)
    img = img.crop(crop_box(*img.size, resolution, center_crop, rng))
    if random_flip and rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return to_tensor(img)
