"""Text–image scores per image with any transformers ``CLIPModel``: the CLIP score
100 · max(cos(image, text), 0) (Hessel et al. 2021), and the preference score of PickScore
(Kirstain et al. 2023: a CLIP-H fine-tuned on human preferences, ``yuvalkirstain/PickScore_v1``),
exp(logit_scale) · cos(image, text), the logit its authors rank images by.

Computed here rather than with torchmetrics' ``CLIPScore``, which breaks with transformers 5
(``get_image_features`` returns an output object there). Embeddings are taken as
``visual_projection(vision_model(...).pooler_output)`` / ``text_projection(text_model(...))``,
which is what ``get_*_features`` does in every transformers version.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from PIL import Image
from transformers import CLIPModel, CLIPTokenizer

from toolkit.hashing import module_fingerprint
from toolkit.locate import check_local_or_hub
from toolkit.logs import progress as progress_bar
from toolkit.metrics.features import OPENAI_MEAN, OPENAI_STD, clip_square, mean_std

log = logging.getLogger(__name__)


def load_clip(name_or_path: str | None, device: str | torch.device = "cpu", batch_size: int = 64
              ) -> CLIPScorer | None:
    """A scorer, or None when ``metrics.clip_model`` is null (the metric is skipped, and the row says
    so). A model that was named but cannot be found is an error, not a silently missing column."""
    if not name_or_path:
        log.warning("CLIP score skipped: metrics.clip_model is null")
        return None
    check_local_or_hub(str(name_or_path), "metrics.clip_model", "model")
    return CLIPScorer(name_or_path, device, batch_size)


def load_preference(name_or_path: str | None, device: str | torch.device = "cpu", batch_size: int = 64
                    ) -> CLIPScorer:
    """The preference scorer ``metrics.compute=[..., preference]`` needs: ``metrics.preference_model``."""
    if not name_or_path:
        raise ValueError("metrics.compute has preference, but metrics.preference_model is null: name a CLIPModel "
                         "fine-tuned on preferences (yuvalkirstain/PickScore_v1, or its local folder)")
    check_local_or_hub(str(name_or_path), "metrics.preference_model", "model")
    return CLIPScorer(name_or_path, device, batch_size, kind="preference")


class CLIPScorer:
    """Args:
        name_or_path: hub id or local dir of a ``CLIPModel`` (with its tokenizer).
        device: where to run it.
        batch_size: images per forward pass.
    """

    def __init__(self, name_or_path: str, device: str | torch.device = "cpu", batch_size: int = 64,
                 kind: str = "clip_score") -> None:
        if kind not in ("clip_score", "preference"):
            raise ValueError(f"kind={kind!r}: expected clip_score or preference")
        self.name, self.kind = str(name_or_path), kind
        self.model = CLIPModel.from_pretrained(self.name).eval().to(device)
        self.tokenizer = CLIPTokenizer.from_pretrained(self.name, model_max_length=77)
        self.size = self.model.config.vision_config.image_size
        self.mean, self.std = mean_std(self.name, OPENAI_MEAN, OPENAI_STD)
        self.device, self.batch_size = torch.device(device), batch_size
        self.sha256 = module_fingerprint(self.model)   # the weights' identity, in every row's key

    @property
    def protocol(self) -> dict[str, str]:
        if self.kind == "preference":
            return {"preference_model": self.name, "preference_sha256": self.sha256,
                    "preference_resize": f"centre crop square, PIL bicubic {self.size}x{self.size}",
                    "preference": "exp(logit_scale)*cos (PickScore)"}
        return {"clip_model": self.name, "clip_sha256": self.sha256,
                "clip_resize": f"centre crop square, PIL bicubic {self.size}x{self.size}",
                "clip_score": "100*max(cos,0)"}

    @torch.no_grad()
    def _score(self, img: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
        cos = (img * txt).sum(-1)
        return self.model.logit_scale.exp() * cos if self.kind == "preference" else 100 * cos.clamp(min=0)

    @torch.no_grad()
    def embed_images(self, images: list[Image.Image]) -> torch.Tensor:
        """L2-normalised image embeddings, CMMD's preprocessing (``features.clip_square``): with
        ``metrics.features.clip=same`` these are the CMMD features too, computed once."""
        x = clip_square(images, self.size, self.mean, self.std).to(self.device)
        pooled = self.model.vision_model(pixel_values=x).pooler_output
        return torch.nn.functional.normalize(self.model.visual_projection(pooled), dim=-1)

    @torch.no_grad()
    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        tok = self.tokenizer(texts, padding=True, truncation=True, return_tensors="pt").to(self.device)
        pooled = self.model.text_model(**tok).pooler_output
        return torch.nn.functional.normalize(self.model.text_projection(pooled), dim=-1)

    def scores(self, images: list[Image.Image], texts: list[str], progress: bool = True) -> np.ndarray:
        """Per-image CLIP score 100·max(cos, 0) (or the preference score, ``kind="preference"``)."""
        return self.scores_and_embeddings(images, texts, progress)[0]

    def scores_and_embeddings(self, images: list[Image.Image], texts: list[str], progress: bool = True
                              ) -> tuple[np.ndarray, np.ndarray]:
        """Per-image CLIP scores and the unit image embeddings they came from (float64)."""
        out, embs = [], []
        bar = progress_bar(total=len(images), desc="clip", unit="img", disable=not progress)
        for i in range(0, len(images), self.batch_size):
            img = self.embed_images(images[i : i + self.batch_size])
            txt = self.embed_texts(texts[i : i + self.batch_size])
            out.append(self._score(img, txt).double().cpu().numpy())
            embs.append(img.double().cpu().numpy())
            bar.update(len(img))
        bar.close()
        if not out:
            return np.zeros(0), np.zeros((0, 0))
        return np.concatenate(out), np.concatenate(embs)
