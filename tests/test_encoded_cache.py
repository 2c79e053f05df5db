"""Latent / text-embedding caches: hits, misses, invalidation, and the same training as the
naive path; the resumable sampler's epoch and rank guarantees."""

from __future__ import annotations

import csv
import json
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from hydra.utils import instantiate
from PIL import Image

from tests.conftest import compose_cfg, tiny_overrides
from tests.tiny import build_tiny_pipeline
from toolkit.data.buckets import BucketBatchSampler, make_buckets, nearest_bucket
from toolkit.data.encoded_cache import ArrayStore, fill
from toolkit.data.sampler import ResumableSampler
from toolkit.tasks import train


def test_store_encodes_only_missing_keys(tmp_path):
    calls = []

    def enc(xs):
        calls.append(len(xs))
        return np.stack([np.full((2, 3), x, np.float32) for x in xs])

    store = ArrayStore(tmp_path)
    assert fill(store, ["a", "b", "c"], [1, 2, 3], enc, batch_size=2) == 3 and calls == [2, 1]
    again = ArrayStore(tmp_path)   # a new process reads the shards from disk
    assert fill(again, ["a", "b", "c"], [1, 2, 3], enc, batch_size=2) == 0 and calls == [2, 1]
    assert fill(again, ["a", "b", "d"], [1, 2, 9], enc, batch_size=2) == 1
    assert again.get("d").tolist() == [[9.0] * 3] * 2 and again.get("b")[0, 0] == 2
    # two ranks (threads with a barrier) split the work and both see everything afterwards
    barrier, stores = threading.Barrier(2), [ArrayStore(tmp_path / "ddp") for _ in range(2)]
    with ThreadPoolExecutor(2) as pool:
        done = list(pool.map(lambda r: fill(stores[r], list("wxyz"), [1, 2, 3, 4], enc, 2, rank=r, world_size=2,
                                            barrier=barrier.wait), (0, 1)))
    assert done == [2, 2] and all(s.index.keys() == set("wxyz") for s in stores)


@pytest.mark.parametrize("world_size", [2, 3])
def test_every_batch_holds_the_same_items_whatever_the_number_of_ranks(tmp_path, world_size):
    """So a build over N ranks (or one per node) gives the rows a one-process build gives, bit for bit."""
    def batches(world: int) -> set[tuple[int, ...]]:
        seen: list[tuple[int, ...]] = []
        enc = lambda xs: (seen.append(tuple(xs)), np.zeros((len(xs), 1), np.float32))[1]
        barrier, stores = threading.Barrier(world), [ArrayStore(tmp_path / f"w{world}") for _ in range(world)]
        with ThreadPoolExecutor(world) as pool:
            list(pool.map(lambda r: fill(stores[r], [str(i) for i in range(11)], list(range(11)), enc, 3, rank=r,
                                         world_size=world, barrier=barrier.wait), range(world)))
        assert len(seen) == len(set(seen))
        return set(seen)

    assert batches(world_size) == batches(1) == {(0, 1, 2), (3, 4, 5), (6, 7, 8), (9, 10)}


def rows_in(cache: Path, kind: str) -> dict[str, int]:
    """Rows per cache folder of ``kind`` (latents / text)."""
    return {d.name: sum(len(json.loads(f.read_text())) for f in d.glob("*.keys.json"))
            for d in sorted(cache.glob(f"{kind}-*"))}


def run_cached(model: str, data: Path, out: Path, cache: Path, *extra: str) -> dict:
    return train.run(compose_cfg(tiny_overrides(model, data, out) + [
        f"callbacks.encoded_cache.dirpath={cache}", "trainer.max_steps=2", *extra], out))


