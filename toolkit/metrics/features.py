"""Feature models by name, besides TF-Inception (``toolkit.metrics.inception``): each a feature space
with the preprocessing of the implementation that defined its metric.

- ``clip`` (CMMD, Jayasumana et al. 2024; google-research ``cmmd/``): a CLIP image tower
  (``CLIPVisionModelWithProjection``, or a whole ``CLIPModel``, e.g. ``openai/clip-vit-large-patch14-336``);
  each image centre-cropped square and resized to the tower's ``image_size`` with PIL bicubic,
  scaled to [0, 1], normalised with the model's mean/std; ``image_embeds`` L2-normalised.
- ``dinov2`` (FD_DINOv2, Stein et al. 2023; dgm-eval): ``Dinov2Model`` (e.g. ``facebook/dinov2-large``);
  each image squashed to 224×224 with PIL bicubic (no crop), ImageNet mean/std; the CLS token
  after the final LayerNorm (``pooler_output``), not normalised.
- ``style`` (CSD, Somepalli et al. 2024): CLIP ViT-L/14 at 224 px with the trained 1024→768 style
  projection, in ``CLIPVisionModelWithProjection`` form (the projection is ``visual_projection``);
  each image's shortest side resized to 224 (PIL bicubic), centre crop 224, OpenAI CLIP mean/std;
  ``image_embeds`` L2-normalised.

All run in float32. The preprocessing is pure functions here, tested against transformers'
``CLIPImageProcessor`` / ``BitImageProcessor`` on non-square images; the protocol (recipe, size,
mean/std, output, precision) and the weights' hash go into every row and every cache key.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from toolkit.hashing import module_fingerprint
from toolkit.locate import check_local_or_hub
from toolkit.logs import progress as progress_bar

log = logging.getLogger(__name__)

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# --- preprocessing (pure) ------------------------------------------------------------------------

def crop_square(img: Image.Image) -> Image.Image:
    """The centred square of side min(w, h) (cmmd ``io_util.center_crop_and_resize``)."""
    w, h = img.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    return img.crop((left, top, left + s, top + s))


def resize_shortest(img: Image.Image, size: int) -> Image.Image:
    """Shortest side to ``size``, the other int(size·long/short) (transformers' and torchvision's rule)."""
    w, h = img.size
    short, long = min(w, h), max(w, h)
    other = int(size * long / short)
    new = (size, other) if w <= h else (other, size)
    return img.resize(new, Image.Resampling.BICUBIC)


def centre_crop(img: Image.Image, size: int) -> Image.Image:
    """torchvision's ``CenterCrop`` (CSD's transform): offsets int(round((side − size)/2))."""
    w, h = img.size
    left, top = int(round((w - size) / 2)), int(round((h - size) / 2))
    return img.crop((left, top, left + size, top + size))


def normalise_pixels(arrs: Sequence[np.ndarray], mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 HWC images → float32 NCHW, x/255 then (x − mean)/std per channel."""
    x = np.stack(arrs).astype(np.float32) * np.float32(1 / 255)
    x = (x - np.array(mean, np.float32)) / np.array(std, np.float32)
    return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()


def clip_square(images: Sequence[Image.Image], size: int, mean=OPENAI_MEAN, std=OPENAI_STD) -> torch.Tensor:
    """CMMD's (and the CLIP score's) input: centre crop square, bicubic to size×size, normalise."""
    return normalise_pixels([np.asarray(crop_square(im.convert("RGB")).resize((size, size), Image.Resampling.BICUBIC))
                             for im in images], mean, std)


