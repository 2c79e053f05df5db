"""What must be recorded beside a result to reproduce it."""

from __future__ import annotations

import importlib.metadata
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

PACKAGES = ("toolkit", "torch", "diffusers", "transformers", "peft", "numpy", "scipy", "pillow",
            "lightning", "datasets")
METRIC_IMPL = {"fid": "toolkit.metrics.distances.frechet_distance (scipy.linalg.sqrtm, float64)",
               "kid": "unbiased MMD², kernel (xᵀy/d+1)³, mean±std over random subsets",
               "ci": "95% percentile bootstrap over generated images"}


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for p in PACKAGES:
        try:
            out[p] = importlib.metadata.version(p)
        except importlib.metadata.PackageNotFoundError:
            out[p] = "absent"
    return out


def as_list(x: Any) -> list[Any]:
    if x is None:
        return []
    if isinstance(x, ListConfig | DictConfig):
        x = OmegaConf.to_container(x, resolve=True)
    return list(x) if isinstance(x, list | tuple) else [x]


def read_prompts(prompts: str | Sequence[str]) -> list[str]:
    """A list of prompts, or the path of a text file with one prompt per line."""
    items = as_list(prompts)
    if len(items) == 1 and Path(str(items[0])).expanduser().is_file():
        lines = Path(str(items[0])).expanduser().read_text(encoding="utf-8").splitlines()
        items = [ln.strip() for ln in lines if ln.strip()]
    if not items:
        raise ValueError("no prompts given (sample.prompts: a list or a text file, one per line)")
    return [str(p) for p in items]
