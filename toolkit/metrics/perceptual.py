"""LPIPS (Zhang et al., CVPR 2018, "The Unreasonable Effectiveness of Deep Features as a Perceptual
Metric", v0.1) and the within-prompt diversity it scores: the mean LPIPS distance between images
generated from the same prompt with different seeds — low when a fine-tune collapses onto one
picture per prompt.

LPIPS(x, y) = Σ_l mean_hw Σ_c w_lc (x̂_lchw − ŷ_lchw)², x̂_l the trunk's l-th ReLU output normalised
to unit length over channels (+1e-10), w_l the linear head of layer l; inputs in [−1, 1] shifted and
scaled per channel first. The trunk is torchvision's AlexNet (the paper's default) or VGG-16
``features``, its layers at torchvision's indices so torchvision's weights file loads as it is; the
heads are the ``lpips`` package's ``weights/v0.1/<net>.pth``. Written here rather than imported:
the ``lpips`` package needs torchvision, whose PyPI wheels pair with one torch build each and may
replace it, and has torchvision download the trunk on first use (offline it cannot). Tested against
the package itself (tests/test_perceptual.py).

Diversity: within prompt p with k_p ≥ 2 images, D_p is the mean of the k_p(k_p−1)/2 pairwise
distances; the set's score is the mean of D_p over the prompts with two images or more. Prompts
are the independent units (pairs within one share images), so the interval is the Student t over
prompts and the paired Δ the paired t over per-prompt differences. Per-image form
r_i = mean_{j≠i, same prompt} d_ij: its mean over a prompt's images is D_p exactly.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from toolkit.hashing import file_sha256
from toolkit.metrics.intervals import Comparison, Interval, compare_means, mean_interval

# trunk per net: torchvision ``features`` as (kind, args) per index, and where each LPIPS layer ends
_ALEX = [("conv", 3, 64, 11, 4, 2), ("relu",), ("pool",), ("conv", 64, 192, 5, 1, 2), ("relu",), ("pool",),
         ("conv", 192, 384, 3, 1, 1), ("relu",), ("conv", 384, 256, 3, 1, 1), ("relu",),
         ("conv", 256, 256, 3, 1, 1), ("relu",)]
_VGG: list[tuple] = []
for _block, (_cin, _cout, _n) in enumerate([(3, 64, 2), (64, 128, 2), (128, 256, 3), (256, 512, 3), (512, 512, 3)]):
    if _block:
        _VGG.append(("pool",))
    for _j in range(_n):
        _VGG += [("conv", _cin if _j == 0 else _cout, _cout, 3, 1, 1), ("relu",)]
NETS = {"alex": (_ALEX, (2, 5, 8, 10, 12), "alexnet-owt-7be5be79.pth"),
        "vgg": (_VGG, (4, 9, 16, 23, 30), "vgg16-397923af.pth")}
TORCHVISION_URL = "https://download.pytorch.org/models/"
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)


def _module(spec: tuple, net: str) -> nn.Module:
    if spec[0] == "conv":
        return nn.Conv2d(*spec[1:])
    if spec[0] == "relu":
        return nn.ReLU()
    return nn.MaxPool2d(3, 2) if net == "alex" else nn.MaxPool2d(2, 2)


def normalise(f: torch.Tensor) -> torch.Tensor:
    """Unit length over channels, as LPIPS: f / (‖f‖₂ + 1e-10)."""
    return f / (f.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)


class LPIPS(nn.Module):
    """The LPIPS v0.1 network: ``layers`` gives each image's normalised trunk features, ``heads`` the
    per-channel weights; ``forward(x, y)`` the distance of each pair of images in [−1, 1]."""

    def __init__(self, net: str = "alex"):
        super().__init__()
        if net not in NETS:
            raise ValueError(f"metrics.lpips.net={net!r}: expected one of {sorted(NETS)} (squeeze is not implemented)")
        specs, self.ends, _ = NETS[net]
        self.net = net
        self.features = nn.Sequential(*[_module(s, net) for s in specs])
        self.channels = [[m.out_channels for m in self.features[:e] if isinstance(m, nn.Conv2d)][-1] for e in self.ends]
        self.register_buffer("heads", torch.zeros(sum(self.channels)), persistent=False)
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1), persistent=False)

    def layers(self, x: torch.Tensor) -> list[torch.Tensor]:
        h, out, start = (x - self.shift) / self.scale, [], 0
        for end in self.ends:
            h = self.features[start:end](h)
            out.append(normalise(h))
            start = end
        return out

    def smallest_input(self) -> int:
        """The shortest image side (px) whose features reach the last layer: each conv and pool takes
        ⌊(h + 2p − k)/s⌋ + 1 (alex 31 px, vgg 16 px); smaller images fail inside max_pool2d."""
        def side(h: int) -> int:
            for m in self.features:
                if isinstance(m, (nn.Conv2d, nn.MaxPool2d)):
                    k, st, p = (m.kernel_size, m.stride, m.padding) if isinstance(m, nn.MaxPool2d) else (
                        m.kernel_size[0], m.stride[0], m.padding[0])
                    h = (h + 2 * p - k) // st + 1
            return h
        return next(h for h in range(1, 4096) if side(h) >= 1)

    def weights(self) -> list[torch.Tensor]:
        return list(torch.split(self.heads, self.channels))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return sum((w.view(1, -1, 1, 1) * (a - b) ** 2).sum(1).mean((1, 2))
                   for a, b, w in zip(self.layers(x), self.layers(y), self.weights()))


def package_heads(net: str) -> Path | None:
    """The installed ``lpips`` package's heads file, found without importing it (its import needs torchvision)."""
    spec = importlib.util.find_spec("lpips")
    if spec is None or not spec.submodule_search_locations:
        return None
    f = Path(next(iter(spec.submodule_search_locations))) / "weights" / "v0.1" / f"{net}.pth"
    return f if f.is_file() else None


