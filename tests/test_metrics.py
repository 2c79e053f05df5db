"""Metric formulas against independent computations, and the two feature extractors."""

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import linalg

from toolkit.metrics import distances
from toolkit.metrics.clip import CLIPScorer
from toolkit.metrics.inception import InceptionFeatures, default_weights, preprocess
from toolkit.metrics.intervals import mean_interval


def reference_fid(a, b):
    """Independent: Tr((Σ₁Σ₂)^½) from the eigenvalues of Σ₁^½ Σ₂ Σ₁^½ (symmetric PSD)."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = linalg.eigh(s1)
    r1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    lam = np.clip(linalg.eigvalsh(r1 @ s2 @ r1), 0, None)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(lam).sum())


def test_fid_matches_independent_computation():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(300, 64)), rng.normal(0.3, 1.2, size=(250, 64))
    assert distances.fid(a, b) == pytest.approx(reference_fid(a, b), rel=1e-6)
    assert abs(distances.fid(a, a)) < 1e-6


def test_low_rank_fid_equals_full_fid():
    rng = np.random.default_rng(1)
    real, fake = rng.normal(size=(400, 128)), rng.normal(0.1, 1.1, size=(60, 128))  # n_fake < d
    mu, sig = distances.stats(real)
    assert distances.fid_low_rank(mu, sig, fake) == pytest.approx(distances.fid(real, fake), rel=1e-6)


def test_kid_matches_direct_double_loop():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(20, 8)), rng.normal(0.5, 1, size=(15, 8))
    k = lambda a, b: (a @ b / 8 + 1) ** 3
    xx = sum(k(x[i], x[j]) for i in range(20) for j in range(20) if i != j) / (20 * 19)
    yy = sum(k(y[i], y[j]) for i in range(15) for j in range(15) if i != j) / (15 * 14)
    xy = sum(k(x[i], y[j]) for i in range(20) for j in range(15)) / (20 * 15)
    assert distances.mmd2_unbiased(x, y) == pytest.approx(xx + yy - 2 * xy, rel=1e-10)
    x15 = x[:15]  # equal sizes: each KID subset is then the whole set
    mean, std = distances.kid(x15, y, subsets=5, subset_size=100)
    assert mean == pytest.approx(distances.mmd2_unbiased(x15, y), rel=1e-12)
    assert std == pytest.approx(0, abs=1e-12)
    a, b = rng.normal(size=(300, 8)), rng.normal(size=(300, 8))  # same distribution: KID ≈ 0
    assert abs(distances.kid(a, b, subsets=10)[0]) < 0.1 * distances.kid(a, b + 0.5, subsets=10)[0]


def test_t_interval_across_seeds():
    iv = mean_interval([1.0, 2.0, 3.0])
    assert iv.estimate == 2.0 and iv.high - iv.estimate == pytest.approx(4.303 * 1 / np.sqrt(3), rel=1e-3)


def test_inception_preprocessing_and_features():
    assert default_weights().name == "default_1.pt"
    x = preprocess([Image.new("RGB", (32, 32), (255, 0, 128))])
    assert x.shape == (1, 3, 299, 299)
    assert x[0, 0].max() == 255 / 128 - 1 and x[0, 1].min() == -1.0
    feats = InceptionFeatures(batch_size=2)([Image.new("RGB", (32, 32), c) for c in ("red", "blue", "red")],
                                            progress=False)
    assert feats.shape == (3, 2048) and np.isfinite(feats).all()
    assert np.allclose(feats[0], feats[2]) and not np.allclose(feats[0], feats[1])


def test_channels_last_inception_is_the_same_features_and_says_so():
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)) for _ in range(4)]
    fast, plain = InceptionFeatures(batch_size=4), InceptionFeatures(batch_size=4, channels_last=False)
    a, b = fast(images, progress=False), plain(images, progress=False)
    assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max()                     # float rounding only
    assert fast.protocol["memory_format"] == "channels_last" and "memory_format" not in plain.protocol


def test_clip_score_equals_formula_by_hand(tiny_clip):
    from transformers import CLIPImageProcessorPil, CLIPModel, CLIPTokenizer

    scorer = CLIPScorer(tiny_clip)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (40 + 7 * i, 52 - 3 * i, 3), dtype=np.uint8)) for i in range(5)]
    texts = ["a red circle", "a blue square", "a", "striped", "a large green cross at the top"]
    got = scorer.scores(images, texts, progress=False)
    # by hand: CLIPModel.forward's normalised embeddings; pixels: each image's centred square (numpy
    # slicing), then transformers' processor resizing it to the model's size
    model, tok = CLIPModel.from_pretrained(tiny_clip).eval(), CLIPTokenizer.from_pretrained(tiny_clip)
    size = model.config.vision_config.image_size
    proc = CLIPImageProcessorPil(size={"height": size, "width": size}, do_center_crop=False)

    def square(im):
        a = np.asarray(im)
        s = min(a.shape[:2])
        t, lft = (a.shape[0] - s) // 2, (a.shape[1] - s) // 2
        return Image.fromarray(a[t: t + s, lft: lft + s])

    pixels = torch.from_numpy(np.concatenate([proc(square(im), return_tensors="np")["pixel_values"] for im in images]))
    with torch.no_grad():
        out = model(**tok(texts, padding=True, return_tensors="pt"), pixel_values=pixels)
    cos = (out.image_embeds * out.text_embeds).sum(-1).numpy()
    np.testing.assert_allclose(got, 100 * np.maximum(cos, 0), rtol=1e-5, atol=1e-5)
    assert got.shape == (5,) and (got >= 0).all()


def test_shards_cover_each_index_once():
    from toolkit.evaluation.distributed import gather_by_index, shard

    for n, world, block in ((10, 3, 4), (7, 2, 1), (2, 4, 3)):
        parts = [shard(n, r, world, block) for r in range(world)]
        assert sorted(i for p in parts for i in p) == list(range(n))
        assert gather_by_index(parts[0], parts[0], 1) == parts[0]


def test_shard_moments_combine_to_the_statistics_of_all_features():
    """Shards of uneven size, features with a large common offset (what defeats raw Σf / Σffᵀ):
    the combined moments are the pooled mean and covariance; their FID is the features' FID."""
    from toolkit.metrics.intervals import Reference, fid_interval
    from toolkit.metrics.moments import Moments, combine, fid_from_moments

    rng = np.random.default_rng(3)
    d = 64
    feats = 50.0 + rng.standard_normal((700, d)) @ rng.standard_normal((d, d)) * 0.1
    real = 50.2 + rng.standard_normal((400, d)) * 0.3
    cuts = [0, 3, 130, 131, 500, 700]
    moments = combine(Moments.of(feats[a:b]) for a, b in zip(cuts, cuts[1:]))
    assert moments.n == 700
    np.testing.assert_allclose(moments.mean, feats.mean(0), rtol=1e-12)
    cov = np.cov(feats, rowvar=False)
    assert np.abs(moments.cov - cov).max() <= 1e-10 * np.abs(cov).max()
    ref = Reference.from_features(real)
    fid = fid_from_moments(ref.mu, ref.sigma, moments, ref.sigma_sqrt)
    assert fid == pytest.approx(distances.fid(real, feats), rel=1e-6)
    assert fid == pytest.approx(fid_interval(ref, feats, groups=5).estimate, rel=1e-6)
