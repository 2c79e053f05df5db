"""Confidence intervals and paired tests for FID, KID and CLIP score (pure numpy/scipy).

What is resampled, and what is estimated
----------------------------------------
The reference (real) features are held fixed: every FID/KID interval here is over the *generated
images* and conditional on the reference set, which is what a comparison against one shared
reference needs. The targets are

* FID: E[FID_N], the expected FID of N generated images against this reference, N = the number
  evaluated. FID's small-sample bias (≈ c/N, Chong & Forsyth 2020) is part of the target, so an
  interval says nothing about FID at another N; `fid_infinity` estimates the N → ∞ value.
* KID: E[MMD²ᵤ | reference], the unbiased polynomial-kernel MMD² (independent of N). The point
  estimate uses all real and generated features at once: the average of `distances.kid` over all
  possible subsets, so it has the same expectation and less variance, and equals `distances.kid`
  when both sets fit in one subset (≤ 1000 by default).
* CLIP score: the mean per-image score over the prompt/seed distribution (t-interval over images).

Method: grouped (delete-d) jackknife, interval = estimate ± t_{G-1}·se
----------------------------------------------------------------------
The generated images are split into G random groups (default 20; G = N gives delete-1). Each
replicate leaves one group out; se² = (G-1)/G · Σ_g (θ₋g - mean θ₋)². Why this one:

* Every replicate is made of distinct images, all of the same size N - N/G. The bootstrap with
  replacement duplicates images, which lowers the effective N of a resample and shifts FID (and
  puts duplicate pairs into KID's U-statistic), so its percentile interval is centred on another
  quantity: FID 237.4 with "CI" [240.1, 252.5] in the README's table.
* The interval is symmetric about the estimate, so it always contains it; t_{G-1} accounts for
  the G-1 degrees of freedom of se. G = 20 costs 20 recomputations and loses little to G = 50
  (t quantile 2.09 vs 2.01; coverage the same within simulation noise).
* Among resampling variance estimators without duplicates it over-counts the least: a degree-k
  component of the statistic's variance (Hoeffding/ANOVA decomposition) enters the delete-d
  jackknife k-fold as d/N → 0 (Efron–Stein), half-sampling 2ᵏ-1-fold, and m-out-of-n
  subsampling rescaled by √(m/N) (N/m)^{k-1}-fold on top of needing m and FID's bias at m.

Measured coverage of E[statistic at N] (tests/test_statistics.py, whose docstring lists each run;
Gaussian features with a 1/√i spectrum, fixed reference, G = 20, 300–400 trials, target from
1000–3000 independent draws): FID 96–97% and KID 95–97% when the generator differs visibly from
the reference (d = 64–256, N = 60–500); the CLIP t-interval 94.9%. It is conservative where the
first-order (linear) part of the statistic is small: near the null (generator = reference: FID
98.5%, KID 99.5%) and for FID with N ≪ d (d = 512, N = 250: 99.8%; ReLU-Gaussian d = 2048,
N = 250, outside the tests: 100% and 98.5% at FID 51 and 87, se² 2.8× and 1.4× the true
variance). There FID's fluctuation (sd 0.1–0.2 at FID 50–90) is dominated by high-order
interactions of the images, which every estimator above over-counts. An exact alternative for
KID, Hoeffding's unbiased variance of the U-statistic, was tried and rejected: its normal
interval under-covered (88–91% near the null, where the statistic is skewed). For comparisons
where power matters, `permutation_pvalue` has exact level.

Cost (one generated set, d = 2048): build a `Reference` once per reference set (one d×d eigh
for Σ₁^½ and an m²d kernel pass for KID). FID with N < d: the N×N Gram XΣ₁Xᵀ (N·d² + N²·d) and
G eigensolves of size N - N/G; with N ≥ d: one d×d scatter, G rank-(N/G) downdates and G
eigensolves of size d (the dominant cost: ~0.6 s each on 2 cores). KID: one N²d kernel pass.

Paired comparisons (same prompts and seeds: image i of A paired with image i of B)
----------------------------------------------------------------------------------
Δ = metric(B) - metric(A). `compare_paired` uses the same jackknife with pairs kept together (a
group leaves both models), so the images' shared prompt/seed variation cancels in se(Δ), and
p = 2·P(t_{G-1} > |Δ/se|): the interval excludes 0 exactly when p < 1 - level. CLIP uses the paired
t-test on per-image differences. `permutation_pvalue` is the assumption-light alternative: swap
A/B within random pairs and recompute Δ (exact level under "A and B are exchangeable"). Across
seeds, `compare_seeds` is the paired t-test on per-seed Δs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats as sstats

from toolkit.metrics.distances import psd_sqrt

_CHUNK = 1024  # rows per kernel block: 1024 × 5000 float64 = 40 MB


@dataclass(frozen=True)
class Interval:
    """A point estimate with a two-sided interval that contains it; ``method`` says over what."""

    estimate: float
    low: float
    high: float
    level: float
    method: str

    def to_dict(self, name: str) -> dict[str, float | str]:
        return {name: float(self.estimate), f"{name}_ci_low": float(self.low), f"{name}_ci_high": float(self.high),
                f"{name}_ci_method": self.method}


@dataclass(frozen=True, eq=False)
class Reference:
    """The fixed real side, computed once: μ, Σ, Σ^½ for FID; features and mean off-diagonal kernel for KID."""

    mu: np.ndarray
    sigma: np.ndarray
    sigma_sqrt: np.ndarray
    feats: np.ndarray
    kxx_mean: float

    @classmethod
    def from_features(cls, real: np.ndarray) -> Reference:
        """From the reference features (m × d, m ≥ 2): one d×d eigh and one m²d kernel pass."""
        x = np.asarray(real, dtype=np.float64)
        sigma = np.cov(x, rowvar=False)
        m = len(x)
        off = sum(float(_kernel(x[c], x).sum()) for c in _chunks(m)) - float(_kernel_diag(x).sum())
        return cls(x.mean(0), sigma, psd_sqrt(sigma), x, off / (m * (m - 1)))


def _chunks(n: int, size: int = _CHUNK) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def _kernel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """KID's kernel k(a, b) = (aᵀb/d + 1)³, as in `distances.poly_kernels`."""
    k = a @ b.T / a.shape[1] + 1
    return k * k * k  # numpy's ** 3 goes through pow(): ~40× slower than two multiplies


