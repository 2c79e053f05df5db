"""Build tiny, randomly initialised pipelines with the exact SD-1.x and SDXL component classes.

Used by the tests (and as a starting point for the embedded miniature): they are saved with
``save_pretrained`` and read back through the same ``from_pretrained`` path as a hub model.

    python -m tests.tiny OUT_DIR [--seed 0] [--sdxl]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from miniature.tokenizer import load_clip_tokenizer


def build_tiny_pipeline(
    out_dir: str | Path,
    seed: int = 0,
    sample_size: int = 8,
    text_dim: int = 32,
    unet_channels: tuple[int, ...] = (32, 64),
    prediction_type: str = "epsilon",
    vae_channels: tuple[int, ...] = (16, 32),
) -> Path:
    """Write a random SD-layout pipeline (latent ``sample_size``², VAE factor 2^(levels−1): 2 by
    default; ``vae_channels=(8,) * 4`` gives a real SD's factor 8) to ``out_dir``."""
    torch.manual_seed(seed)
    tokenizer = load_clip_tokenizer()
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=text_dim, intermediate_size=2 * text_dim,
        num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    ))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=vae_channels,
        down_block_types=("DownEncoderBlock2D",) * len(vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(vae_channels),
        layers_per_block=1, norm_num_groups=8, sample_size=2 ** (len(vae_channels) - 1) * sample_size,
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


def build_tiny_sdxl_pipeline(
    out_dir: str | Path,
    seed: int = 0,
    sample_size: int = 8,
    text_dims: tuple[int, int] = (32, 64),
    projection_dim: int = 32,
    time_embed_dim: int = 8,
    unet_channels: tuple[int, ...] = (32, 64),
    layers_per_block: int = 2,
    vae_channels: tuple[int, ...] = (16, 32),
) -> Path:
    """Write a random SDXL-layout pipeline (latent ``sample_size``², VAE factor 2) to ``out_dir``.

    Same wiring as SDXL base, only smaller: two text encoders whose penultimate hidden states are
    concatenated (``cross_attention_dim = sum(text_dims)``), the pooled projection of the second
    one plus six size/crop ids embedded with ``time_embed_dim`` channels each feeding the UNet's
    ``text_time`` embedding, and SDXL's block pattern (no attention at the highest resolution).

    Args:
        out_dir: where ``save_pretrained`` writes the pipeline.
        seed: torch seed for the random weights.
        sample_size: latent side; images are ``2 * sample_size`` pixels.
        text_dims: hidden sizes of text_encoder (CLIP ViT-L style) and text_encoder_2 (OpenCLIP
            bigG style). They must differ: diffusers' single-file reader tells the two apart by
            their position-embedding width.
        projection_dim: text_encoder_2's pooled-projection size.
        time_embed_dim: ``addition_time_embed_dim`` of the UNet.
        unet_channels: UNet ``block_out_channels`` (one level per entry).
        layers_per_block: resnets per down level (SDXL uses 2).
        vae_channels: VAE ``block_out_channels`` (factor 2^(levels−1); SDXL's 8 is four levels).
    """
    if text_dims[0] == text_dims[1]:
        raise ValueError(f"text_dims must differ (got {text_dims}); see the docstring")
    torch.manual_seed(seed)
    tokenizer = load_clip_tokenizer()
    # SDXL's tokenizer_2 (OpenCLIP's) pads with "!" instead of the end token.
    tokenizer_2 = load_clip_tokenizer()
    tokenizer_2.pad_token = "!"

    def text_config(tok, dim: int, act: str) -> CLIPTextConfig:
        return CLIPTextConfig(
            vocab_size=len(tok), hidden_size=dim, intermediate_size=2 * dim, num_hidden_layers=2,
            num_attention_heads=2, max_position_embeddings=tok.model_max_length, hidden_act=act,
            projection_dim=projection_dim, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )

    # OpenAI CLIP (encoder 1) uses quick_gelu, OpenCLIP bigG (encoder 2) exact gelu.
    text_encoder = CLIPTextModel(text_config(tokenizer, text_dims[0], "quick_gelu"))
    text_encoder_2 = CLIPTextModelWithProjection(text_config(tokenizer_2, text_dims[1], "gelu"))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=vae_channels,
        down_block_types=("DownEncoderBlock2D",) * len(vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(vae_channels),
        layers_per_block=1, norm_num_groups=8, sample_size=2 ** (len(vae_channels) - 1) * sample_size,
        force_upcast=True,
    )
    n = len(unet_channels)
    unet = UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=layers_per_block,
        block_out_channels=unet_channels, norm_num_groups=8, cross_attention_dim=sum(text_dims),
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",),
        attention_head_dim=tuple(2 * (i + 1) for i in range(n)),
        transformer_layers_per_block=tuple(range(1, n + 1)), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=time_embed_dim,
        # six ids (original size, crop top-left, target size) plus the pooled text embedding
        projection_class_embeddings_input_dim=6 * time_embed_dim + projection_dim,
    )
    scheduler = EulerDiscreteScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000,
        steps_offset=1, timestep_spacing="leading", prediction_type="epsilon",
    )
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler, force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    pipe.save_pretrained(out_dir)
    return Path(out_dir)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("out_dir")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sdxl", action="store_true", help="SDXL layout (two text encoders) instead of SD-1.x")
    args = ap.parse_args()
    build = build_tiny_sdxl_pipeline if args.sdxl else build_tiny_pipeline
    print(build(args.out_dir, seed=args.seed))
