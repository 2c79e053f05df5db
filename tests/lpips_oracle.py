"""The ``lpips`` package (0.1.4) itself, run in a subprocess of tests/test_perceptual.py: writes a
seeded random torchvision trunk in torchvision's own state-dict format, and the package's LPIPS
between every pair of the given images with that trunk and the package's v0.1 heads.

    python tests/lpips_oracle.py NET TRUNK_OUT IMAGES.npy DISTANCES_OUT.npy

Run with the package and torchvision 0.28.0 (the release paired with torch 2.13) on the path,
installed with --no-deps beside (not into) the toolkit's environment: torchvision's PyPI wheel is
CUDA-linked, so its C ops do not load on a CPU torch, and its Python registers fake kernels for two
of them at import; defining their schemas first lets the (pure Python) models import.
"""

import sys

import numpy as np
import torch

lib = torch.library.Library("torchvision", "DEF")
for op in ("nms", "qnms"):
    lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")

import lpips  # noqa: E402
import torchvision  # noqa: E402

net, trunk_out, images_in, out = sys.argv[1:5]
torch.manual_seed(0)
tv = {"alex": torchvision.models.alexnet, "vgg": torchvision.models.vgg16}[net](weights=None)
torch.save(tv.state_dict(), trunk_out)
model = lpips.LPIPS(net=net, pnet_rand=True, verbose=False)
trunk = dict(tv.features.named_parameters())
with torch.no_grad():
    for name, p in model.net.named_parameters():   # slice<k>.<i>.weight is features.<i>.weight
        p.copy_(trunk[name.split(".", 1)[1]])
x = torch.cat([lpips.im2tensor(im) for im in np.load(images_in)])
k = len(x)
with torch.no_grad():
    d = np.stack([model(x[i:i + 1].expand(k, -1, -1, -1), x).flatten().numpy() for i in range(k)])
np.save(out, d)