def _kernel_diag(a: np.ndarray) -> np.ndarray:
    k = np.einsum("ij,ij->i", a, a) / a.shape[1] + 1
    return k * k * k


def _kernel_times(y: np.ndarray, m: np.ndarray) -> np.ndarray:
    """K_yy @ m in row blocks, never holding the n×n kernel."""
    return np.concatenate([_kernel(y[c], y) @ m for c in _chunks(len(y))])


def _real_kernel_mean(ref: Reference, y: np.ndarray) -> np.ndarray:
    """For each generated feature, its mean kernel value against all real features."""
    return sum(_kernel(ref.feats[c], y).sum(0) for c in _chunks(len(ref.feats))) / len(ref.feats)


def _groups(n: int, groups: int, seed: int) -> list[np.ndarray]:
    if n < 2:
        raise ValueError(f"need at least 2 generated images, got {n}")
    # Random groups: image order may follow captions or classes; a random split keeps groups alike.
    return np.array_split(np.random.default_rng(seed).permutation(n), min(groups, n))


def _jackknife_se(replicates: np.ndarray) -> float:
    g = len(replicates)
    return float(np.sqrt((g - 1) / g * ((replicates - replicates.mean()) ** 2).sum()))


def _t_quantile(level: float, df: int) -> float:
    return float(sstats.t.ppf(0.5 + level / 2, df))


