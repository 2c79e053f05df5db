"""Figures for the miniature's model card: AE reconstruction error and CLIP attribute binding.

CLIP binding test: for each held-out image, does the model score its true caption above the
same caption with one attribute (colour, or shape) changed? Chance is 0.5.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers import AutoencoderKL
from transformers import CLIPModel, CLIPTokenizer

from miniature.pretrain.autoencoder import reconstruct
from miniature.pretrain.clip import image_embeddings, text_embeddings
from miniature.pretrain.world_data import swapped_caption


def reconstruction_mse(vae: AutoencoderKL, x: torch.Tensor) -> float:
    """Mean squared error of the posterior-mode round trip, images in [-1, 1]."""
    return float((reconstruct(vae, x) - x).pow(2).mean())


@torch.no_grad()
def attribute_binding(model: CLIPModel, tokenizer: CLIPTokenizer, pixels: torch.Tensor,
                      rows: list[dict], attributes: tuple[str, ...] = ("colour", "shape"),
                      seed: int = 0) -> dict[str, float]:
    """Rate at which ``sim(image, true caption) > sim(image, caption with attribute changed)``.

    Args:
        model / tokenizer: the CLIP model and its tokenizer.
        pixels: the images, already normalised for the model's vision tower.
        rows: world metadata rows of those images (captions and attributes).
        attributes: attributes to change, one rate each.
        seed: seed of the replacement values.
    """
    rng = np.random.default_rng(seed)
    img = image_embeddings(model, pixels)
    true = text_embeddings(model, tokenizer, [r["text"] for r in rows])
    pos = (img * true).sum(-1)
    rates = {}
    for attr in attributes:
        neg = text_embeddings(model, tokenizer, [swapped_caption(r, attr, rng) for r in rows])
        rates[attr] = float((pos > (img * neg).sum(-1)).float().mean())
    return rates
