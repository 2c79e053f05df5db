"""Confidence intervals: bootstrap over images, and Student-t across seeds."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from scipy import stats as sstats


def bootstrap_ci(n: int, statistic: Callable[[np.ndarray], float], resamples: int = 200,
                 level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile CI of ``statistic(indices)`` over resamples of ``range(n)`` with replacement."""
    rng = np.random.default_rng(seed)
    vals = np.array([statistic(rng.integers(0, n, n)) for _ in range(resamples)])
    lo, hi = np.percentile(vals, [50 * (1 - level), 50 * (1 + level)])
    return float(lo), float(hi)


def t_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """(mean, half-width) of the Student-t CI of the mean; half-width nan for < 2 values."""
    v = np.asarray(values, dtype=np.float64)
    mean = float(v.mean())
    if len(v) < 2:
        return mean, float("nan")
    half = float(sstats.t.ppf(0.5 + level / 2, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v)))
    return mean, half
