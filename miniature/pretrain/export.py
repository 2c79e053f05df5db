"""Save pretrained parts in their libraries' own layouts, with float16 weight files.

The shipped miniature must stay small (≤ 50 MB: the 49408-token embedding of the text tower is
stored twice, in ``clip/`` and ``sd/text_encoder/``), so weights are stored as float16 while
every part still *loads* as float32 by default: diffusers loads into a float32 model, and for
transformers (whose default dtype is "auto") the config's ``dtype`` field says float32.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from diffusers import ModelMixin
from transformers import PreTrainedModel

from miniature.tokenizer import ASSET_DIR


def save_fp16(model: ModelMixin | PreTrainedModel, out_dir: str | Path) -> Path:
    """``save_pretrained`` a float16 copy of ``model`` that loads back as float32."""
    out = Path(out_dir)
    copy.deepcopy(model).to(torch.float16).save_pretrained(out)
    if isinstance(model, PreTrainedModel):
        cfg_path = out / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["dtype"] = "float32"   # the compute dtype; "auto" loading would otherwise give fp16
        for sub in ("text_config", "vision_config"):
            if isinstance(cfg.get(sub), dict) and "dtype" in cfg[sub]:
                cfg[sub]["dtype"] = "float32"
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return out


def dir_size_mb(path: str | Path) -> float:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) / 2**20


def num_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def copy_tokenizer(out_dir: str | Path) -> Path:
    """The shipped CLIP tokenizer files (vocab.json + merges.txt, as SD repos ship them).

    Copied rather than ``save_pretrained``: that also writes the 3.6 MB fast ``tokenizer.json``,
    which is rebuilt from these files on load anyway.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for f in ASSET_DIR.iterdir():
        shutil.copy(f, out / f.name)
    return out


def assemble_pipeline(out_dir: str | Path, unet: ModelMixin, text_encoder: PreTrainedModel,
                      scheduler: Any) -> Path:
    """Complete ``out_dir`` (which already holds ``vae/``) into a StableDiffusionPipeline dir.

    Components are written one by one (fp16 files, tokenizer without ``tokenizer.json``) and
    ``model_index.json`` from a pipeline built over them, so the result is what
    ``StableDiffusionPipeline.save_pretrained`` writes, minus 30 MB.
    """
    from diffusers import AutoencoderKL, StableDiffusionPipeline

    from miniature.tokenizer import load_clip_tokenizer

    out = Path(out_dir)
    vae = AutoencoderKL.from_pretrained(out / "vae")
    save_fp16(unet, out / "unet")
    save_fp16(text_encoder, out / "text_encoder")
    copy_tokenizer(out / "tokenizer")
    scheduler.save_pretrained(out / "scheduler")
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=load_clip_tokenizer(out / "tokenizer"),
        unet=unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_config(out)   # model_index.json
    return out