class _FidSubsets:
    """FID of subsets of one generated set against a fixed reference, sharing the O(n·d²) work.

    With z = Σ₁^½ x, Tr((Σ₁Σ_S)^½) = Σ √λ(cov(z_S)); cov(z_S) is d×d, and its non-zero eigenvalues
    are those of the centred n_S×n_S Gram of z_S, so each subset costs one eigensolve of size
    min(n_S, d) (the trick of `distances.fid_low_rank`).
    """

    def __init__(self, ref: Reference, fake: np.ndarray):
        f = np.asarray(fake, dtype=np.float64)
        mean = f.mean(0)
        self.x = f - mean  # centred on the whole set: keeps the scatter downdates well conditioned
        self.n, self.d = self.x.shape
        self.offset = mean - ref.mu
        self.sq = np.einsum("ij,ij->i", self.x, self.x)
        self.tr1 = float(np.trace(ref.sigma))
        self.ref = ref
        self._z = self._gram = self._scatter = None

    @property
    def z(self) -> np.ndarray:
        if self._z is None:
            self._z = self.x @ self.ref.sigma_sqrt
        return self._z

    @property
    def gram(self) -> np.ndarray:
        if self._gram is None:
            self._gram = self.z @ self.z.T
        return self._gram

    @property
    def scatter(self) -> np.ndarray:
        if self._scatter is None:
            self._scatter = self.z.T @ self.z
        return self._scatter

    def _value(self, xsum: np.ndarray, sqsum: float, n: int, lam: np.ndarray) -> float:
        diff = self.offset + xsum / n
        tr2 = (sqsum - xsum @ xsum / n) / (n - 1)
        return float(diff @ diff + self.tr1 + tr2 - 2 * np.sqrt(np.clip(lam / (n - 1), 0, None)).sum())

    def fid(self, idx: np.ndarray) -> float:
        n = len(idx)
        if n < self.d:
            g = self.gram[np.ix_(idx, idx)]
            r = g.mean(0)
            lam = np.linalg.eigvalsh(g - r[:, None] - r[None, :] + r.mean())  # H g H, H = centring
        else:
            z = self.z[idx]
            zs = z.sum(0)
            lam = np.linalg.eigvalsh(z.T @ z - np.outer(zs, zs) / n)
        return self._value(self.x[idx].sum(0), float(self.sq[idx].sum()), n, lam)

    def fid_without(self, out: np.ndarray) -> float:
        """FID of all rows but ``out``: a rank-|out| downdate of the full scatter when that leaves ≥ d rows."""
        n = self.n - len(out)
        if n < self.d:
            return self.fid(np.setdiff1d(np.arange(self.n), out))
        zo = self.z[out]
        zs = zo.sum(0)  # Σ over kept rows = -Σ over removed ones, since z is centred
        lam = np.linalg.eigvalsh(self.scatter - zo.T @ zo - np.outer(zs, zs) / n)
        return self._value(-self.x[out].sum(0), float(self.sq.sum() - self.sq[out].sum()), n, lam)


def _kid_leave_group_out(ref: Reference, fake: np.ndarray, groups: list[np.ndarray]) -> tuple[float, np.ndarray]:
    """Full-set MMD²ᵤ and its leave-one-group-out replicates, from one n²d kernel pass.

    With indicator matrix A (n×G): Σ_{i≠j∈S} k = vᵀKv - v·diag(K) for v = 1 - a_g, and vᵀKv needs
    only KA (n×G), so no n×n matrix is held.
    """
    y = np.asarray(fake, dtype=np.float64)
    n = len(y)
    a = np.zeros((n, len(groups)))
    for g, idx in enumerate(groups):
        a[idx, g] = 1.0
    ka = _kernel_times(y, a)
    k1 = ka.sum(1)
    diag, r = _kernel_diag(y), _real_kernel_mean(ref, y)
    kept = n - a.sum(0)
    quad = k1.sum() - 2 * (a.T @ k1) + np.einsum("ig,ig->g", a, ka)
    reps = ref.kxx_mean + (quad - (diag.sum() - a.T @ diag)) / (kept * (kept - 1)) - 2 * (r.sum() - a.T @ r) / kept
    full = ref.kxx_mean + (k1.sum() - diag.sum()) / (n * (n - 1)) - 2 * r.mean()
    return float(full), reps


def _method(groups: list[np.ndarray], n: int, paired: bool = False) -> str:
    what = "image pairs (A and B left out together)" if paired else "generated images"
    return (f"grouped jackknife over {what}: {len(groups)} random groups of ~{n / len(groups):.0f}, "
            f"reference fixed, estimate ± t_{len(groups) - 1}·se")


def fid_interval(ref: Reference, fake: np.ndarray, groups: int = 20, level: float = 0.95, seed: int = 0) -> Interval:
    """Interval for E[FID_N] over generated images (N = len(fake)), reference fixed.

    Args:
        ref: `Reference.from_features(real)`.
        fake: generated features (N × d).
        groups: jackknife groups G (capped at N; N gives delete-1).
        level: two-sided coverage.
        seed: seed of the random grouping.
    """
    parts = _groups(len(fake), groups, seed)
    eng = _FidSubsets(ref, fake)
    est = eng.fid_without(np.array([], dtype=int))
    half = _t_quantile(level, len(parts) - 1) * _jackknife_se(np.array([eng.fid_without(p) for p in parts]))
    return Interval(est, est - half, est + half, level, _method(parts, len(fake)))


def kid_interval(ref: Reference, fake: np.ndarray, groups: int = 20, level: float = 0.95, seed: int = 0) -> Interval:
    """Interval for E[MMD²ᵤ | reference] over generated images; the estimate uses all features at once.

    Args as `fid_interval`.
    """
    parts = _groups(len(fake), groups, seed)
    est, reps = _kid_leave_group_out(ref, fake, parts)
    half = _t_quantile(level, len(parts) - 1) * _jackknife_se(reps)
    return Interval(est, est - half, est + half, level, _method(parts, len(fake)))


