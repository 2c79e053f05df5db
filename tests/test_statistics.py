"""Intervals proven by simulation, paired tests, FID∞, precision/recall/density/coverage, sqrtm-free FID.

Coverage is measured against E[statistic at N] conditional on a fixed reference set, the
expectation itself estimated from 1000–3000 independent generated sets. Synthetic features:
Gaussian, covariance spectrum ∝ 1/√i (like Inception pool3), the generated distribution shifted
and rescaled away from the reference (a model that is not perfect). Figures as last measured
(95% intervals, jackknife G = 20):

    FID  d=64  N=200   96.8% (400 trials)     KID  d=64  N=200   96.2% (400)
    FID  d=128 N=60    96.0% (300)            KID  d=256 N=100   97.0% (300)
    CLIP mean  N=80    94.9% (1000)
    paired Δ under the null, N=200: ΔFID 98.0%, ΔKID 98.5%, ΔCLIP 94.5% (200 trials);
    power at a real shift (B's mean 25% closer to the reference): 100% for all three (60 trials)
  -m slow (400 trials, 3000 draws):
    FID  d=256 N=200   96.8%    FID d=64 N=500  96.2%    KID d=256 N=500  95.2%
    near the null: FID d=64 N=200 98.5%, KID 99.5%; FID with N ≪ d (d=512, N=250) 99.8%

Run the bigger simulation with ``pytest -m slow tests/test_statistics.py``.
"""

from __future__ import annotations

import contextlib
import ctypes
import json

import numpy as np
import pytest
from scipy import linalg
from scipy import stats as sstats
from scipy.spatial.distance import cdist

from tests.conftest import run_oracle
from toolkit.metrics import distances
from toolkit.metrics.fidelity import density_coverage, prdc, precision_recall
from toolkit.metrics.intervals import (
    Comparison,
    Reference,
    _FidSubsets,
    _groups,
    _kid_leave_group_out,
    _kid_permutation_deltas,
    compare_paired,
    compare_seeds,
    fid_infinity,
    fid_interval,
    kid_interval,
    mean_interval,
    pareto_front,
    permutation_pvalue,
)


def _openblas_thread_control():
    """(get, set) of the thread count of the OpenBLAS that numpy loaded, or None where there is none."""
    names = [("scipy_openblas_get_num_threads64_", "scipy_openblas_set_num_threads64_"),
             ("openblas_get_num_threads64_", "openblas_set_num_threads64_"),
             ("openblas_get_num_threads", "openblas_set_num_threads")]
    try:
        with open("/proc/self/maps") as maps:
            paths = sorted({line.split()[-1] for line in maps if "openblas" in line.lower() and ".so" in line})
    except OSError:
        return None
    for path in paths:
        lib = ctypes.CDLL(path)  # already loaded: this only returns its handle
        for get, set_ in names:
            if hasattr(lib, set_):
                return getattr(lib, get), getattr(lib, set_)
    return None


@contextlib.contextmanager
def one_blas_thread():
    """The simulations run thousands of eigensolves of ≤ 256² matrices, where OpenBLAS threads only
    synchronise: on the shared 2-core machine a 200² eigvalsh took 40 ms with 2 threads and 2 ms with 1."""
    control = _openblas_thread_control()
    if control is None:
        yield
        return
    before = control[0]()
    control[1](1)
    try:
        yield
    finally:
        control[1](before)


