"""CMMD (Jayasumana et al., CVPR 2024, "Rethinking FID"): MMD² with a Gaussian RBF kernel on
L2-normalised CLIP image embeddings, ×1000 — the estimator of the reference code
(google-research ``cmmd/distance.py``): the biased V-statistic over all pairs, diagonal included,
no square root, σ = 10. Kernel values all lie in [e^(-4/(2σ²)), 1] = [e^-0.02, 1], so the sums are
taken in float64 (float32 loses the differences between them).

Pure numpy; the kernel is summed in row blocks, never held whole. Intervals: the grouped jackknife
over generated images with the reference fixed (``toolkit.metrics.intervals``), from block sums
computed once (one n² pass for the generated side, one m·n pass across).
"""

from __future__ import annotations

import numpy as np

from toolkit.metrics.intervals import Comparison, Interval, groups, jackknife_comparison, jackknife_interval

SIGMA = 10.0
SCALE = 1000.0
_CHUNK = 1024


def normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _rbf(a: np.ndarray, b: np.ndarray, sigma: float) -> np.ndarray:
    d2 = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T
    return np.exp(-np.maximum(d2, 0) / (2 * sigma * sigma))


def kernel_sum(a: np.ndarray, b: np.ndarray, sigma: float = SIGMA) -> float:
    """Σ_ij k(a_i, b_j), diagonal included, in row blocks."""
    return float(sum(_rbf(a[i: i + _CHUNK], b, sigma).sum() for i in range(0, len(a), _CHUNK)))


def cmmd(real: np.ndarray, fake: np.ndarray, sigma: float = SIGMA, normalised: bool = False) -> float:
    """CMMD between two sets of CLIP image embeddings (rows), as the reference code computes it.

    Args:
        real, fake: embeddings (m × d, n × d); L2-normalised here unless ``normalised``.
        sigma: the RBF bandwidth (the paper's 10).
    """
    x, y = (np.asarray(v, np.float64) for v in (real, fake)) if normalised else (normalise(real), normalise(fake))
    m, n = len(x), len(y)
    return SCALE * (kernel_sum(x, x, sigma) / m**2 + kernel_sum(y, y, sigma) / n**2
                    - 2 * kernel_sum(x, y, sigma) / (m * n))


def leave_group_out(real: np.ndarray, fake: np.ndarray, parts: list[np.ndarray], sigma: float = SIGMA,
                    kxx: float | None = None) -> tuple[float, np.ndarray]:
    """CMMD of all generated embeddings and of each ``parts``-group left out (reference fixed).

    With B[g, h] = Σ_{i∈g, j∈h} k(y_i, y_j) and c[g] = Σ_{i∈g} Σ_x k(x, y_i), leaving g out gives
    Σ_yy = ΣB - 2 Σ_h B[g, h] + B[g, g] and Σ_xy = Σc - c[g]: one pass over the kernel serves all.
    ``kxx``: the reference's mean kernel value (Σ_xx / m²), when already known."""
    x, y = normalise(real), normalise(fake)
    m = len(x)
    kxx = kernel_sum(x, x, sigma) / m**2 if kxx is None else kxx
    label = np.empty(len(y), int)
    for g, idx in enumerate(parts):
        label[idx] = g
    G = len(parts)
    block, cross = np.zeros((G, G)), np.zeros(G)
    onehot = np.eye(G)[label]
    for i in range(0, len(y), _CHUNK):
        rows = slice(i, i + _CHUNK)
        block += onehot[rows].T @ _rbf(y[rows], y, sigma) @ onehot
        cross += onehot[rows].T @ sum(_rbf(x[j: j + _CHUNK], y[rows], sigma).sum(0) for j in range(0, m, _CHUNK))
    sizes = np.array([len(p) for p in parts], np.float64)
    n = float(sizes.sum())

    def value(syy: float, sxy: float, n_left: float) -> float:
        return SCALE * (kxx + syy / n_left**2 - 2 * sxy / (m * n_left))

    est = value(block.sum(), cross.sum(), n)
    reps = np.array([value(block.sum() - 2 * block[g].sum() + block[g, g], cross.sum() - cross[g], n - sizes[g])
                     for g in range(G)])
    return est, reps


def cmmd_interval(real: np.ndarray, fake: np.ndarray, n_groups: int = 20, level: float = 0.95, seed: int = 0,
                  sigma: float = SIGMA) -> Interval:
    """CMMD with the grouped-jackknife interval over generated images (reference fixed)."""
    parts = groups(len(fake), n_groups, seed)
    est, reps = leave_group_out(real, fake, parts, sigma)
    return jackknife_interval(est, reps, parts, len(fake), level)


def compare_cmmd(real: np.ndarray, fake_a: np.ndarray, fake_b: np.ndarray, n_groups: int = 20,
                 level: float = 0.95, seed: int = 0, sigma: float = SIGMA) -> Comparison:
    """ΔCMMD of model B vs A on the same prompts and seeds (row i ↔ row i; groups leave both out)."""
    if len(fake_a) != len(fake_b):
        raise ValueError(f"paired sets must have equal sizes, got {len(fake_a)} and {len(fake_b)}")
    parts = groups(len(fake_a), n_groups, seed)
    kxx = kernel_sum(normalise(real), normalise(real), sigma) / len(real) ** 2
    return jackknife_comparison("cmmd", leave_group_out(real, fake_a, parts, sigma, kxx),
                                leave_group_out(real, fake_b, parts, sigma, kxx), parts, len(fake_a), level)
