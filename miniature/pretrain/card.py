"""Measure the shipped miniature for its model card and draw its sample grid.

    python -m miniature.pretrain.card [data/miniature] [--grid samples_base.png]

Prints JSON: parameters and sizes per part, AE reconstruction MSE on held-out base vs style
images, CLIP attribute-binding rates on held-out base images; writes a 4x4 grid of pipeline
samples (DDIM, 50 steps, guidance 4, seeds 0-15) for the first 16 base/test captions and
``ae_roundtrip.png`` (8 base/test and 8 style/test images over their AE round trips).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from PIL import Image
from transformers import CLIPModel

from miniature.pretrain.autoencoder import reconstruct
from miniature.pretrain.clip import normalise
from miniature.pretrain.export import dir_size_mb, num_params
from miniature.pretrain.measure import attribute_binding, reconstruction_mse
from miniature.pretrain.world_data import load_images, read_rows, to_unit
from miniature.tokenizer import load_clip_tokenizer
from toolkit.config import data_dir

WORLD = Path(data_dir()) / "world"


def sample_grid(pipe: StableDiffusionPipeline, prompts: list[str], steps: int = 50,
                guidance: float = 4.0, upscale: int = 4) -> Image.Image:
    """One image per prompt (seed = its index), tiled in a square grid, nearest-upscaled."""
    tiles = [pipe(p, num_inference_steps=steps, guidance_scale=guidance, output_type="np",
                  generator=torch.Generator().manual_seed(i)).images[0] for i, p in enumerate(prompts)]
    k = int(np.ceil(np.sqrt(len(tiles))))
    h, w, _ = tiles[0].shape
    grid = np.zeros((k * h, k * w, 3), np.float32)
    for i, t in enumerate(tiles):
        grid[(i // k) * h:(i // k + 1) * h, (i % k) * w:(i % k + 1) * w] = t
    img = Image.fromarray((grid * 255).round().astype(np.uint8))
    return img.resize((k * w * upscale, k * h * upscale), Image.Resampling.NEAREST)


def roundtrip_grid(vae: torch.nn.Module, n: int = 8, resolution: int = 32, upscale: int = 4) -> Image.Image:
    """Rows: n base/test images, their AE round trips, n style/test images, their round trips."""
    rows = []
    for split in ("base", "style"):
        folder = WORLD / split / "test"
        x = to_unit(load_images(folder, read_rows(folder, n), resolution))
        rows += [x, reconstruct(vae, x)]
    grid = torch.cat([torch.cat(list(r), dim=2) for r in rows], dim=1)   # (3, 4·res, n·res)
    img = Image.fromarray(((grid.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy())
    return img.resize((img.width * upscale, img.height * upscale), Image.Resampling.NEAREST)


def measure(root: Path, n_eval: int = 1000, resolution: int = 32) -> dict[str, Any]:
    pipe = StableDiffusionPipeline.from_pretrained(root / "sd")
    clip = CLIPModel.from_pretrained(root / "clip").eval()
    out: dict[str, Any] = {
        "params": {"unet": num_params(pipe.unet), "vae": num_params(pipe.vae),
                   "text_encoder": num_params(pipe.text_encoder), "clip": num_params(clip)},
        "dtypes": {k: str(getattr(pipe, k).dtype) for k in ("unet", "vae", "text_encoder")}
        | {"clip": str(clip.dtype)},
    }
    parts = [d for d in sorted((root / "sd").iterdir()) if d.is_dir()]
    out["size_mb"] = {"sd": dir_size_mb(root / "sd"), "clip": dir_size_mb(root / "clip"),
                      **{f"sd/{d.name}": dir_size_mb(d) for d in parts}}
    for split in ("base", "style"):
        folder = WORLD / split / "test"
        x = to_unit(load_images(folder, read_rows(folder, n_eval), resolution))
        out[f"ae_mse_{split}_test"] = reconstruction_mse(pipe.vae, x)
    rows = read_rows(WORLD / "base" / "test", n_eval)
    pixels = normalise(load_images(WORLD / "base" / "test", rows, clip.config.vision_config.image_size))
    out["clip_binding_base_test"] = attribute_binding(clip, load_clip_tokenizer(root / "clip"), pixels, rows)
    out["clip_binding_images"] = len(rows)
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("root", nargs="?", default=str(Path(data_dir()) / "miniature"))
    ap.add_argument("--grid", default="samples_base.png", help="file name under root ('' to skip)")
    ap.add_argument("--guidance", type=float, default=4.0)
    args = ap.parse_args()
    root = Path(args.root)
    torch.manual_seed(0)
    print(json.dumps(measure(root), indent=2))
    if args.grid:
        pipe = StableDiffusionPipeline.from_pretrained(root / "sd")
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        prompts = [r["text"] for r in read_rows(WORLD / "base" / "test", 16)]
        sample_grid(pipe, prompts, guidance=args.guidance).save(root / args.grid)
        roundtrip_grid(pipe.vae).save(root / "ae_roundtrip.png")
        print("\n".join(f"{i:2d} {p}" for i, p in enumerate(prompts)))