def groups(n: int, groups: int = 20, seed: int = 0) -> list[np.ndarray]:
    """The jackknife's random groups of ``n`` generated images (as every interval here uses)."""
    return _groups(n, groups, seed)


def jackknife_interval(estimate: float, replicates: np.ndarray, parts: list[np.ndarray], n: int,
                       level: float = 0.95) -> Interval:
    """Estimate ± t_{G-1}·se from leave-one-group-out replicates (any statistic of the generated set)."""
    half = _t_quantile(level, len(parts) - 1) * _jackknife_se(np.asarray(replicates, np.float64))
    return Interval(estimate, estimate - half, estimate + half, level, _method(parts, n))


def jackknife_comparison(metric: str, a: tuple[float, np.ndarray], b: tuple[float, np.ndarray],
                         parts: list[np.ndarray], n: int, level: float = 0.95,
                         lower_is_better: bool | None = None) -> Comparison:
    """Paired Δ = B - A from (estimate, replicates) of each model over the *same* groups of pairs."""
    se = _jackknife_se(np.asarray(b[1], np.float64) - np.asarray(a[1], np.float64))
    return _comparison(metric, a[0], b[0], se, len(parts) - 1, level, _method(parts, n, paired=True),
                       lower_is_better)


def mean_interval(values: Sequence[float] | np.ndarray, level: float = 0.95) -> Interval:
    """Student-t interval for the mean of per-image values (CLIP score): mean over images ± t_{n-1}·s/√n."""
    v = np.asarray(values, dtype=np.float64)
    est = float(v.mean())
    half = _t_quantile(level, len(v) - 1) * float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else np.nan
    return Interval(est, est - half, est + half, level, f"Student t over {len(v)} images")


@dataclass(frozen=True)
class Comparison:
    """Δ = B - A for one metric, with an interval for E[Δ] and a two-sided p-value for Δ = 0."""

    metric: str
    a: float
    b: float
    delta: float
    low: float
    high: float
    p_value: float
    level: float
    lower_is_better: bool
    method: str

    def verdict(self, alpha: float = 0.05, names: tuple[str, str] = ("A", "B")) -> str:
        """'B better (p=0.003)', 'A better (p<0.001)' or 'no significant difference (p=0.41)' at level α."""
        p = "p<0.001" if self.p_value < 1e-3 else f"p={self.p_value:.2g}"
        if not self.p_value < alpha:  # also for a nan p (one seed, or zero variance)
            return f"no significant difference ({p})"
        b_better = (self.delta < 0) == self.lower_is_better
        return f"{names[1] if b_better else names[0]} better ({p})"

    def to_dict(self) -> dict[str, float | str | bool]:
        return asdict(self)


HIGHER_IS_BETTER = frozenset({"clip_score", "precision", "recall", "density", "coverage", "vendi",
                              "style_similarity", "preference", "lpips_diversity"})


def higher_is_better(metric: str) -> bool:
    """Direction of a metric by name or by its family in another feature space (``vendi_dinov2``)
    or prompt group (``clip_score_held_out``)."""
    return any(metric == h or metric.startswith(h + "_") for h in HIGHER_IS_BETTER)


def _comparison(metric: str, a: float, b: float, se: float, df: int, level: float, method: str,
                lower_is_better: bool | None = None) -> Comparison:
    delta = b - a
    half = _t_quantile(level, df) * se
    p = float(2 * sstats.t.sf(abs(delta) / se, df)) if se > 0 else (1.0 if delta == 0 else 0.0)
    lower = not higher_is_better(metric) if lower_is_better is None else lower_is_better
    return Comparison(metric, a, b, delta, delta - half, delta + half, p, level, lower, method)


