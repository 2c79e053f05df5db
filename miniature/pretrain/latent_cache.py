"""Outputs of the frozen first stage and text encoder, computed once for UNet pretraining.

With the autoencoder and the text encoder frozen, their outputs never change: caching them
leaves only the UNet in the training step. Latents are cached as the posterior's mean and
std and *sampled* every step (as diffusers' training scripts do with ``latent_dist.sample()``);
prompts are encoded exactly as ``StableDiffusionPipeline`` does (padded to the full context,
no attention mask, last hidden state), and the world has few distinct captions, so each is
encoded once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from diffusers import AutoencoderKL
from transformers import CLIPTextModel, CLIPTokenizer

from miniature.pretrain.clip import tokenize


@torch.no_grad()
def encode_latents(vae: AutoencoderKL, x: torch.Tensor, batch_size: int = 256
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of images in [-1, 1] (unscaled)."""
    dists = [vae.encode(b).latent_dist for b in x.split(batch_size)]
    return torch.cat([d.mean for d in dists]), torch.cat([d.std for d in dists])


@torch.no_grad()
def encode_prompts(text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer, prompts: Sequence[str],
                   batch_size: int = 256) -> torch.Tensor:
    """``(n, context, hidden)`` prompt embeddings, as the pipeline's ``encode_prompt`` makes them."""
    ids = tokenize(tokenizer, prompts)
    return torch.cat([text_encoder(b)[0] for b in ids.split(batch_size)])


class LatentTextCache(torch.utils.data.Dataset):
    """Cached latents with the index of each image's prompt embedding.

    Args:
        latent_mean / latent_std: ``(n, c, h, w)`` posterior statistics (unscaled).
        prompt_index: ``(n,)`` row of each image's prompt in ``prompt_embeds``.
        prompt_embeds: ``(m, context, hidden)`` distinct prompt embeddings.
        null_embeds: ``(1, context, hidden)`` embedding of the empty prompt (for CFG dropout).
    """

    def __init__(self, latent_mean: torch.Tensor, latent_std: torch.Tensor, prompt_index: torch.Tensor,
                 prompt_embeds: torch.Tensor, null_embeds: torch.Tensor) -> None:
        self.latent_mean, self.latent_std, self.prompt_index = latent_mean, latent_std, prompt_index
        self.prompt_embeds, self.null_embeds = prompt_embeds, null_embeds

    def __len__(self) -> int:
        return len(self.prompt_index)

    def __getitem__(self, i: int) -> int:
        return i   # batches are gathered in collate: one indexing op instead of n

    def collate(self, idx: list[int]) -> dict[str, Any]:
        i = torch.as_tensor(idx)
        return {"latent_mean": self.latent_mean[i], "latent_std": self.latent_std[i],
                "encoder_hidden_states": self.prompt_embeds[self.prompt_index[i]],
                "null_hidden_states": self.null_embeds}


def build_cache(vae: AutoencoderKL, text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer,
                images: torch.Tensor, captions: Sequence[str]) -> LatentTextCache:
    """Encode ``images`` (float NCHW in [-1, 1]) and their distinct ``captions``."""
    mean, std = encode_latents(vae, images)
    prompts = sorted(set(captions))
    row = {p: k for k, p in enumerate(prompts)}
    return LatentTextCache(mean, std, torch.tensor([row[c] for c in captions]),
                           encode_prompts(text_encoder, tokenizer, prompts),
                           encode_prompts(text_encoder, tokenizer, [""]))
