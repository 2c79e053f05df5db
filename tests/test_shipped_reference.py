"""Reference features shipped with a reference set (toolkit/evaluation/shipped.py): the miniature's
are keyed as the default job's cache and equal a recomputation; an evaluation uses shipped features
when its key matches (same metrics as computing them), and otherwise computes them saying why.

    python -m pytest -q tests/test_shipped_reference.py
    python -m pytest -q -m slow tests/test_shipped_reference.py     # the 500 images recomputed whole
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from miniature.reference_features import compose, ship
from miniature.world import generate
from tests.conftest import compose_cfg
from tests.test_eval import eval_overrides
from toolkit.evaluation import job, reference, shipped
from toolkit.evaluation.scores import parse_metrics
from toolkit.metrics.clip import load_clip
from toolkit.metrics.intervals import Reference
from toolkit.results import read_rows
from toolkit.tasks import eval as eval_task

FOLDER = Path(reference.shipped_folder("auto"))


def default_job_references():
    """The default job's reference set, feature models and each space's key, as its evaluation builds them."""
    cfg = compose([])
    m = cfg.metrics
    wanted = parse_metrics(m.compute)
    extractors = job.feature_models(m, wanted, load_clip(m.clip_model), "cpu")
    refset = job.reference_set(cfg)
    ref, identity, column = refset.rows, refset.identity, refset.image_column
    size = job.reference_size(cfg)
    keys = {s: reference.cache_key(identity, job.protocol_of(s, e, size)) for s, e in extractors.items()}
    return ref, column, size, extractors, keys


@pytest.fixture(scope="module")
def eval_data(tmp_path_factory) -> Path:
    return generate(tmp_path_factory.mktemp("evaldata"), n=8, seed=5, striped=True, size=32)


@pytest.fixture(scope="module")
def miniature_refs():
    return default_job_references()


def close(recomputed: np.ndarray, shipped_feats: np.ndarray) -> None:
    """Equal here (same CPU kind: bit for bit); features made on another CPU kind differ in the last digits."""
    scale = np.abs(shipped_feats).max()
    np.testing.assert_allclose(recomputed, shipped_feats, rtol=1e-5, atol=1e-6 * scale)


def test_the_miniature_ships_the_default_jobs_reference_features(miniature_refs):
    ref, column, size, extractors, keys = miniature_refs
    index = shipped.read_index(FOLDER)
    assert set(keys) == {"inception", "clip"} and set(keys.values()) == set(index)   # nothing stale shipped
    assert sum(f.stat().st_size for f in FOLDER.iterdir()) < 4.5e6
    images = [reference.reference_image(ref[i][column], size) for i in range(50)]   # the job's first batch
    for space, key in keys.items():
        feats = shipped.load(FOLDER, key, index[key], 500)
        assert index[key]["space"] == space and "model" not in index[key]["protocol"]   # no local path shipped
        close(extractors[space](images, progress=False), feats[:50])


@pytest.mark.slow
def test_the_shipped_features_give_the_statistics_of_a_full_recomputation(miniature_refs, tmp_path):
    """All 500 images, as the job computes them (`ship` into a folder of its own): features and FID statistics."""
    ship(compose([]), tmp_path)
    _, _, _, _, keys = miniature_refs
    for key in keys.values():
        a = np.load(tmp_path / f"{key}.npy").astype(np.float64)
        b = shipped.load(FOLDER, key, shipped.read_index(FOLDER)[key], 500)
        close(a, b)
        ra, rb = Reference.from_features(a), Reference.from_features(b)
        np.testing.assert_allclose(ra.mu, rb.mu, rtol=1e-6, atol=1e-9)


def run_eval(tiny_model, tiny_clip, data, cache, out, extra=()):
    m = eval_task.run(compose_cfg([*eval_overrides(tiny_model, tiny_clip, data, cache, out), *extra], out))
    return m, read_rows(out / "results.jsonl")[0]


def test_an_evaluation_uses_shipped_features_when_its_key_matches(tiny_model, tiny_clip, eval_data, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    folder = tmp_path / "shipped"
    over = eval_overrides(tiny_model, tiny_clip, eval_data, tmp_path / "unused", tmp_path / "s")
    assert set(ship(compose_cfg(over, tmp_path / "s"), folder)) == {"inception", "clip"}   # as the miniature's

    used, row_s = run_eval(tiny_model, tiny_clip, eval_data, tmp_path / "c1", tmp_path / "e1",
                           [f"metrics.shipped_reference={folder}"])
    assert row_s["protocol"]["reference_source"] == {"inception": "shipped", "clip": "shipped"}
    assert sum("shipped, key" in r.getMessage() and "matches" in r.getMessage() for r in caplog.records) == 2
    computed, row_c = run_eval(tiny_model, tiny_clip, eval_data, tmp_path / "c2", tmp_path / "e2",
                               ["metrics.shipped_reference=null"])
    assert row_c["protocol"]["reference_source"] == {"inception": "computed", "clip": "computed"}
    assert row_s["protocol"]["reference_caches"] == row_c["protocol"]["reference_caches"]
    for k, v in computed.items():   # the same numbers as computing the reference features
        if not k.startswith(("seconds_", "images_per_second")):
            assert used[k] == pytest.approx(v, rel=1e-9, abs=1e-12), k
    for key in row_s["protocol"]["reference_caches"].values():   # the cache holds them now, as if computed
        assert np.array_equal(np.load(tmp_path / "c1" / f"{key}.npy"), np.load(tmp_path / "c2" / f"{key}.npy"))


def test_a_key_that_does_not_match_is_computed_saying_which_setting_differs(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    ident = {"data": "files:0123", "split": "train", "n": 3}
    protocol = {"weights_sha256": "abc", "memory_format": "channels_last", "reference_size": [32, 32]}
    feats = np.arange(6, dtype=np.float32).reshape(3, 2).astype(np.float64)
    key = reference.cache_key(ident, protocol)
    shipped.write(tmp_path, key, "inception", ident, protocol, feats)
    assert np.array_equal(shipped.lookup(tmp_path, key, "inception", ident, protocol), feats)

    entry = shipped.read_index(tmp_path)[key]
    assert shipped.differences(entry, ident, {**protocol, "reference_size": (32, 32)}) == []   # a tuple is a list
    other = {**protocol, "memory_format": "contiguous", "reference_size": (64, 64)}
    caplog.clear()
    assert shipped.lookup(tmp_path, reference.cache_key(ident, other), "inception", ident, other) is None
    [why] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "protocol.memory_format: shipped \"channels_last\", this job \"contiguous\"" in why
    assert "protocol.reference_size: shipped [32, 32], this job [64, 64]" in why and "computed" in why

    caplog.clear()   # other images: nothing to say but that none were shipped for them
    other_set = {**ident, "data": "files:9999"}
    assert shipped.lookup(tmp_path, reference.cache_key(other_set, protocol), "inception", other_set, protocol) is None
    assert [r.levelno for r in caplog.records] == [logging.INFO] and "none shipped" in caplog.records[0].getMessage()

    np.save(tmp_path / f"{key}.npy", np.zeros((3, 2), np.float32))   # damaged: never used
    caplog.clear()
    assert shipped.lookup(tmp_path, key, "inception", ident, protocol) is None
    assert "not usable" in caplog.records[0].getMessage() and "SHA-256" in caplog.records[0].getMessage()


def test_shipping_refuses_what_float32_would_change_and_keys_leave_the_models_location_out(tmp_path):
    ident = {"data": "files:0", "n": 2}
    with pytest.raises(ValueError, match="not float32 values"):
        shipped.write(tmp_path, "0" * 20, "clip", ident, {}, np.array([[0.1, 0.2], [0.3, 0.4]]))
    assert reference.cache_key(ident, {"model": "/a/clip", "weights_sha256": "x"}) == \
        reference.cache_key(ident, {"model": "org/clip", "weights_sha256": "x"}) != \
        reference.cache_key(ident, {"model": "/a/clip", "weights_sha256": "y"})
    (tmp_path / shipped.INDEX).write_text(json.dumps({"../escape": {"space": "clip"}, "0" * 20: "not an entry"}))
    assert shipped.read_index(tmp_path) == {}   # names that are no key, and entries that are no object: ignored
