"""FID, KID and CLIP score with 95% bootstrap CIs over generated images."""

from __future__ import annotations

import numpy as np

from toolkit.metrics import distances
from toolkit.metrics.bootstrap import bootstrap_ci


def compute_scores(real: np.ndarray, fake: np.ndarray, clip: np.ndarray | None, resamples: int = 200,
                   kid_subsets: int = 100, kid_subset_size: int = 1000, seed: int = 0) -> dict[str, float]:
    """Args:
        real, fake: Inception features (n × 2048) of reference and generated images.
        clip: per-generated-image CLIP scores, or None when CLIP is unavailable.
        resamples: bootstrap resamples of the generated set (0 disables the CIs).
        kid_subsets, kid_subset_size: KID estimator settings.
        seed: seed of the KID subsets and the bootstrap.
    """
    mu_r, sig_r = distances.stats(real)
    out: dict[str, float] = {"n_real": len(real), "n_fake": len(fake)}
    # For n_fake < d the low-rank form is exact (tested equal to sqrtm) and avoids a 2048² sqrtm.
    low_rank = len(fake) < real.shape[1]
    out["fid"] = (distances.fid_low_rank(mu_r, sig_r, fake) if low_rank
                  else distances.frechet_distance(mu_r, sig_r, *distances.stats(fake)))
    out["kid"], out["kid_std"] = distances.kid(real, fake, kid_subsets, kid_subset_size, seed)
    if clip is not None:
        out["clip_score"] = float(np.mean(clip))
    if resamples > 0:
        fid_stat = (lambda idx: distances.fid_low_rank(mu_r, sig_r, fake[idx])) if low_rank \
            else (lambda idx: distances.frechet_distance(mu_r, sig_r, *distances.stats(fake[idx])))
        out["fid_ci_low"], out["fid_ci_high"] = bootstrap_ci(len(fake), fid_stat, resamples, seed=seed)
        # KID resamples reuse kernel matrices computed once: each resample only indexes them.
        kxx, kyy, kxy = distances.poly_kernels(real, fake)
        kid_stat = lambda idx: distances.mmd2_from_kernels(kxx, kyy[np.ix_(idx, idx)], kxy[:, idx])
        out["kid_ci_low"], out["kid_ci_high"] = bootstrap_ci(len(fake), kid_stat, resamples, seed=seed)
        if clip is not None:
            out["clip_ci_low"], out["clip_ci_high"] = bootstrap_ci(
                len(clip), lambda idx: float(np.mean(clip[idx])), resamples, seed=seed)
    return out