class World:
    """A fixed reference set and a generator whose features differ from it in mean and covariance."""

    def __init__(self, d: int, shift: float = 1.0, spread: float = 0.9, m: int = 1000, seed: int = 0):
        rng = np.random.default_rng(seed)
        spec = 1.0 / np.sqrt(np.arange(1, d + 1))
        q, _ = np.linalg.qr(rng.normal(size=(d, d)))
        self.a_real = q * np.sqrt(spec)
        self.a_fake = q * np.sqrt(spec * rng.uniform(1 - spread, 1 + spread, d))
        self.mu_fake = shift * rng.normal(size=d) / np.sqrt(d)
        self.real = rng.normal(size=(m, d)) @ self.a_real.T
        self.ref = Reference.from_features(self.real)
        self.kxx = distances.poly_kernels(self.real, self.real[:1])[0]  # fixed, so computed once
        self.d = d

    def fake(self, rng: np.random.Generator, n: int, towards_real: float = 0.0) -> np.ndarray:
        return self.paired(rng, n, 0.0, towards_real)[1]

    def paired(self, rng, n: int, rho: float, towards_real: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
        """Models A and B on the same prompts/seeds: latent correlation ρ per pair; B's mean moved
        ``towards_real`` of the way to the reference mean (0: A and B identically distributed)."""
        u = rng.normal(size=(n, self.d))
        a = np.sqrt(rho) * u + np.sqrt(1 - rho) * rng.normal(size=(n, self.d))
        b = np.sqrt(rho) * u + np.sqrt(1 - rho) * rng.normal(size=(n, self.d))
        return self.mu_fake + a @ self.a_fake.T, (1 - towards_real) * self.mu_fake + b @ self.a_fake.T


def point_fid(world: World, fake: np.ndarray) -> float:
    if len(fake) < world.d:  # exact there (tested equal to the full formula), and O(n²d) instead of O(d³)
        return distances.fid_low_rank(world.ref.mu, world.ref.sigma, fake)
    return distances.frechet_distance(world.ref.mu, world.ref.sigma, *distances.stats(fake))


def point_kid(world: World, fake: np.ndarray) -> float:
    """`distances.mmd2_unbiased(world.real, fake)` with the fixed real-real kernel computed once."""
    def kern(a, b):  # (aᵀb/d + 1)³; two multiplies, as numpy's ** 3 goes through the slow pow()
        k = a @ b.T / a.shape[1] + 1
        return k * k * k

    return distances.mmd2_from_kernels(world.kxx, kern(fake, fake), kern(world.real, fake))


def coverage(interval_fn, value_fn, draw, trials: int, draws: int, seed: int) -> tuple[float, float, list[str]]:
    """(coverage of E[value at N], that expectation, problems) over ``trials`` fresh generated sets."""
    rng = np.random.default_rng(seed)
    target = float(np.mean([value_fn(draw(rng)) for _ in range(draws)]))
    hits, problems = 0, []
    for _ in range(trials):
        f = draw(rng)
        iv = interval_fn(f)
        hits += iv.low <= target <= iv.high
        if not iv.low <= iv.estimate <= iv.high:
            problems.append(f"estimate {iv.estimate} outside [{iv.low}, {iv.high}]")
        if len(problems) < 3 and not np.isclose(iv.estimate, value_fn(f), rtol=1e-6, atol=1e-12):
            problems.append(f"estimate {iv.estimate} != independent value {value_fn(f)}")
    return hits / trials, target, problems


# --- distances: FID without sqrtm ---------------------------------------------------------------------

@pytest.mark.skipif(not hasattr(linalg, "sqrtm"), reason="scipy.linalg.sqrtm is gone from this SciPy")
@pytest.mark.parametrize(("d", "n"), [(16, 100), (64, 300), (128, 400)])
def test_fid_equals_sqrtm_formula(d, n):
    rng = np.random.default_rng(d)
    a = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) / np.sqrt(d)
    b = rng.normal(0.3, 1.2, size=(n + 7, d)) ** 2  # skewed, non-negative like pool3 features
    (mu1, s1), (mu2, s2) = distances.stats(a), distances.stats(b)
    covmean = linalg.sqrtm(s1 @ s2).real  # the pytorch-fid formula this replaces
    old = float((mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))
    assert distances.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(old, rel=1e-6)


