"""FID and KID as pure functions of feature matrices (float64 numpy).

FID  = ||μ₁-μ₂||² + Tr(Σ₁ + Σ₂ - 2(Σ₁Σ₂)^½)                     (Heusel et al. 2017)
       Tr((Σ₁Σ₂)^½) is taken as Σ √λᵢ(Σ₁^½ Σ₂ Σ₁^½): Σ₁Σ₂ is similar to that symmetric PSD matrix,
       so a symmetric eigensolver gives it without scipy.linalg.sqrtm (whose ``disp`` argument is
       deprecated in SciPy 1.17 and removed in 1.18) and without its complex round-off.
KID  = unbiased MMD² with the kernel k(x, y) = (xᵀy/d + 1)³, averaged over random subsets
       (Bińkowski et al. 2018; same estimator as torch-fidelity / clean-fid).
"""

from __future__ import annotations

import numpy as np


def stats(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    f = np.asarray(feats, dtype=np.float64)
    return f.mean(0), np.cov(f, rowvar=False)


def psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    """Symmetric square root of a PSD matrix via eigh; round-off negative eigenvalues count as 0."""
    w, v = np.linalg.eigh(sigma)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray, sigma1_sqrt: np.ndarray | None = None) -> float:
    """Tr((Σ₁Σ₂)^½) = Σ √λᵢ(Σ₁^½ Σ₂ Σ₁^½); pass ``sigma1_sqrt`` when Σ₁ is reused (a fixed reference)."""
    r1 = psd_sqrt(sigma1) if sigma1_sqrt is None else sigma1_sqrt
    m = r1 @ sigma2 @ r1
    # Symmetrise: the product is symmetric in exact arithmetic, and eigvalsh reads one triangle only.
    lam = np.linalg.eigvalsh((m + m.T) / 2)
    return float(np.sqrt(np.clip(lam, 0, None)).sum())


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """The standard formula (as in pytorch-fid), with Tr((Σ₁Σ₂)^½) from a symmetric eigensolver.

    Equal to the scipy-sqrtm form to ~1e-12 relative on full-rank covariances (tested); on a
    rank-deficient Σ₂ (n < d) sqrtm's result is the less accurate of the two.
    """
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt_product(sigma1, sigma2))


def fid(real: np.ndarray, fake: np.ndarray) -> float:
    return frechet_distance(*stats(real), *stats(fake))


def fid_low_rank(mu1: np.ndarray, sigma1: np.ndarray, fake: np.ndarray) -> float:
    """FID against fixed reference stats, exact, in O(n²d) for n < d generated features.

    With Σ₂ = XᵀX/(n-1) (X centred), the non-zero eigenvalues of Σ₁Σ₂ are those of the n×n PSD
    matrix XΣ₁Xᵀ/(n-1), so Tr((Σ₁Σ₂)^½) = Σ √λᵢ. Used for bootstrap CIs, where sqrtm of a
    2048² matrix per resample would dominate the evaluation time.
    """
    f = np.asarray(fake, dtype=np.float64)
    mu2 = f.mean(0)
    x = f - mu2
    n = x.shape[0]
    small = x @ sigma1 @ x.T / (n - 1)
    lam = np.clip(np.linalg.eigvalsh(small), 0, None)
    diff = mu1 - mu2
    tr2 = float(np.einsum("ij,ij->", x, x)) / (n - 1)
    return float(diff @ diff + np.trace(sigma1) + tr2 - 2 * np.sqrt(lam).sum())


def poly_kernels(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """k(x,x), k(y,y), k(x,y) with k(a, b) = (aᵀb/d + 1)³."""
    d = x.shape[1]
    return tuple((a @ b.T / d + 1) ** 3 for a, b in ((x, x), (y, y), (x, y)))


def mmd2_from_kernels(kxx: np.ndarray, kyy: np.ndarray, kxy: np.ndarray) -> float:
    m, n = kxx.shape[0], kyy.shape[0]
    return float((kxx.sum() - np.trace(kxx)) / (m * (m - 1))
                 + (kyy.sum() - np.trace(kyy)) / (n * (n - 1)) - 2 * kxy.mean())


def mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    return mmd2_from_kernels(*poly_kernels(x, y))


def kid(real: np.ndarray, fake: np.ndarray, subsets: int = 100, subset_size: int = 1000,
        seed: int = 0) -> tuple[float, float]:
    """(mean, std) of the unbiased MMD² over ``subsets`` random subsets (without replacement)."""
    real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
    m = min(subset_size, len(real), len(fake))
    rng = np.random.default_rng(seed)
    vals = [mmd2_unbiased(real[rng.choice(len(real), m, replace=False)],
                          fake[rng.choice(len(fake), m, replace=False)]) for _ in range(subsets)]
    return float(np.mean(vals)), float(np.std(vals))
