"""Build a tiny, randomly initialised pipeline with the exact SD-1.x component classes.

Used by the tests (and as a starting point for the embedded miniature): it is saved with
``save_pretrained`` and read back through the same ``from_pretrained`` path as a hub model.

    python -m toolkit.models.tiny OUT_DIR [--seed 0]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from toolkit.models.tokenizer import load_clip_tokenizer


def build_tiny_pipeline(
    out_dir: str | Path,
    seed: int = 0,
    sample_size: int = 8,
    text_dim: int = 32,
    unet_channels: tuple[int, ...] = (32, 64),
    prediction_type: str = "epsilon",
) -> Path:
    """Write a random SD-layout pipeline (latent ``sample_size``², VAE factor 2) to ``out_dir``."""
    torch.manual_seed(seed)
    tokenizer = load_clip_tokenizer()
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=text_dim, intermediate_size=2 * text_dim,
        num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    ))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1, norm_num_groups=8, sample_size=2 * sample_size,
    )
    unet = UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=unet_channels, norm_num_groups=8, cross_attention_dim=text_dim,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=8,
    )
    # clip_sample=False: latents are not in [-1, 1]; clipping them ruins samples.
    scheduler = DDPMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
        prediction_type=prediction_type, num_train_timesteps=1000, steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(out_dir)
    return Path(out_dir)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("out_dir")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    print(build_tiny_pipeline(args.out_dir, seed=args.seed))
