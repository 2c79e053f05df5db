"""CLIP score: 100 · max(cos(image, text), 0) per image, with any transformers ``CLIPModel``.

Computed here rather than with torchmetrics' ``CLIPScore``, which breaks with transformers 5
(``get_image_features`` returns an output object there). Embeddings are taken as
``visual_projection(vision_model(...).pooler_output)`` / ``text_projection(text_model(...))``,
which is what ``get_*_features`` does in every transformers version.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import CLIPModel, CLIPTokenizer

from toolkit.hashing import module_fingerprint
from toolkit.locate import check_local_or_hub
from toolkit.logs import progress as progress_bar

log = logging.getLogger(__name__)

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def load_clip(name_or_path: str | None) -> CLIPScorer | None:
    """A scorer, or None when ``metrics.clip_model`` is null (the metric is skipped, and the row says
    so). A model that was named but cannot be found is an error, not a silently missing column."""
    if not name_or_path:
        log.warning("CLIP score skipped: metrics.clip_model is null")
        return None
    check_local_or_hub(str(name_or_path), "metrics.clip_model", "model")
    return CLIPScorer(name_or_path)


class CLIPScorer:
    """Args:
        name_or_path: hub id or local dir of a ``CLIPModel`` (with its tokenizer).
        device: where to run it.
        batch_size: images per forward pass.
    """

    def __init__(self, name_or_path: str, device: str | torch.device = "cpu", batch_size: int = 64) -> None:
        self.name = str(name_or_path)
        self.model = CLIPModel.from_pretrained(self.name).eval().to(device)
        self.tokenizer = CLIPTokenizer.from_pretrained(self.name, model_max_length=77)
        self.size = self.model.config.vision_config.image_size
        pre = Path(self.name) / "preprocessor_config.json"
        if pre.is_file():
            import json

            conf = json.loads(pre.read_text())
            self.mean, self.std = conf.get("image_mean", OPENAI_MEAN), conf.get("image_std", OPENAI_STD)
        else:
            self.mean, self.std = OPENAI_MEAN, OPENAI_STD
        self.device, self.batch_size = torch.device(device), batch_size
        self.sha256 = module_fingerprint(self.model)   # the weights' identity, in every row's key

    @property
    def protocol(self) -> dict[str, str]:
        return {"clip_model": self.name, "clip_sha256": self.sha256,
                "clip_resize": f"PIL bicubic {self.size}x{self.size}", "clip_score": "100*max(cos,0)"}

    def _pixels(self, images: list[Image.Image]) -> torch.Tensor:
        arr = np.stack([np.asarray(im.convert("RGB").resize((self.size, self.size), Image.Resampling.BICUBIC))
                        for im in images]).astype(np.float32) / 255.0
        arr = (arr - np.array(self.mean, np.float32)) / np.array(self.std, np.float32)
        return torch.from_numpy(arr).permute(0, 3, 1, 2).to(self.device)

    @torch.no_grad()
    def embed_images(self, images: list[Image.Image]) -> torch.Tensor:
        pooled = self.model.vision_model(pixel_values=self._pixels(images)).pooler_output
        return torch.nn.functional.normalize(self.model.visual_projection(pooled), dim=-1)

    @torch.no_grad()
    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        tok = self.tokenizer(texts, padding=True, truncation=True, return_tensors="pt").to(self.device)
        pooled = self.model.text_model(**tok).pooler_output
        return torch.nn.functional.normalize(self.model.text_projection(pooled), dim=-1)

    def scores(self, images: list[Image.Image], texts: list[str], progress: bool = True) -> np.ndarray:
        """Per-image CLIP score 100·max(cos, 0)."""
        out = []
        bar = progress_bar(total=len(images), desc="clip", unit="img", disable=not progress)
        for i in range(0, len(images), self.batch_size):
            img = self.embed_images(images[i : i + self.batch_size])
            txt = self.embed_texts(texts[i : i + self.batch_size])
            out.append((100 * (img * txt).sum(-1).clamp(min=0)).double().cpu().numpy())
            bar.update(len(img))
        bar.close()
        return np.concatenate(out) if out else np.zeros(0)
