"""Independent implementations the tests compare with, run in a subprocess with the packages that
the ``oracles`` fixture (tests/conftest.py) installs beside, not into, the toolkit's environment:

    python tests/oracles.py lpips NET TRUNK_OUT IMAGES.npy DISTANCES_OUT.npy
        the ``lpips`` package (0.1.4): writes a seeded random torchvision trunk in torchvision's own
        state-dict format, and the package's LPIPS between every pair of the given images with that
        trunk and the package's v0.1 heads.
    python tests/oracles.py fidelity A.npy B.npy OUT.json
        torch-fidelity (0.4.0)'s pure functions on two feature sets: FID from
        ``fid_features_to_statistics`` + ``fid_statistics_to_metric`` (eigenvalues, no sqrtm) and KID
        from ``kid_features_to_metric`` with one subset of the whole (equal-sized) sets.

torchvision 0.28.0 is the release paired with torch 2.13; its PyPI wheel is CUDA-linked, so its C
ops do not load on a CPU torch, and its Python registers fake kernels for two of them at import:
defining their schemas first lets the (pure Python) packages import.
"""

import json
import sys

import numpy as np
import torch

lib = torch.library.Library("torchvision", "DEF")
for op in ("nms", "qnms"):
    lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")


def lpips_distances(net: str, trunk_out: str, images_in: str, out: str) -> None:
    import lpips
    import torchvision

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


def fidelity(a_in: str, b_in: str, out: str) -> None:
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
    from torch_fidelity.metric_kid import kid_features_to_metric

    a, b = (torch.from_numpy(np.load(f)) for f in (a_in, b_in))
    fid = fid_statistics_to_metric(fid_features_to_statistics(a), fid_features_to_statistics(b), verbose=False)
    kid = kid_features_to_metric(a, b, kid_subsets=1, kid_subset_size=len(a), verbose=False)
    with open(out, "w") as f:
        json.dump({"fid": fid["frechet_inception_distance"], "kid": kid["kernel_inception_distance_mean"]}, f)


if __name__ == "__main__":
    {"lpips": lpips_distances, "fidelity": fidelity}[sys.argv[1]](*sys.argv[2:])