def compare_paired(ref: Reference, fake_a: np.ndarray, fake_b: np.ndarray, clip_a: np.ndarray | None = None,
                   clip_b: np.ndarray | None = None, groups: int = 20, level: float = 0.95,
                   seed: int = 0) -> dict[str, Comparison]:
    """ΔFID, ΔKID (and ΔCLIP) of model B vs A evaluated on the same prompts and seeds (row i ↔ row i).

    Args:
        ref: the shared reference.
        fake_a, fake_b: generated features of A and B, paired by row.
        clip_a, clip_b: per-image CLIP scores, paired by row; ΔCLIP is skipped when either is None.
        groups, level, seed: as `fid_interval`; the same groups leave both models out.
    """
    n = len(fake_a)
    if len(fake_b) != n:
        raise ValueError(f"paired sets must have equal sizes, got {n} and {len(fake_b)}")
    parts = _groups(n, groups, seed)
    df, method = len(parts) - 1, _method(parts, n, paired=True)
    ea, eb = _FidSubsets(ref, fake_a), _FidSubsets(ref, fake_b)
    none = np.array([], dtype=int)
    reps = np.array([eb.fid_without(p) - ea.fid_without(p) for p in parts])
    out = {"fid": _comparison("fid", ea.fid_without(none), eb.fid_without(none), _jackknife_se(reps), df, level,
                              method)}
    (ka, ra), (kb, rb) = _kid_leave_group_out(ref, fake_a, parts), _kid_leave_group_out(ref, fake_b, parts)
    out["kid"] = _comparison("kid", ka, kb, _jackknife_se(rb - ra), df, level, method)
    if clip_a is not None and clip_b is not None:
        out["clip_score"] = compare_means("clip_score", clip_a, clip_b, level)
    return out