def squash(images: Sequence[Image.Image], size: int = 224, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """dgm-eval's DINOv2 input: bicubic to size×size whatever the aspect, normalise."""
    return normalise_pixels([np.asarray(im.convert("RGB").resize((size, size), Image.Resampling.BICUBIC))
                             for im in images], mean, std)


def shortest_then_crop(images: Sequence[Image.Image], size: int = 224, mean=OPENAI_MEAN, std=OPENAI_STD
                       ) -> torch.Tensor:
    """CSD's (and CLIP's own processor's) input: shortest side to size, centre crop, normalise."""
    return normalise_pixels([np.asarray(centre_crop(resize_shortest(im.convert("RGB"), size), size))
                             for im in images], mean, std)


# --- the feature spaces ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Recipe:
    """What differs between feature models: their class, preprocessing, output and normalisation."""
    loader: str                      # transformers class name
    pixels: Any                      # (images, size, mean, std) -> NCHW tensor
    recipe: str                      # the preprocessing, in words (the protocol)
    output: str                      # the model output used
    unit: bool                       # L2-normalise the output
    mean: tuple[float, ...]          # used when the model folder has no preprocessor_config.json
    std: tuple[float, ...]
    fixed_size: int | None = None    # input side; None: the model config's image_size


RECIPES = {
    "clip": Recipe("CLIPVisionModelWithProjection", clip_square, "centre crop square, PIL bicubic to image_size",
                   "image_embeds", True, OPENAI_MEAN, OPENAI_STD),
    "dinov2": Recipe("Dinov2Model", squash, "PIL bicubic squash to 224x224, no crop", "pooler_output (CLS after "
                     "the final LayerNorm)", False, IMAGENET_MEAN, IMAGENET_STD, fixed_size=224),
    "style": Recipe("CLIPVisionModelWithProjection", shortest_then_crop, "shortest side PIL bicubic to image_size, "
                    "centre crop", "image_embeds (CSD style projection)", True, OPENAI_MEAN, OPENAI_STD),
}


def mean_std(name: str, default_mean: Sequence[float], default_std: Sequence[float]
             ) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """A local model folder's ``preprocessor_config.json`` mean/std, else the recipe's defaults (a
    hub model's processor config is read from the hub cache the model came from)."""
    path = Path(name) / "preprocessor_config.json"
    if Path(name).exists() and not path.is_file():   # a local folder without one
        return tuple(default_mean), tuple(default_std)
    if not path.is_file():
        try:
            from huggingface_hub import hf_hub_download

            path = Path(hf_hub_download(name, "preprocessor_config.json"))
        except OSError:   # no processor file (or none cached offline): the recipe's published constants
            return tuple(default_mean), tuple(default_std)
    conf = json.loads(path.read_text())
    return tuple(conf.get("image_mean", default_mean)), tuple(conf.get("image_std", default_std))


def load_checked(cls_name: str, name: str, key: str) -> torch.nn.Module:
    """``from_pretrained`` that fails on missing, unexpected or mis-shaped weights: a feature model
    with random layers gives numbers that mean nothing."""
    import transformers

    cls = getattr(transformers, cls_name)
    model, info = cls.from_pretrained(name, output_loading_info=True)
    missing = list(info.get("missing_keys") or [])
    extra = list(info.get("unexpected_keys") or [])
    bad = list(info.get("mismatched_keys") or [])
    if missing or extra or bad:
        raise ValueError(f"{key}={name!r} does not load whole as {cls_name}: {len(missing)} missing "
                         f"(e.g. {missing[:3]}), {len(extra)} unexpected (e.g. {extra[:3]}), {len(bad)} of the "
                         "wrong shape: name a checkpoint of that class")
    return model.eval()


class FeatureModel:
    """One feature space's extractor: ``model(images) -> (n × d) float64 features``.

    Args:
        space: ``clip``, ``dinov2`` or ``style`` (``RECIPES``).
        name_or_path: hub id or local folder of the model.
        device, batch_size: where and how many images per forward pass.
        model: an already loaded module to use instead (``features.clip=same``: the CLIP score's
            ``CLIPModel``, whose image tower is used), and ``sha256`` its fingerprint when known.
    """

    def __init__(self, space: str, name_or_path: str, device: str | torch.device = "cpu", batch_size: int = 50,
                 model: torch.nn.Module | None = None, sha256: str | None = None) -> None:
        if space not in RECIPES:
            raise ValueError(f"metrics.features.{space}: unknown feature space "
                             f"(known: inception, {', '.join(RECIPES)})")
        self.space, self.name, self.r = space, str(name_or_path), RECIPES[space]
        if model is None:
            check_local_or_hub(self.name, f"metrics.features.{space}", "model")
            model = load_checked(self.loader(), self.name, f"metrics.features.{space}")
        self.model = model.eval().to(device)
        vision = getattr(model.config, "vision_config", model.config)
        self.size = self.r.fixed_size or int(vision.image_size)
        self.mean, self.std = mean_std(self.name, self.r.mean, self.r.std)
        self.device, self.batch_size = torch.device(device), batch_size
        self.sha256 = sha256 or module_fingerprint(self.model)

    def loader(self) -> str:
        """The class to load: the recipe's, or ``CLIPModel`` for a whole CLIP checkpoint (its image
        tower is used: loading one as ``CLIPVisionModelWithProjection`` drops the projection size,
        which lives in the outer config)."""
        if self.r.loader == "CLIPVisionModelWithProjection":
            from transformers import AutoConfig

            if AutoConfig.from_pretrained(self.name).model_type == "clip":
                return "CLIPModel"
        return self.r.loader

    @property
    def protocol(self) -> dict[str, Any]:
        return {"space": self.space, "model": self.name, "weights_sha256": self.sha256, "class": self.r.loader,
                "preprocess": self.r.recipe, "size": self.size, "mean": list(self.mean), "std": list(self.std),
                "output": self.r.output, "l2_normalised": self.r.unit, "precision": "float32"}

    def pixels(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return self.r.pixels(images, self.size, self.mean, self.std)

    @torch.inference_mode()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        if hasattr(m, "get_image_features") and hasattr(m, "text_model"):   # a whole CLIPModel
            out = m.visual_projection(m.vision_model(pixel_values=x).pooler_output)
        else:
            out = getattr(m(pixel_values=x), "image_embeds" if self.r.output.startswith("image_embeds")
                          else "pooler_output")
        return torch.nn.functional.normalize(out, dim=-1) if self.r.unit else out

    def __call__(self, images: Sequence[Image.Image], progress: bool = True, desc: str | None = None) -> np.ndarray:
        out = []
        bar = progress_bar(total=len(images), desc=desc or self.space, unit="img", disable=not progress)
        for i in range(0, len(images), self.batch_size):
            out.append(self.embed(self.pixels(images[i: i + self.batch_size]).to(self.device)).double().cpu().numpy())
            bar.update(len(out[-1]))
        bar.close()
        return np.concatenate(out) if out else np.zeros((0, 0))
