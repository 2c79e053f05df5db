"""Precision / recall (Kynkäänniemi et al. 2019) and density / coverage (Naeem et al. 2020) from features.

Each real (generated) feature owns a ball whose radius is the distance to its k-th nearest
neighbour among the real (generated) features, itself excluded. Then

    precision = share of generated features inside at least one real ball      (fidelity)
    recall    = share of real features inside at least one generated ball      (diversity)
    density   = mean over generated features of (number of real balls containing it) / k
    coverage  = share of real balls that contain at least one generated feature

"Inside" is the strict ``distance < radius`` of the authors' reference code (clovaai/
generative-evaluation-prdc), whose k defaults we keep: k = 3 for precision/recall as in
Kynkäänniemi et al., k = 5 for density/coverage as in Naeem et al.

Distances are computed in row blocks (``chunk`` × n at a time, float64), so 5000 × 5000 features
of size 2048 need ~40 MB per block instead of a 200 MB distance matrix; the cost is three n²d
matrix products (real-real, fake-fake, real-fake).
"""

from __future__ import annotations

import numpy as np


def _sq_dists(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    # |a|² + |b|² - 2ab can dip below 0 by round-off; squared distances order like distances.
    return np.clip(np.einsum("ij,ij->i", a, a)[:, None] + np.einsum("ij,ij->i", b, b)[None, :] - 2 * a @ b.T,
                   0, None)


def knn_radii(feats: np.ndarray, ks: tuple[int, ...], chunk: int = 1024) -> dict[int, np.ndarray]:
    """Squared distance of each feature to its k-th nearest neighbour in the same set (itself excluded)."""
    x = np.asarray(feats, dtype=np.float64)
    if max(ks) >= len(x):
        raise ValueError(f"k={max(ks)} needs more than {max(ks)} features, got {len(x)}")
    out = {k: np.empty(len(x)) for k in ks}
    for s in range(0, len(x), chunk):
        d = _sq_dists(x[s:s + chunk], x)
        rows = np.arange(len(d))
        d[rows, s + rows] = 0.0  # the point itself: exactly the nearest, whatever the round-off
        part = np.partition(d, sorted(ks), axis=1)  # index k = k-th neighbour, index 0 = itself
        for k in ks:
            out[k][s:s + chunk] = part[:, k]
    return out


def prdc(real: np.ndarray, fake: np.ndarray, k_pr: int = 3, k_dc: int = 5, chunk: int = 1024) -> dict[str, float]:
    """Precision, recall (k = ``k_pr``), density and coverage (k = ``k_dc``) of generated vs real features.

    Args:
        real, fake: feature matrices (n × d), e.g. Inception pool3 features.
        k_pr: neighbourhood size of the precision/recall manifolds (Kynkäänniemi et al.: 3).
        k_dc: neighbourhood size of the density/coverage balls (Naeem et al.: 5).
        chunk: rows per distance block; memory ≈ 8·chunk·max(n_real, n_fake) bytes per block.
    """
    x, y = np.asarray(real, dtype=np.float64), np.asarray(fake, dtype=np.float64)
    r_real = knn_radii(x, (k_pr, k_dc), chunk)
    r_fake = knn_radii(y, (k_pr,), chunk)[k_pr]
    in_real = np.zeros(len(y), bool)  # generated feature inside some real k_pr-ball
    real_hit = np.zeros(len(x), bool)  # real feature inside some generated k_pr-ball
    count_dc = 0  # Σ over generated of the number of real k_dc-balls containing it
    nearest_fake = np.full(len(x), np.inf)  # per real feature, squared distance to the nearest generated one
    for s in range(0, len(y), chunk):
        d = _sq_dists(x, y[s:s + chunk])  # real × block of generated
        in_real[s:s + chunk] = (d < r_real[k_pr][:, None]).any(0)
        real_hit |= (d < r_fake[None, s:s + chunk]).any(1)
        count_dc += int((d < r_real[k_dc][:, None]).sum())
        nearest_fake = np.minimum(nearest_fake, d.min(1))
    return {"precision": float(in_real.mean()), "recall": float(real_hit.mean()),
            "density": count_dc / (k_dc * len(y)), "coverage": float((nearest_fake < r_real[k_dc]).mean())}


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3, chunk: int = 1024) -> tuple[float, float]:
    """(precision, recall) of Kynkäänniemi et al. 2019 with k-NN balls."""
    out = prdc(real, fake, k_pr=k, k_dc=k, chunk=chunk)
    return out["precision"], out["recall"]


def density_coverage(real: np.ndarray, fake: np.ndarray, k: int = 5, chunk: int = 1024) -> tuple[float, float]:
    """(density, coverage) of Naeem et al. 2020 with k-NN balls around the real features."""
    out = prdc(real, fake, k_pr=k, k_dc=k, chunk=chunk)
    return out["density"], out["coverage"]