def compare_means(metric: str, a: np.ndarray, b: np.ndarray, level: float = 0.95) -> Comparison:
    """Δ of the means of a per-image score (CLIP score, style similarity), paired row by row:
    the paired Student t over the per-image differences."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if len(a) != len(b):
        raise ValueError(f"paired sets must have equal sizes, got {len(a)} and {len(b)}")
    n, d = len(a), b - a
    return _comparison(metric, float(a.mean()), float(b.mean()), float(d.std(ddof=1) / np.sqrt(n)), n - 1, level,
                       f"paired Student t over {n} per-image differences")


def compare_seeds(a_per_seed: Sequence[float], b_per_seed: Sequence[float], metric: str,
                  level: float = 0.95, lower_is_better: bool | None = None) -> Comparison:
    """Paired t-test across seeds: one value per seed for A and for B (same seed ↔ same prompts/noise).

    The interval is for the mean over seeds of Δ = B - A (df = seeds - 1); nan with one seed.

    Args:
        metric: its name; sets the direction unless ``lower_is_better`` is given (names in
            `HIGHER_IS_BETTER` count as higher-is-better, any other as lower-is-better).
    """
    a, b = np.asarray(a_per_seed, np.float64), np.asarray(b_per_seed, np.float64)
    if len(a) != len(b):
        raise ValueError(f"need one value per seed for both models, got {len(a)} and {len(b)}")
    method = f"paired Student t over {len(a)} seeds"
    if len(a) < 2:
        lower = not higher_is_better(metric) if lower_is_better is None else lower_is_better
        return Comparison(metric, float(a.mean()), float(b.mean()), float((b - a).mean()), np.nan, np.nan, np.nan,
                          level, lower, method)
    d = b - a
    return _comparison(metric, float(a.mean()), float(b.mean()), float(d.std(ddof=1) / np.sqrt(len(d))),
                       len(d) - 1, level, method, lower_is_better)


def permutation_pvalue(metric: str, a: np.ndarray, b: np.ndarray, ref: Reference | None = None,
                       permutations: int = 999, seed: int = 0) -> float:
    """Two-sided paired permutation p-value of Δ = metric(B) - metric(A): swap A/B within random pairs.

    Exact level under the null "A and B are exchangeable within each pair" (Monte Carlo, with the
    observed labelling counted once: p ≥ 1/(permutations+1)). Both relabelled sets keep N images,
    so FID's bias is the same on both sides.

    Args:
        metric: "fid" or "kid" (a, b are features; ref required) or "clip_score" (a, b per-image scores).
        permutations: random relabellings. Cost per relabelling: FID two eigensolves of size min(N, d)
            (plus N·d² when N ≥ d); KID (2N)² per relabelling after one (2N)²d kernel pass; CLIP O(N).
        seed: seed of the relabellings.
    """
    if metric != "clip_score" and ref is None:
        raise ValueError(f"{metric} needs the reference")
    n = len(a)
    swap = np.random.default_rng(seed).random((permutations, n)) < 0.5
    swap = np.vstack([np.zeros((1, n), bool), swap])  # row 0: the observed labelling
    if metric == "clip_score":
        d = np.asarray(b, np.float64) - np.asarray(a, np.float64)
        t = np.where(swap, -d, d).mean(1)
    elif metric == "fid":
        eng = _FidSubsets(ref, np.concatenate([a, b]))
        i = np.arange(n)
        t = np.array([eng.fid(np.where(s, i, i + n)) - eng.fid(np.where(s, i + n, i)) for s in swap])
    elif metric == "kid":
        t = _kid_permutation_deltas(ref, np.concatenate([a, b]).astype(np.float64), swap)
    else:
        raise ValueError(f"unknown metric {metric!r}")
    # Relative tolerance: relabellings equal to the observed one must count as "at least as extreme".
    return float((np.abs(t) >= np.abs(t[0]) * (1 - 1e-9)).sum() / len(t))


def _kid_permutation_deltas(ref: Reference, y: np.ndarray, swap: np.ndarray) -> np.ndarray:
    """MMD²ᵤ(B') - MMD²ᵤ(A') for each relabelling, from K @ (indicator matrix) in row blocks."""
    n = len(y) // 2
    ind_a = np.concatenate([~swap, swap], axis=1).T.astype(np.float64)  # (2n × R): rows of A'
    diag, r = _kernel_diag(y), _real_kernel_mean(ref, y)
    out = []
    for c in _chunks(ind_a.shape[1]):  # relabellings in batches bound the (2n × batch) products
        v = ind_a[:, c]
        kv = _kernel_times(y, np.hstack([np.ones((2 * n, 1)), v]))  # column 0: K·1, for the complements
        k1, quad_a = kv[:, 0], np.einsum("ir,ir->r", v, kv[:, 1:])
        quad_b = k1.sum() - 2 * k1 @ v + quad_a  # B' is the complement of A'
        diag_a, r_a = diag @ v, r @ v
        mmd_a = (quad_a - diag_a) / (n * (n - 1)) - 2 * r_a / n
        mmd_b = (quad_b - (diag.sum() - diag_a)) / (n * (n - 1)) - 2 * (r.sum() - r_a) / n
        out.append(mmd_b - mmd_a)  # the real-real term cancels
    return np.concatenate(out)


@dataclass(frozen=True)
class FidInfinity:
    """FID∞ = intercept of the least-squares line FID_N = FID∞ + slope/N through (N_i, FID_{N_i})."""

    fid_inf: float
    slope: float
    sizes: tuple[int, ...]
    fids: tuple[float, ...]

    def to_dict(self) -> dict[str, float | list]:
        return {"fid_inf": self.fid_inf, "fid_inf_slope": self.slope, "fid_inf_sizes": list(self.sizes),
                "fid_inf_fids": list(self.fids)}


def fid_infinity(ref: Reference, fake: np.ndarray, sizes: Sequence[int] | None = None, points: int = 15,
                 min_fraction: float = 0.2, seed: int = 0) -> FidInfinity:
    """FID∞ of Chong & Forsyth (2020): FID of random subsets (without replacement) at sizes N_i, fit
    linearly in 1/N, extrapolated to 1/N = 0.

    Args:
        sizes: subset sizes; default ``points`` sizes evenly spaced from ``min_fraction``·N to N (the
            paper spaces 15 sizes from 5k to 50k, a fraction of 0.1; the 1/N law is asymptotic, so the
            default stays at larger subsets).
        seed: seed of the subsets.
    """
    n = len(fake)
    if sizes is None:
        sizes = np.unique(np.linspace(max(int(min_fraction * n), 2), n, points).astype(int))
    rng = np.random.default_rng(seed)
    eng = _FidSubsets(ref, fake)
    fids = [eng.fid(rng.choice(n, int(s), replace=False)) for s in sizes]
    slope, intercept = np.polyfit(1.0 / np.asarray(sizes, np.float64), fids, 1)
    return FidInfinity(float(intercept), float(slope), tuple(int(s) for s in sizes), tuple(float(f) for f in fids))


def pareto_front(fid: Sequence[float], clip: Sequence[float]) -> np.ndarray:
    """Indices of the points no other point dominates (FID ≤ and CLIP ≥, one strictly), by ascending FID.

    Points with a nan coordinate are never on the front; identical points are both kept.
    """
    f, c = np.asarray(fid, np.float64), np.asarray(clip, np.float64)
    ok = np.isfinite(f) & np.isfinite(c)
    dominated = ((f[None, :] <= f[:, None]) & (c[None, :] >= c[:, None])
                 & ((f[None, :] < f[:, None]) | (c[None, :] > c[:, None]))).any(1)
    idx = np.flatnonzero(ok & ~dominated)
    return idx[np.argsort(f[idx], kind="stable")]
