"""CMMD, the Vendi score and style similarity against independent computations, their known
properties, and their intervals' coverage by simulation (as ``tests/test_statistics.py`` does for
FID/KID). Figures as last measured (95% intervals, jackknife G = 20, fixed reference):

    CMMD  d=32 N=150   96.7% (300 trials, E[CMMD_N] from 1000 draws)
    Vendi d=32 N=150   96.3% (300 trials, E[Vendi_N] from 1000 draws)
    paired Δ under the null, N=150 (pairs sharing half their variation): ΔCMMD 98.5%, ΔVendi 95.5% (200)
    style similarity d=32 N=150: 95.3% (1000 trials, outside the suite: the t-interval of a mean of
    i.i.d. per-image values, as CLIP's 94.9% in tests/test_statistics.py)
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.test_statistics import coverage, one_blas_thread
from toolkit.metrics import cmmd as cm
from toolkit.metrics import diversity, style
from toolkit.metrics.intervals import groups, jackknife_interval


def direct_cmmd(x: np.ndarray, y: np.ndarray, sigma: float = 10.0) -> float:
    """The paper's estimator written out, pair by pair (google-research cmmd/distance.py's mmd)."""
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    y = y / np.linalg.norm(y, axis=1, keepdims=True)
    k = lambda a, b: np.exp(-np.sum((a - b) ** 2) / (2 * sigma**2))
    kxx = np.mean([[k(a, b) for b in x] for a in x])
    kyy = np.mean([[k(a, b) for b in y] for a in y])
    kxy = np.mean([[k(a, b) for b in y] for a in x])
    return 1000 * (kxx + kyy - 2 * kxy)


def embeddings(rng, n: int, d: int = 32, shift: float = 0.0) -> np.ndarray:
    mu = np.zeros(d)
    mu[0] = 3.0 + shift
    return mu + rng.normal(size=(n, d))


def test_cmmd_is_the_papers_estimator_and_has_its_properties():
    rng = np.random.default_rng(0)
    x, y = embeddings(rng, 40), embeddings(rng, 30, shift=2.0)
    assert cm.cmmd(x, y) == pytest.approx(direct_cmmd(x, y), rel=1e-10)
    assert cm.cmmd(x, y, sigma=0.5) == pytest.approx(direct_cmmd(x, y, 0.5), rel=1e-10)
    assert cm.cmmd(x, y) == pytest.approx(cm.cmmd(y, x), rel=1e-12)   # symmetric
    assert cm.cmmd(x, x) == pytest.approx(0.0, abs=1e-9)   # the V-statistic of a set with itself
    xn, yn = cm.normalise(x), cm.normalise(y)   # σ-scaling: k depends on ‖a - b‖ / σ only
    assert cm.cmmd(3 * xn, 3 * yn, sigma=30, normalised=True) == pytest.approx(cm.cmmd(xn, yn, normalised=True))
    assert cm.cmmd(x, 7 * x) == pytest.approx(0.0, abs=1e-9)   # embeddings are L2-normalised first
    # same distribution: E[CMMD] is the V-statistic's bias (1/m + 1/n)·(1 - E k(x, x')) → 0 with size
    m, n = 60, 40
    vals = [cm.cmmd(embeddings(rng, m), embeddings(rng, n)) for _ in range(300)]
    big = cm.normalise(embeddings(rng, 3000))
    ekk = (cm.kernel_sum(big, big) - len(big)) / (len(big) * (len(big) - 1))
    bias = 1000 * (1 / m + 1 / n) * (1 - ekk)
    assert np.mean(vals) == pytest.approx(bias, rel=0.1)
    assert cm.cmmd(embeddings(rng, 600), embeddings(rng, 400)) < bias / 5


def test_cmmd_leave_group_out_replicates_equal_direct_recomputation():
    rng = np.random.default_rng(1)
    x, y = embeddings(rng, 50), embeddings(rng, 37, shift=1.0)
    parts = groups(len(y), 6, 0)
    est, reps = cm.leave_group_out(x, y, parts)
    assert est == pytest.approx(cm.cmmd(x, y), rel=1e-10)
    for p, r in zip(parts, reps, strict=True):
        assert r == pytest.approx(cm.cmmd(x, np.delete(y, p, axis=0)), rel=1e-10)


def test_vendi_equals_the_vendi_score_package_and_its_closed_forms():
    from vendi_score import vendi as reference

    rng = np.random.default_rng(2)
    for n, d in ((50, 8), (20, 64)):   # both sides of the dual (d×d vs n×n)
        x = rng.normal(size=(n, d))
        assert diversity.vendi(x) == pytest.approx(reference.score_X(x), rel=1e-9)
        assert diversity.vendi(x) == pytest.approx(reference.score_dual(x), rel=1e-9)
    assert diversity.vendi(np.tile(rng.normal(size=(1, 16)), (9, 1))) == pytest.approx(1.0)   # n identical → 1
    assert diversity.vendi(np.eye(7)) == pytest.approx(7.0)   # n orthogonal → n
    assert diversity.vendi(5 * np.eye(7)) == pytest.approx(7.0)   # features normalised first
    two = np.vstack([np.tile(np.eye(4)[0], (5, 1)), np.tile(np.eye(4)[1], (5, 1))])
    assert diversity.vendi(two) == pytest.approx(2.0)   # two distinct samples, five copies each


def test_vendi_leave_group_out_replicates_equal_direct_recomputation():
    rng = np.random.default_rng(3)
    for n, d in ((40, 8), (15, 32)):
        x = rng.normal(size=(n, d))
        parts = groups(n, 5, 0)
        est, reps = diversity.leave_group_out(x, parts)
        assert est == pytest.approx(diversity.vendi(x))
        for p, r in zip(parts, reps, strict=True):
            assert r == pytest.approx(diversity.vendi(np.delete(x, p, axis=0)), rel=1e-9)


def test_style_similarity_on_constructed_embeddings():
    rng = np.random.default_rng(4)
    ref = rng.normal(size=(12, 16))
    gen = rng.normal(size=(9, 16))
    unit = lambda v: v / np.linalg.norm(v, axis=1, keepdims=True)
    pairwise = np.mean(unit(gen) @ unit(ref).T)   # mean cosine over all (generated, reference) pairs
    assert style.style_similarity(gen, ref) == pytest.approx(pairwise)
    assert style.per_image(gen, ref).mean() == pytest.approx(style.style_similarity(gen, ref))
    style_dir = np.eye(16)[0]
    assert style.style_similarity(np.tile(2 * style_dir, (5, 1)), np.tile(style_dir, (3, 1))) == pytest.approx(1.0)
    assert style.style_similarity(np.tile(np.eye(16)[1], (4, 1)), np.tile(style_dir, (3, 1))) == pytest.approx(0.0)
    iv = style.style_interval(gen, ref)
    assert iv.low < iv.estimate < iv.high and iv.estimate == pytest.approx(pairwise)


@pytest.mark.parametrize("metric", ["cmmd", "vendi"])
def test_interval_covers_the_expected_value_at_n(metric):
    rng0 = np.random.default_rng(5)
    real = embeddings(rng0, 400)
    n, trials, draws = 150, 300, 1000
    if metric == "cmmd":
        kxx = cm.kernel_sum(cm.normalise(real), cm.normalise(real)) / len(real) ** 2

        def interval(f):
            parts = groups(len(f), 20, 0)
            est, reps = cm.leave_group_out(real, f, parts, kxx=kxx)
            return jackknife_interval(est, reps, parts, len(f))

        value = lambda f: cm.cmmd(real, f)
    else:
        interval, value = diversity.vendi_interval, diversity.vendi
    with one_blas_thread():
        cov, target, problems = coverage(interval, value, lambda r: embeddings(r, n, shift=0.7), trials, draws, 6)
    msg = f"{metric} d=32 n={n} G=20: coverage {cov:.1%} of E[{metric}_N]={target:.4f} over {trials} trials"
    print(msg)
    assert not problems, problems[:3]
    assert 0.90 <= cov <= 0.99, msg


def test_paired_deltas_under_the_null_cover_zero():
    rng = np.random.default_rng(7)
    real = embeddings(rng, 300)
    hits = {"cmmd": 0, "vendi": 0}
    trials, n = 200, 150
    for _ in range(trials):
        u = rng.normal(size=(n, 32))   # the shared prompt/seed part of each pair
        a = embeddings(rng, n, shift=0.7) * 0.5 + u * 0.5
        b = embeddings(rng, n, shift=0.7) * 0.5 + u * 0.5
        seed = int(rng.integers(1 << 30))
        for name, cmp in (("cmmd", cm.compare_cmmd(real, a, b, seed=seed)),
                          ("vendi", diversity.compare_vendi(a, b, seed=seed))):
            hits[name] += cmp.low <= 0 <= cmp.high
            assert cmp.delta == pytest.approx(cmp.b - cmp.a)
    for name, h in hits.items():
        print(f"paired Δ{name} under the null, n={n}: coverage {h / trials:.1%} over {trials} trials")
        assert 0.90 <= h / trials <= 1.0


def test_an_evaluation_cell_reports_vendi_with_its_interval_and_paired_delta():
    from toolkit.evaluation.scores import compute_scores, paired_deltas, parse_metrics
    from toolkit.metrics.intervals import Reference

    rng = np.random.default_rng(8)
    ref = Reference.from_features(embeddings(rng, 120))
    a, b = embeddings(rng, 60, shift=0.5), embeddings(rng, 60, shift=0.5)
    b[:30] = b[0]   # B collapsed: half its images one image
    wanted = parse_metrics(["fid", "vendi"])
    scores = compute_scores({"inception": ref}, {"inception": a}, {}, wanted)
    assert scores["vendi"] == pytest.approx(diversity.vendi(a))
    assert scores["vendi_ci_low"] < scores["vendi"] < scores["vendi_ci_high"]
    seeds = np.arange(60)
    d = paired_deltas({"inception": ref}, {"features": a, "seeds": seeds}, {"features": b, "seeds": seeds},
                      wanted)["vendi"]
    assert d["delta"] == pytest.approx(diversity.vendi(b) - diversity.vendi(a)) and d["high"] < 0
    assert d["verdict"].startswith("A better")   # higher Vendi is more diverse