@pytest.mark.parametrize(("d", "n"), [(64, 300), (256, 400)])
def test_fid_and_kid_equal_torch_fidelity(d, n, oracles, tmp_path):
    """The oracle that stays when SciPy drops sqrtm: torch-fidelity's pure functions (FID through
    eigenvalues of Σ₁Σ₂, KID as one subset of the whole sets) against the numbers a cell reports."""
    rng = np.random.default_rng(d)
    real = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) / np.sqrt(d)
    fake = rng.normal(0.3, 1.2, size=(n, d)) ** 2   # skewed, non-negative like pool3 features
    np.save(tmp_path / "a.npy", real)
    np.save(tmp_path / "b.npy", fake)
    run_oracle(oracles, "fidelity", tmp_path / "a.npy", tmp_path / "b.npy", tmp_path / "out.json")
    oracle = json.loads((tmp_path / "out.json").read_text())
    ref = Reference.from_features(real)
    assert fid_interval(ref, fake, groups=5).estimate == pytest.approx(oracle["fid"], rel=1e-6)
    assert kid_interval(ref, fake, groups=5).estimate == pytest.approx(oracle["kid"], rel=1e-6)
    assert oracle["fid"] > 1 and oracle["kid"] > 1e-3


def test_fid_needs_no_sqrtm(monkeypatch):
    monkeypatch.delattr(linalg, "sqrtm", raising=False)  # guards against sqrtm creeping back in
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(200, 32)), rng.normal(0.2, 1.1, size=(150, 32))
    assert distances.fid(a, b) > 0 and abs(distances.fid(a, a)) < 1e-9


@pytest.mark.parametrize(("d", "n"), [(16, 120), (32, 34), (64, 40)])  # n ≥ d, n - n/G < d ≤ n, n < d
def test_leave_group_out_replicates_equal_direct_recomputation(d, n):
    world = World(d, m=200)
    fake = world.fake(np.random.default_rng(d), n)
    groups = _groups(n, 8, seed=0)
    eng = _FidSubsets(world.ref, fake)
    kid_full, kid_reps = _kid_leave_group_out(world.ref, fake, groups)
    assert eng.fid_without(np.array([], dtype=int)) == pytest.approx(point_fid(world, fake), rel=1e-9)
    assert kid_full == pytest.approx(point_kid(world, fake), rel=1e-9)
    for g, out in enumerate(groups):
        rest = np.delete(fake, out, axis=0)
        assert eng.fid_without(out) == pytest.approx(point_fid(world, rest), rel=1e-7)
        assert kid_reps[g] == pytest.approx(point_kid(world, rest), rel=1e-9)


# --- interval coverage ---------------------------------------------------------------------------------

# (d, n): n > d takes the d×d scatter-downdate path, n < d the n×n Gram path (the realistic one: a few
# hundred images of 2048-d features).
@pytest.mark.parametrize(("d", "n", "trials", "draws"), [(64, 200, 400, 2000), (128, 60, 300, 1000)])
def test_fid_interval_covers_expected_fid_at_n(d, n, trials, draws):
    world = World(d)
    with one_blas_thread():
        cov, target, problems = coverage(lambda f: fid_interval(world.ref, f), lambda f: point_fid(world, f),
                                         lambda r: world.fake(r, n), trials, draws, 1)
    msg = f"FID d={d} n={n} G=20: coverage {cov:.1%} of E[FID_N]={target:.3f} over {trials} trials"
    print(msg)
    assert not problems, problems[:3]
    assert 0.90 <= cov <= 0.99, msg


@pytest.mark.parametrize(("d", "n", "trials"), [(64, 200, 400), (256, 100, 300)])
def test_kid_interval_covers_expected_kid(d, n, trials):
    world = World(d)
    with one_blas_thread():
        cov, target, problems = coverage(lambda f: kid_interval(world.ref, f), lambda f: point_kid(world, f),
                                         lambda r: world.fake(r, n), trials, 1000, 2)
    msg = f"KID d={d} n={n} G=20: coverage {cov:.1%} of E[KID]={target:.5f} over {trials} trials"
    print(msg)
    assert not problems, problems[:3]
    assert 0.90 <= cov <= 0.99, msg