def test_latent_cache_hits_and_invalidation(tiny_model, imagefolder_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(imagefolder_data, data)
    cache = tmp_path / "cache"
    run_cached(tiny_model, data, tmp_path / "r1", cache)
    first = rows_in(cache, "latents")
    assert list(first.values()) == [16] and len(rows_in(cache, "text")) == 1   # 12 train + 4 val images
    run_cached(tiny_model, data, tmp_path / "r2", cache)
    assert rows_in(cache, "latents") == first                                 # warm: nothing re-encoded
    img = Image.open(data / "00003.png")
    img.transpose(Image.Transpose.FLIP_TOP_BOTTOM).save(data / "00003.png")   # one image changes
    run_cached(tiny_model, data, tmp_path / "r3", cache)
    assert list(rows_in(cache, "latents").values()) == [17]                  # only it is re-encoded
    run_cached(tiny_model, data, tmp_path / "r4", cache, "data.resolution=8")
    assert sorted(rows_in(cache, "latents").values()) == [16, 17]            # new resolution: new folder
    other_vae = str(build_tiny_pipeline(tmp_path / "other", seed=5))
    run_cached(other_vae, data, tmp_path / "r5", cache)
    assert sorted(rows_in(cache, "latents").values()) == [16, 16, 17] and len(rows_in(cache, "text")) == 2


def losses(out: Path) -> list[float]:
    with open(next(out.glob("csv/*/metrics.csv"))) as f:
        return [float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]


@pytest.mark.parametrize("model_fixture", ["tiny_model", "tiny_sdxl"])
def test_cached_training_matches_naive_training(request, model_fixture, imagefolder_data, tmp_path):
    """Same seed: the same per-step draws, so the losses agree up to float32 rounding of the
    batched encoding (float32 storage here). SDXL: both encoders' states + the pooled embedding
    and the micro-conditioning come from the cache."""
    tiny_model = request.getfixturevalue(model_fixture)
    common = ["trainer.max_steps=6", "data.random_flip=true", "callbacks.encoded_cache.dtype=float32"]
    run_cached(tiny_model, imagefolder_data, tmp_path / "naive", tmp_path / "c", *common,
               "callbacks.encoded_cache.latents=false", "callbacks.encoded_cache.text=false")
    run_cached(tiny_model, imagefolder_data, tmp_path / "cached", tmp_path / "c", *common)
    a, b = losses(tmp_path / "naive"), losses(tmp_path / "cached")
    assert len(a) == len(b) == 6
    np.testing.assert_allclose(a, b, rtol=1e-4)


def test_random_crops_turn_the_latent_cache_off(tiny_model, imagefolder_data, tmp_path, caplog):
    run_cached(tiny_model, imagefolder_data, tmp_path / "r", tmp_path / "c", "data.center_crop=false")
    assert not rows_in(tmp_path / "c", "latents") and "random crops are not cacheable" in caplog.text


@pytest.mark.parametrize("world", [1, 2, 3])
def test_sampler_epochs_and_ranks(world):
    n, micro = 20, 3
    samplers = [ResumableSampler(n, micro, seed=7, rank=r, world_size=world) for r in range(world)]
    for epoch in (0, 1):
        for s in samplers:
            s.set_epoch(epoch)
        shards = [[i for b in s for e, i in b] for s in samplers]
        flat = [i for sh in shards for i in sh]
        assert len(flat) == len(set(flat)) == n // (micro * world) * micro * world   # disjoint, whole steps
        assert all(len(sh) == len(shards[0]) for sh in shards)                    # ranks in step
    orders = [[i for b in ResumableSampler(n, 1, seed=7) for _, i in b] for _ in range(2)]
    assert orders[0] == orders[1] != list(range(n))                   # deterministic, shuffled
    s = ResumableSampler(n, 1, seed=7)
    s.start = 5
    assert [i for b in s for _, i in b] == orders[0][5:] and [i for b in s for _, i in b] == orders[0]   # one pass


def test_aspect_buckets_single_bucket_batches_once_per_epoch(tiny_model, tmp_path):
    sizes = make_buckets(32, step=8, max_aspect=2.0)
    assert all(w % 8 == 0 and h % 8 == 0 and 0.5 <= w / h <= 2 for w, h in sizes) and (32, 32) in sizes
    assert sizes == [(24, 40), (32, 32), (40, 24)] and sizes[nearest_bucket(64, 32, sizes)] == (40, 24)
    data = tmp_path / "mixed"
    data.mkdir()
    shapes = [(64, 32), (32, 64), (48, 48), (60, 40)] * 5
    for i, (w, h) in enumerate(shapes):
        pixels = np.random.default_rng(i).integers(0, 255, (h, w, 3), np.uint8)
        Image.fromarray(pixels).save(data / f"{i:02d}.png")
        (data / f"{i:02d}.txt").write_text(f"image {i}")
    cfg = compose_cfg(tiny_overrides(tiny_model, data, tmp_path) + [
        "data.val_fraction=0", "data.global_batch_size=3", "data.resolution=32",
        "data.buckets={step:8,max_aspect:2.0}"], tmp_path)
    dm = instantiate(cfg.data)
    dm.setup("fit")
    assert len(set(dm.train_set.sizes)) >= 3                         # wide, tall, square buckets
    seen = []
    for batch in dm.train_dataloader():
        assert len({tuple(t.shape) for t in batch["pixel_values"]}) == 1   # one bucket per batch
        seen += batch["captions"]
    assert sorted(seen) == sorted(f"image {i}" for i in range(len(shapes)))   # each image once
    bucket_of = [i % 4 for i in range(20)]
    ranks = [BucketBatchSampler(bucket_of, 3, seed=1, rank=r, world_size=2) for r in range(2)]
    got = [[i for b in s for _, i in b] for s in ranks]
    assert not set(got[0]) & set(got[1]) and len(list(ranks[0])) == len(list(ranks[1]))   # disjoint, in step
    assert all(len({bucket_of[i] for _, i in b}) == 1 for s in ranks for b in s)
    metrics = train.run(cfg)   # end to end: per-bucket latent cache, bucketed batches
    assert metrics["global_step"] == 4 and rows_in(Path(cfg.callbacks.encoded_cache.dirpath), "latents")
