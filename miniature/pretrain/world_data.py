"""The generated world (``miniature.world`` imagefolders) as in-memory tensors.

Pretraining reads tens of thousands of 64 px PNGs once and then samples batches from memory:
on a 2-core CPU, decoding PNGs every step would cost as much as the model itself.
"""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from miniature.world import COLOURS, SHAPES, Scene
from toolkit.data.transforms import RESAMPLE

SCENE_FIELDS = tuple(f.name for f in fields(Scene))


def read_rows(folder: str | Path, limit: int | None = None) -> list[dict]:
    """The metadata.jsonl rows of a world imagefolder (first ``limit`` rows)."""
    lines = (Path(folder) / "metadata.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines[:limit]]


def load_images(folder: str | Path, rows: list[dict], resolution: int) -> torch.Tensor:
    """``(n, resolution, resolution, 3)`` uint8, resized with the training transform's filter."""
    out = np.empty((len(rows), resolution, resolution, 3), np.uint8)
    for i, r in enumerate(rows):
        img = Image.open(Path(folder) / r["file_name"]).convert("RGB")
        out[i] = np.asarray(img if img.size == (resolution,) * 2 else img.resize((resolution,) * 2, RESAMPLE))
    return torch.from_numpy(out)


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 NHWC -> float NCHW in [-1, 1] (the range the VAE is trained on)."""
    return images.permute(0, 3, 1, 2).float() / 127.5 - 1.0


def scene_of(row: dict) -> Scene:
    return Scene(**{k: row[k] for k in SCENE_FIELDS})


def swapped_caption(row: dict, attribute: str, rng: np.random.Generator) -> str:
    """The row's caption with ``attribute`` (``colour`` or ``shape``) changed to another value."""
    choices = {"colour": list(COLOURS), "shape": list(SHAPES)}[attribute]
    others = [c for c in choices if c != row[attribute]]
    scene = scene_of({**row, attribute: others[int(rng.integers(len(others)))]})
    return scene.caption()