def test_clip_mean_interval_covers_the_mean():
    rng = np.random.default_rng(3)
    scale, a, b, n, trials = 40.0, 2.0, 5.0, 80, 1000  # skewed per-image scores, mean 40·2/7
    draws = scale * rng.beta(a, b, size=(trials, n))
    ivs = [mean_interval(v) for v in draws]
    cov = np.mean([iv.low <= scale * a / (a + b) <= iv.high for iv in ivs])
    msg = f"CLIP mean n={n}: coverage {cov:.1%} over {trials} trials"
    print(msg)
    assert all(iv.low < iv.estimate < iv.high for iv in ivs)
    assert ivs[0].estimate == pytest.approx(draws[0].mean())
    assert 0.92 <= cov <= 0.98, msg


# --- paired comparisons --------------------------------------------------------------------------------

def _paired_trials(world, n, rho, towards_real, trials, seed, groups=20):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(trials):
        fa, fb = world.paired(rng, n, rho, towards_real)
        shared = rng.normal(size=n)  # prompt difficulty: shared by both models' images of a pair
        ca = 30 + 3 * shared + rng.normal(size=n)
        cb = 30 + 3 * shared + rng.normal(size=n) + 0.6 * (towards_real > 0)
        out.append(compare_paired(world.ref, fa, fb, ca, cb, groups=groups, seed=int(rng.integers(1 << 30))))
    return out


def test_paired_difference_null_coverage_and_power():
    world, n, rho = World(64), 200, 0.6
    with one_blas_thread():
        null = _paired_trials(world, n, rho, 0.0, 200, 4)
        alt = _paired_trials(world, n, rho, 0.25, 60, 5)
    figures = []
    for metric in ("fid", "kid", "clip_score"):
        # Under the null A and B are identically distributed, so E[Δ] = 0 exactly at every N.
        cov = np.mean([c[metric].low <= 0 <= c[metric].high for c in null])
        power = np.mean([c[metric].verdict().startswith("B better") for c in alt])
        figures.append(f"Δ{metric}: null coverage {cov:.1%} (200 trials), power {power:.0%} (60 trials)")
        assert all(c[metric].low <= c[metric].delta <= c[metric].high for c in null + alt)
        # p < 0.05 exactly when the 95% interval excludes 0: the verdict never contradicts the interval.
        assert all((c[metric].p_value < 0.05) == (not c[metric].low <= 0 <= c[metric].high) for c in null + alt)
        assert 0.90 <= cov <= 0.99 and power >= 0.8, figures
    print("\n".join(figures))


def test_paired_fid_delta_matches_independent_values():
    world = World(32, m=300)
    fa, fb = world.paired(np.random.default_rng(6), 80, 0.5, 0.3)
    c = compare_paired(world.ref, fa, fb)
    assert c["fid"].a == pytest.approx(point_fid(world, fa), rel=1e-9)
    assert c["fid"].delta == pytest.approx(point_fid(world, fb) - point_fid(world, fa), rel=1e-9)
    assert c["kid"].delta == pytest.approx(point_kid(world, fb) - point_kid(world, fa), rel=1e-9)
    assert "clip_score" not in c
    with pytest.raises(ValueError, match="equal sizes"):
        compare_paired(world.ref, fa, fb[:-1])


def test_kid_permutation_deltas_equal_direct_recomputation():
    world = World(16, m=120)
    rng = np.random.default_rng(7)
    fa, fb = world.paired(rng, 30, 0.5, 0.2)
    swap = rng.random((5, 30)) < 0.5
    got = _kid_permutation_deltas(world.ref, np.concatenate([fa, fb]), swap)
    for s, g in zip(swap, got):
        a2, b2 = np.where(s[:, None], fb, fa), np.where(s[:, None], fa, fb)
        assert g == pytest.approx(point_kid(world, b2) - point_kid(world, a2), rel=1e-9)