def load(net: str, backbone: str | Path | None, heads: str | Path | None) -> tuple[LPIPS, dict[str, Any]]:
    """LPIPS with torchvision's trunk weights file ``backbone`` and the heads file ``heads`` (None: the
    installed ``lpips`` package's); every tensor must be there with its shape. Returns the model and
    its protocol (net, files and their sha256)."""
    model = LPIPS(net)
    wanted = NETS[net][2]
    if not backbone:
        raise ValueError(f"metrics.compute has lpips_diversity: set metrics.lpips.backbone to torchvision's {net} "
                         f"weights file {wanted} ({TORCHVISION_URL}{wanted}; torchvision keeps it in "
                         "~/.cache/torch/hub/checkpoints), or drop lpips_diversity")
    backbone = Path(backbone)
    heads = Path(heads) if heads else package_heads(net)
    if heads is None:
        raise ValueError(f"metrics.lpips.heads is null and no lpips package is installed: pass the path of lpips' "
                         f"weights/v0.1/{net}.pth, or `pip install --no-deps lpips==0.1.4` (its heads are found "
                         "without importing it)")
    for what, f in (("backbone", backbone), ("heads", heads)):
        if not f.is_file():
            raise FileNotFoundError(f"metrics.lpips.{what}: {f} is not a file")
    sha = {"backbone": file_sha256(backbone), "heads": file_sha256(heads)}
    m = re.fullmatch(r".+-([0-9a-f]{8,})\.pth", backbone.name)   # torchvision names files by their hash's prefix
    if m and not sha["backbone"].startswith(m.group(1)):
        raise ValueError(f"metrics.lpips.backbone: {backbone} is named for sha256 {m.group(1)}… but its sha256 is "
                         f"{sha['backbone'][:16]}…: a corrupt or different file")
    trunk = torch.load(backbone, map_location="cpu", weights_only=True)
    own = {f"features.{k}": v for k, v in model.features.state_dict().items()}
    extra = [k for k in trunk if k not in own and not k.startswith("classifier.")]
    missing = [k for k in own if k not in trunk]
    if missing or extra:
        raise ValueError(f"metrics.lpips.backbone: {backbone} is not torchvision's {net} state dict "
                         f"(missing {missing[:4]}, unexpected {extra[:4]})")
    model.features.load_state_dict({k[len("features."):]: trunk[k] for k in own})   # classifier.*: unused
    lin = torch.load(heads, map_location="cpu", weights_only=True)
    names = [f"lin{k}.model.1.weight" for k in range(len(model.channels))]
    if sorted(lin) != sorted(names) or [tuple(lin[k].shape) for k in names] != [(1, c, 1, 1) for c in model.channels]:
        raise ValueError(f"metrics.lpips.heads: {heads} is not lpips v0.1's {net} heads (expected {names} of "
                         f"shapes (1, C, 1, 1), C in {model.channels}; got {sorted(lin)[:6]})")
    model.heads.copy_(torch.cat([lin[k].flatten() for k in names]))
    protocol = {"net": net, "version": "0.1", "input": "RGB uint8 / 127.5 − 1, then (x − shift)/scale",
                "backbone_file": backbone.name, "backbone_sha256": sha["backbone"], "heads_file": heads.name,
                "heads_sha256": sha["heads"], "precision": "float32 network, float64 pairwise sums",
                "diversity": "mean over prompts with ≥ 2 images of the mean pairwise LPIPS within the prompt"}
    return model.eval().requires_grad_(False), protocol


