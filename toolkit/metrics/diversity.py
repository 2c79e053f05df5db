"""The Vendi score (Friedman & Dieng, 2023, "The Vendi Score: A Diversity Evaluation Metric for
Machine Learning"): exp of the entropy of the eigenvalues of K/n, K the similarity matrix of n
samples — the effective number of distinct samples (n identical → 1, n orthogonal → n). Here, as
in dgm-eval and the ``vendi-score`` package's ``score_X``: the linear kernel on L2-normalised
features, K = XXᵀ, whose non-zero eigenvalues are those of the d×d XᵀX (the package's
``score_dual``): each costs one eigensolve of size min(n, d).

Interval: the grouped jackknife over generated images (``toolkit.metrics.intervals``); leaving a
group out downdates XᵀX (d ≤ n) or drops its rows and columns of XXᵀ (n < d).
"""

from __future__ import annotations

import numpy as np

from toolkit.metrics.intervals import Comparison, Interval, groups, jackknife_comparison, jackknife_interval


def entropy(p: np.ndarray, q: float = 1.0) -> float:
    """Rényi entropy of order q of a distribution (q = 1: Shannon; q = inf: min-entropy)."""
    p = p[p > 0]
    if q == 1:
        return float(-(p * np.log(p)).sum())
    if np.isinf(q):
        return float(-np.log(p.max()))
    return float(np.log((p**q).sum()) / (1 - q))


def _score(gram: np.ndarray, n: int, q: float) -> float:
    w = np.linalg.eigvalsh(gram / n)
    return float(np.exp(entropy(np.clip(w, 0, None), q)))


def vendi(features: np.ndarray, q: float = 1.0) -> float:
    """The Vendi score of ``features`` (n × d), linear kernel on L2-normalised rows."""
    x = np.asarray(features, np.float64)
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    return _score(x.T @ x if x.shape[1] <= len(x) else x @ x.T, len(x), q)


def leave_group_out(features: np.ndarray, parts: list[np.ndarray], q: float = 1.0) -> tuple[float, np.ndarray]:
    """Vendi of all generated features and of each group left out."""
    x = np.asarray(features, np.float64)
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    n = len(x)
    if x.shape[1] <= n:
        s = x.T @ x
        reps = [_score(s - x[p].T @ x[p], n - len(p), q) for p in parts]
        return _score(s, n, q), np.array(reps)
    k = x @ x.T
    keep = [np.setdiff1d(np.arange(n), p) for p in parts]
    return _score(k, n, q), np.array([_score(k[np.ix_(r, r)], len(r), q) for r in keep])


def vendi_interval(features: np.ndarray, n_groups: int = 20, level: float = 0.95, seed: int = 0,
                   q: float = 1.0) -> Interval:
    parts = groups(len(features), n_groups, seed)
    est, reps = leave_group_out(features, parts, q)
    return jackknife_interval(est, reps, parts, len(features), level)


def compare_vendi(features_a: np.ndarray, features_b: np.ndarray, n_groups: int = 20, level: float = 0.95,
                  seed: int = 0, q: float = 1.0) -> Comparison:
    """ΔVendi of B vs A on the same prompts and seeds (higher is more diverse)."""
    if len(features_a) != len(features_b):
        raise ValueError(f"paired sets must have equal sizes, got {len(features_a)} and {len(features_b)}")
    parts = groups(len(features_a), n_groups, seed)
    return jackknife_comparison("vendi", leave_group_out(features_a, parts, q), leave_group_out(features_b, parts, q),
                                parts, len(features_a), level)