def test_permutation_test_level_and_power():
    world, n = World(32, m=500), 60
    rng = np.random.default_rng(8)
    rejections = {"clip_score": [], "kid": [], "fid": []}
    with one_blas_thread():
        for t in range(100):
            fa, fb = world.paired(rng, n, 0.5)
            ca, cb = rng.normal(size=n), rng.normal(size=n)
            rejections["clip_score"].append(permutation_pvalue("clip_score", ca, cb, permutations=199, seed=t) < 0.05)
            rejections["kid"].append(permutation_pvalue("kid", fa, fb, world.ref, permutations=199, seed=t) < 0.05)
            if t < 30:  # FID relabellings cost two eigensolves each
                rejections["fid"].append(permutation_pvalue("fid", fa, fb, world.ref, permutations=99, seed=t) < 0.05)
        fa, fb = world.paired(rng, n, 0.5, 0.5)
        p_alt = {m: permutation_pvalue(m, fa, fb, world.ref, permutations=199) for m in ("fid", "kid")}
    rates = {m: float(np.mean(r)) for m, r in rejections.items()}
    print(f"permutation test, rejection rate at α=0.05 under the null: {rates} (100, 100, 30 trials)")
    assert rates["clip_score"] <= 0.1 and rates["kid"] <= 0.1 and rates["fid"] <= 0.15, rates
    assert max(p_alt.values()) == pytest.approx(1 / 200), p_alt  # the observed split is the most extreme
    with pytest.raises(ValueError, match="needs the reference"):
        permutation_pvalue("fid", fa, fb)


def test_compare_seeds_is_the_paired_t_test():
    a, b = [40.1, 38.7, 41.0, 39.5], [37.2, 36.9, 38.8, 36.1]
    c = compare_seeds(a, b, "fid")
    ref = sstats.ttest_rel(b, a)
    assert c.p_value == pytest.approx(ref.pvalue, rel=1e-9) and c.delta == pytest.approx(np.mean(b) - np.mean(a))
    lo, hi = ref.confidence_interval(0.95)
    assert (c.low, c.high) == (pytest.approx(lo), pytest.approx(hi))
    assert c.verdict() == f"B better (p={ref.pvalue:.2g})"
    assert c.verdict(names=("base", "lora")) .startswith("lora better")
    one = compare_seeds([40.0], [38.0], "fid")
    assert np.isnan(one.p_value) and one.verdict() == "no significant difference (p=nan)"


def test_verdict_wording_and_direction():
    kw = {"low": 0.0, "high": 0.0, "level": 0.95, "method": "test"}
    assert Comparison("fid", 10, 8, -2, p_value=0.003, lower_is_better=True, **kw).verdict() == "B better (p=0.003)"
    assert Comparison("clip_score", 30, 29, -1, p_value=1e-6, lower_is_better=False, **kw).verdict() \
        == "A better (p<0.001)"
    assert Comparison("kid", 1, 1.1, 0.1, p_value=0.41, lower_is_better=True, **kw).verdict() \
        == "no significant difference (p=0.41)"


# --- FID∞ and the Pareto front --------------------------------------------------------------------------

def test_fid_infinity_is_closer_to_the_large_n_value():
    world, n = World(64, m=2000), 500
    truth = distances.frechet_distance(world.ref.mu, world.ref.sigma, world.mu_fake, world.a_fake @ world.a_fake.T)
    rng = np.random.default_rng(9)
    for seed in range(5):
        fake = world.fake(rng, n)
        res = fid_infinity(world.ref, fake, seed=seed)
        assert res.fids[-1] == pytest.approx(point_fid(world, fake), rel=1e-9) and res.sizes[-1] == n
        assert res.sizes[0] == n // 5 and len(res.sizes) == 15
        slope, intercept = np.polyfit(1 / np.array(res.sizes), res.fids, 1)
        assert (res.fid_inf, res.slope) == (pytest.approx(intercept), pytest.approx(slope))
        assert abs(res.fid_inf - truth) < 0.5 * abs(res.fids[-1] - truth), (res.fid_inf, res.fids[-1], truth)
    assert set(res.to_dict()) == {"fid_inf", "fid_inf_slope", "fid_inf_sizes", "fid_inf_fids"}


def test_pareto_front():
    fid = [10.0, 12.0, 9.0, 12.0, np.nan, 9.0, 11.0]
    clip = [30.0, 32.0, 28.0, 32.0, 99.0, 27.0, 29.0]
    # 2 (best FID) and 0, then the tied pair 1/3 (best CLIP); 5 is dominated by 2, 6 by 0; nan never counts.
    assert pareto_front(fid, clip).tolist() == [2, 0, 1, 3]
    assert pareto_front([], []).tolist() == []