def to_input(images: Sequence[Any]) -> torch.Tensor:
    """PIL images or uint8 HWC arrays → float32 NCHW in [−1, 1] (the package's ``im2tensor``)."""
    x = np.stack([np.asarray(im.convert("RGB") if hasattr(im, "convert") else im) for im in images])
    return torch.from_numpy(x.astype(np.float32) / np.float32(127.5) - 1).permute(0, 3, 1, 2).contiguous()


@torch.no_grad()
def pairwise(model: LPIPS, images: Sequence[Any], batch_size: int = 16, device: Any = "cpu") -> np.ndarray:
    """The k×k LPIPS distances among ``images`` (one prompt's): d_ij = Σ_l (q_i + q_j − 2 g_ij)/(H_l W_l),
    g the head-weighted Gram matrix of the layer's normalised features and q its diagonal, in float64
    (``batch_size`` images at a time, so float64 copies stay small). Holds the prompt's features in
    float32 (what the network gives): per image, AlexNet 10 MiB at 512 px, VGG-16 122 MiB."""
    feats: list[list[torch.Tensor]] = []
    for s in range(0, len(images), batch_size):
        feats.append([f.cpu() for f in model.layers(to_input(images[s:s + batch_size]).to(device))])
    k = len(images)
    d = torch.zeros(k, k, dtype=torch.float64)
    for layer, w in enumerate(model.weights()):
        x = torch.cat([b[layer] for b in feats]).flatten(2)       # k × C × HW, float32
        w, hw = w.double().cpu(), x.shape[2]
        for i in range(0, k, batch_size):
            xi = x[i:i + batch_size].double()
            for j in range(0, k, batch_size):
                d[i:i + batch_size, j:j + batch_size] -= 2 * torch.einsum("ich,c,jch->ij", xi, w,
                                                                          x[j:j + batch_size].double()) / hw
        q = -torch.diagonal(d).clone() / 2                        # g_ii / hw of this layer
        d += q[:, None] + q[None, :]
        d.fill_diagonal_(0)
    return d.clamp_(min=0).numpy()


def per_image(distances: np.ndarray) -> np.ndarray:
    """r_i = mean over j ≠ i of d_ij (NaN for a prompt with one image)."""
    k = len(distances)
    return distances.sum(1) / (k - 1) if k > 1 else np.full(k, np.nan)


def prompt_means(values: np.ndarray, prompt_index: np.ndarray) -> np.ndarray:
    """The mean of ``values`` over each prompt's images, for the prompts whose values are not NaN."""
    values, prompt_index = np.asarray(values, np.float64), np.asarray(prompt_index)
    keep = ~np.isnan(values)
    ids = np.unique(prompt_index[keep])
    return np.array([values[keep & (prompt_index == p)].mean() for p in ids])


def _over_prompts(method: str, n: int) -> str:
    return method.replace(" per-image differences", " per-prompt differences").replace(f"{n} images", f"{n} prompts")


def diversity_interval(values: np.ndarray, prompt_index: np.ndarray, level: float = 0.95) -> Interval:
    """Mean over prompts of the within-prompt mean LPIPS, Student t over prompts."""
    means = prompt_means(values, prompt_index)
    if len(means) == 0:
        raise ValueError("lpips_diversity: no prompt has two images or more")
    iv = mean_interval(means, level)
    return dataclasses.replace(iv, method=_over_prompts(iv.method, len(means)))


def compare_diversity(metric: str, a: np.ndarray, b: np.ndarray, prompt_index: np.ndarray,
                      level: float = 0.95) -> Comparison:
    """Δ of the diversity, paired prompt by prompt (same prompts and seeds in both cells)."""
    ma, mb = prompt_means(a, prompt_index), prompt_means(b, prompt_index)
    c = compare_means(metric, ma, mb, level)
    return dataclasses.replace(c, method=_over_prompts(c.method, len(ma)))
