"""Hydra/OmegaConf helpers shared by run.py and the tests."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "conf"


def register_resolvers() -> None:
    """``${root:}`` is the repository root, so shipped data resolves from any working dir."""
    if not OmegaConf.has_resolver("root"):
        OmegaConf.register_new_resolver("root", lambda: str(ROOT))
