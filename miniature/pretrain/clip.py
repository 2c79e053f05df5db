"""Train a small CLIP (``transformers.CLIPModel``) contrastively on world captions.

Its text tower becomes the miniature's ``text_encoder`` (as SD 1.x uses OpenAI CLIP's); the
whole model scores image-caption agreement in evaluation. Besides the in-batch negatives of
the CLIP loss, each image also meets its own caption with the colour or the shape changed
(hard negatives, as in NegCLIP): random batches almost never contain two captions that differ
in one word, and without them the model learns bags of words rather than attributes.

    logits_i→t = s · img · [txt ; txt_colour_swapped ; txt_shape_swapped]ᵀ   (B × 3B)
    loss = ½ (CE(logits_i→t, diag) + CE(s · txt · imgᵀ, diag))
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from transformers import CLIPConfig, CLIPModel, CLIPTextModel, CLIPTokenizer

from miniature.pretrain.world_data import swapped_caption
from miniature.tokenizer import load_clip_tokenizer
from toolkit.training.optimizers import optimizers

# OpenAI CLIP's pixel statistics (what CLIPImageProcessor uses by default).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def normalise(images: torch.Tensor) -> torch.Tensor:
    """uint8 NHWC -> CLIP-normalised float NCHW."""
    x = images.permute(0, 3, 1, 2).float() / 255.0
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def build_clip(tokenizer: CLIPTokenizer, text: Mapping[str, Any], vision: Mapping[str, Any],
               projection_dim: int) -> CLIPModel:
    """A random CLIPModel whose text tower matches ``tokenizer`` (vocab, context, special ids)."""
    text_cfg = {**text, "vocab_size": len(tokenizer),
                "max_position_embeddings": tokenizer.model_max_length,
                "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                "pad_token_id": tokenizer.pad_token_id}
    return CLIPModel(CLIPConfig(text_config=text_cfg, vision_config=dict(vision),
                                projection_dim=projection_dim))


def text_encoder_from_clip(model: CLIPModel) -> CLIPTextModel:
    """The text tower as a standalone ``CLIPTextModel`` (the SD ``text_encoder`` component)."""
    te = CLIPTextModel(model.config.text_config)
    # transformers 5: ``CLIPModel.text_model`` is itself a CLIPTextModel; in 4.x, its inner module.
    target = te if isinstance(model.text_model, CLIPTextModel) else te.text_model
    target.load_state_dict(model.text_model.state_dict())
    return te.eval()


def tokenize(tokenizer: CLIPTokenizer, captions: Sequence[str], padding: str = "max_length"
             ) -> torch.Tensor:
    """Ids padded to the full context (``max_length``: exactly as StableDiffusionPipeline encodes
    prompts) or to the longest caption (``longest``)."""
    return tokenizer(list(captions), padding=padding, max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


def text_embeddings(model: CLIPModel, tokenizer: CLIPTokenizer, captions: Sequence[str]
                    ) -> torch.Tensor:
    """Unit-norm projected text features.

    Padded to the longest caption only: CLIP's text attention is causal, so the pooled
    end-of-text state is the same as with padding to 77, at a quarter of the cost.
    """
    ids = tokenize(tokenizer, captions, padding="longest").to(model.device)
    return F.normalize(model.text_projection(model.text_model(input_ids=ids).pooler_output), dim=-1)


def image_embeddings(model: CLIPModel, pixels: torch.Tensor) -> torch.Tensor:
    """Unit-norm projected image features of CLIP-normalised pixels."""
    out = model.vision_model(pixel_values=pixels.to(model.device)).pooler_output
    return F.normalize(model.visual_projection(out), dim=-1)


def contrastive_loss(img: torch.Tensor, txt: torch.Tensor, hard_negatives: torch.Tensor | None,
                     logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE; ``hard_negatives`` (kB × D) only join the image→text direction."""
    scale = logit_scale.exp().clamp(max=100)
    texts = txt if hard_negatives is None else torch.cat([txt, hard_negatives])
    target = torch.arange(len(img), device=img.device)
    return 0.5 * (F.cross_entropy(scale * img @ texts.T, target)
                  + F.cross_entropy(scale * txt @ img.T, target))


class CaptionedWorld(torch.utils.data.Dataset):
    """World images (uint8 NHWC) with their captions and attribute-swapped hard negatives."""

    def __init__(self, images: torch.Tensor, rows: list[dict], swaps: Sequence[str]) -> None:
        self.images, self.rows, self.swaps = images, rows, tuple(swaps)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        rng = np.random.default_rng(int(torch.randint(2**31, (1,))))  # follows the global seed
        row = self.rows[i]
        return {"image": self.images[i], "caption": row["text"],
                "negatives": [swapped_caption(row, a, rng) for a in self.swaps]}


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    return {"pixel_values": normalise(torch.stack([it["image"] for it in items])),
            "captions": [it["caption"] for it in items],
            # grouped by swap kind: all colour swaps, then all shape swaps
            "negatives": [n for k in range(len(items[0]["negatives"])) for n in
                          (it["negatives"][k] for it in items)]}


class ClipPretraining(L.LightningModule):
    """Args:
        text: ``CLIPTextConfig`` kwargs (vocab, context and special ids come from the tokenizer).
        vision: ``CLIPVisionConfig`` kwargs (``image_size``, ``patch_size``, widths, depth).
        projection_dim: width of the shared embedding space.
        optimizer: partial optimizer, called with the parameters.
        lr_scheduler: partial ``diffusers.optimization.get_scheduler``, or None (constant LR).
    """

    def __init__(self, text: Mapping[str, Any], vision: Mapping[str, Any], projection_dim: int,
                 optimizer: Callable[..., torch.optim.Optimizer],
                 lr_scheduler: Callable[..., Any] | None = None) -> None:
        super().__init__()
        self.tokenizer = load_clip_tokenizer()
        self.model = build_clip(self.tokenizer, text, vision, projection_dim)
        self.optimizer_fn, self.lr_scheduler_fn = optimizer, lr_scheduler

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        img = image_embeddings(self.model, batch["pixel_values"])
        txt = text_embeddings(self.model, self.tokenizer, batch["captions"])
        neg = text_embeddings(self.model, self.tokenizer, batch["negatives"]) if batch["negatives"] else None
        loss = contrastive_loss(img, txt, neg, self.model.logit_scale)
        with torch.no_grad():
            acc = ((img @ txt.T).argmax(-1) == torch.arange(len(img), device=img.device)).float().mean()
        self.log_dict({"train/loss": loss, "train/i2t_acc": acc,
                       "train/logit_scale": self.model.logit_scale.exp()}, prog_bar=True)
        return loss

    def configure_optimizers(self) -> Any:
        return optimizers(self.parameters(), self.optimizer_fn, self.lr_scheduler_fn, self.trainer.max_steps)
