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


def resize_shorter_side(img: Image.Image, size: int) -> Image.Image:
    w, h = img.size
    scale = size / min(w, h)
    new = (max(size, round(w * scale)), max(size, round(h * scale)))
    return img if new == (w, h) else img.resize(new, RESAMPLE)


def crop_box(width: int, height: int, size: int, center: bool, rng: np.random.Generator
             ) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of a size×size crop: centred, or uniformly random."""
    if center:
        left, top = (width - size) // 2, (height - size) // 2
    else:
        left = int(rng.integers(0, width - size + 1))
        top = int(rng.integers(0, height - size + 1))
    return left, top, left + size, top + size


def to_tensor(img: Image.Image) -> torch.Tensor:
    """uint8 HWC RGB -> float CHW in [-1, 1]."""
    arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def train_transform(img: Image.Image, resolution: int, center_crop: bool, random_flip: bool,
                    rng: np.random.Generator) -> torch.Tensor:
    img = resize_shorter_side(to_rgb(img), resolution)
    img = img.crop(crop_box(*img.size, resolution, center_crop, rng))
    if random_flip and rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return to_tensor(img)
