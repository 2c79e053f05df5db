"""Float64 sufficient statistics of feature sets, combined exactly across shards (pure numpy).

FID needs only the mean and covariance of the generated features. An evaluation split into
shards (over processes, nodes, or attempts of a preempted job) reduces each shard to
``Moments(n, mean, scatter)`` (scatter = Σ (f - mean)(f - mean)ᵀ) and combines them with Chan,
Golub & LeVeque's pairwise update, which is exact in real arithmetic and, unlike Σf / Σffᵀ taken
raw, loses no digits to cancellation when the mean is large against the spread.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from functools import reduce

import numpy as np

from toolkit.metrics.distances import trace_sqrt_product


@dataclass(frozen=True, eq=False)
class Moments:
    n: int
    mean: np.ndarray   # (d,)
    scatter: np.ndarray   # (d, d): Σ (f - mean)(f - mean)ᵀ

    @classmethod
    def of(cls, feats: np.ndarray) -> Moments:
        f = np.asarray(feats, dtype=np.float64)
        mean = f.mean(0)
        x = f - mean
        return cls(len(f), mean, x.T @ x)

    def __add__(self, other: Moments) -> Moments:
        n = self.n + other.n
        delta = other.mean - self.mean
        return Moments(n, self.mean + delta * (other.n / n),
                       self.scatter + other.scatter + np.outer(delta, delta) * (self.n * other.n / n))

    @property
    def cov(self) -> np.ndarray:
        """The unbiased covariance (``np.cov`` of the pooled features)."""
        return self.scatter / (self.n - 1)


def combine(parts: Iterable[Moments]) -> Moments:
    return reduce(Moments.__add__, parts)


def fid_from_moments(mu_ref: np.ndarray, sigma_ref: np.ndarray, fake: Moments,
                     sigma_ref_sqrt: np.ndarray | None = None) -> float:
    """FID of the generated set summarised by ``fake`` against reference statistics."""
    diff = mu_ref - fake.mean
    cov = fake.cov
    return float(diff @ diff + np.trace(sigma_ref) + np.trace(cov)
                 - 2 * trace_sqrt_product(sigma_ref, cov, sigma_ref_sqrt))