# --- precision / recall / density / coverage ------------------------------------------------------------

def reference_prdc(real, fake, k_pr, k_dc):
    """Brute force with full distance matrices, written from the papers' definitions."""
    drr, dff, drf = cdist(real, real), cdist(fake, fake), cdist(real, fake)
    rad_r = {k: np.sort(drr, axis=1)[:, k] for k in (k_pr, k_dc)}  # column 0 is the point itself
    rad_f = np.sort(dff, axis=1)[:, k_pr]
    precision = np.mean([any(drf[i, j] < rad_r[k_pr][i] for i in range(len(real))) for j in range(len(fake))])
    recall = np.mean([any(drf[i, j] < rad_f[j] for j in range(len(fake))) for i in range(len(real))])
    density = sum(drf[i, j] < rad_r[k_dc][i] for i in range(len(real)) for j in range(len(fake))) / (k_dc * len(fake))
    cover = np.mean([drf[i].min() < rad_r[k_dc][i] for i in range(len(real))])
    return {"precision": precision, "recall": recall, "density": density, "coverage": cover}


def test_prdc_matches_brute_force():
    rng = np.random.default_rng(10)
    real, fake = rng.normal(size=(70, 6)), rng.normal(0.4, 1.3, size=(55, 6))
    want = reference_prdc(real, fake, 3, 5)
    got = prdc(real, fake, chunk=16)  # chunks smaller than either set: the blocked path is exercised
    assert got == pytest.approx(want, rel=1e-12)
    assert 0 < got["precision"] < 1 and 0 < got["recall"] < 1
    assert precision_recall(real, fake) == pytest.approx((want["precision"], want["recall"]))
    assert density_coverage(real, fake, chunk=8) == pytest.approx((want["density"], want["coverage"]))


def test_prdc_sanity_cases():
    rng = np.random.default_rng(11)
    modes = rng.normal(scale=10, size=(10, 8))
    real = modes[rng.integers(0, 10, 1000)] + rng.normal(size=(1000, 8))
    same = prdc(real, real)
    assert same["precision"] == same["recall"] == same["coverage"] == 1.0
    one_mode = modes[0] + rng.normal(size=(500, 8))  # mode collapse: all samples from one of ten modes
    collapsed = prdc(real, one_mode)
    assert collapsed["precision"] > 0.8 and collapsed["recall"] < 0.15 and collapsed["coverage"] < 0.15
    point = modes[0] + 1e-3 * rng.normal(size=(500, 8))  # collapse to (almost) a single image
    assert prdc(real, point)["recall"] < 0.01
    with pytest.raises(ValueError, match="k=5"):
        prdc(real[:5], real[:5])


# --- bigger simulation ---------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize(("metric", "d", "n", "shift", "spread", "upper"), [
    ("fid", 256, 200, 1.0, 0.9, 0.99), ("fid", 64, 500, 1.0, 0.9, 0.99), ("kid", 256, 500, 1.0, 0.9, 0.99),
    # Known conservative regimes (see toolkit/metrics/intervals.py): near the null, and FID with N ≪ d.
    ("fid", 64, 200, 0.0, 0.0, 1.0), ("kid", 64, 200, 0.0, 0.0, 1.0), ("fid", 512, 250, 1.0, 0.9, 1.0)])
def test_interval_coverage_large(metric, d, n, shift, spread, upper):
    world = World(d, shift=shift, spread=spread)
    fn = {"fid": (lambda f: fid_interval(world.ref, f), lambda f: point_fid(world, f)),
          "kid": (lambda f: kid_interval(world.ref, f), lambda f: point_kid(world, f))}[metric]
    with one_blas_thread():
        cov, target, problems = coverage(*fn, lambda r: world.fake(r, n), 400, 3000, 12)
    msg = (f"{metric} d={d} n={n} shift={shift} spread={spread} G=20: coverage {cov:.1%} of E={target:.4g} "
           "over 400 trials, target from 3000 draws")
    print(msg)
    assert not problems and 0.93 <= cov <= upper, msg
