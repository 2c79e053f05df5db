"""Sampling, evaluation, sharding, sweeps and the reference cache, through the real tasks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from omegaconf import open_dict
from PIL import Image

from miniature.world import generate
from tests.conftest import compose_cfg, run_entry
from toolkit.results import read_rows
from toolkit.tasks import eval as eval_task
from toolkit.tasks import sample as sample_task


def eval_overrides(model: str, clip: str, data: Path, cache: Path, out: Path) -> list[str]:
    return ["task=eval", f"model.name_or_path={model}", f"metrics.clip_model={clip}", f"eval.dataset={data}",
            f"metrics.cache_dir={cache}", "eval.num_images=6", "eval.steps=2", "eval.batch_size=4",
            "metrics.interval_groups=6", "eval.num_ref=null", "fabric.accelerator=cpu",
            "logger=none", f"hydra.run.dir={out}"]


@pytest.fixture(scope="module")
def eval_data(tmp_path_factory) -> Path:
    return generate(tmp_path_factory.mktemp("evaldata"), n=8, seed=5, striped=True, size=32)


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_sample_same_seed_same_image(tiny_model, tmp_path):
    outs = []
    for name, seeds in (("a", "[0,1]"), ("b", "[0,1]"), ("c", "[2,3]")):
        out = tmp_path / name
        cfg = compose_cfg(["task=sample", f"model.name_or_path={tiny_model}", "sample.steps=3",
                           f"sample.seeds={seeds}", "sample.prompts=[a red circle,a blue square]",
                           f"hydra.run.dir={out}"], out)
        assert sample_task.run(cfg)["num_images"] == 4
        outs.append(out)
    a, b, c = ([pixels(o / "samples" / f"{i:05d}.png") for i in range(4)] for o in outs)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))          # same settings + seeds: identical
    assert not any(np.array_equal(x, y) for x, y in zip(a, c))      # other seeds: different
    assert not np.array_equal(a[0], a[1])
    meta = json.loads((outs[0] / "samples" / "00001.json").read_text())
    assert meta["prompt"] == "a red circle" and meta["seed"] == 1 and meta["steps"] == 3
    assert meta["scheduler"] == "DDIMScheduler" and meta["versions"]["torch"]
    assert (outs[0] / "grid.png").is_file()


def test_eval_cache_protocol_and_sharding(tiny_model, tiny_clip, eval_data, tmp_path):
    cache = tmp_path / "cache"
    out1 = tmp_path / "e1"
    m1 = eval_task.run(compose_cfg(eval_overrides(tiny_model, tiny_clip, eval_data, cache, out1), out1))
    assert m1["n_real"] == 8 and m1["n_fake"] == 6
    assert m1["fid"] > 0 and m1["fid_ci_low"] <= m1["fid_ci_high"] and 0 <= m1["clip_score"] <= 100
    row = read_rows(out1 / "results.jsonl")[0]
    for k in ("weights_sha256", "resize", "input_range", "versions", "clip_model", "metric_impl"):
        assert k in row["protocol"]
    gen = Image.open(next((out1 / "samples").glob("*.png")))   # references compared at the generated size
    assert row["protocol"]["reference_size"] == list(gen.size) != [32, 32]   # eval_data images are 32 px
    for k in ("model", "adapters", "steps", "guidance_scale", "scheduler", "dataset", "seed", "num_images"):
        assert k in row["settings"]
    assert len(list(cache.glob("*.npy"))) == 2   # Inception and CLIP (CMMD) reference features
    assert set(row["protocol"]["reference_caches"]) == {"inception", "clip"} and m1["cmmd"] >= 0

    # second run: reference features come from the cache (and equal a recomputation)
    out2 = tmp_path / "e2"
    m2 = eval_task.run(compose_cfg(eval_overrides(tiny_model, tiny_clip, eval_data, cache, out2), out2))
    assert m2["seconds_reference"] < 0.5 * m1["seconds_reference"]
    assert m2["fid"] == pytest.approx(m1["fid"], rel=1e-9)

    # 2 processes (gloo), same settings: same images, same metrics
    out3 = tmp_path / "e3"
    res = run_entry(eval_overrides(tiny_model, tiny_clip, eval_data, cache, out3) +
                    ["fabric.devices=2", "fabric.strategy=ddp"])
    assert res.returncode == 0, res.stderr[-3000:]
    m3 = read_rows(out3 / "results.jsonl")[0]["metrics"]
    assert m3["n_fake"] == 6 and read_rows(out3 / "results.jsonl")[0]["protocol"]["world_size"] == 2
    # Same prompt, seed and batch members per image. The other process runs with another
    # intra-op thread count, so CPU reductions may round differently: at most a 1-level pixel
    # change on a few pixels (seen: 1 pixel of 6 images), never a different image.
    for i in range(6):
        a, b = (pixels(o / "samples" / f"{i:05d}.png").astype(int) for o in (out1, out3))
        assert np.abs(a - b).max() <= 1 and (a != b).mean() < 0.01
    # FID on 6 images (rank-5 covariance, ill-conditioned sqrtm) amplifies that float noise.
    assert m3["fid"] == pytest.approx(m1["fid"], rel=1e-3)
    assert m3["kid"] == pytest.approx(m1["kid"], rel=1e-3)
    assert m3["clip_score"] == pytest.approx(m1["clip_score"], rel=1e-5, abs=1e-6)
    assert m3["cmmd"] == pytest.approx(m1["cmmd"], rel=1e-3, abs=1e-6)

    # a changed dataset file invalidates the reference cache
    img = Image.open(eval_data / "00000.png")
    img.transpose(Image.Transpose.FLIP_TOP_BOTTOM).save(eval_data / "00000.png")
    out4 = tmp_path / "e4"
    eval_task.run(compose_cfg(eval_overrides(tiny_model, tiny_clip, eval_data, cache, out4), out4))
    assert len(list(cache.glob("*.npy"))) == 4


def test_clip_off_is_skipped_and_a_missing_clip_model_fails(tiny_model, eval_data, tmp_path):
    out = tmp_path / "e"
    m = eval_task.run(compose_cfg(eval_overrides(tiny_model, "null", eval_data, tmp_path / "c", out), out))
    assert "clip_score" not in m and "fid" in m
    assert read_rows(out / "results.jsonl")[0]["protocol"]["clip"] == "skipped"
    with pytest.raises(FileNotFoundError, match="metrics.clip_model=.*no local file or folder"):
        eval_task.run(compose_cfg(eval_overrides(tiny_model, str(tmp_path / "no-clip"), eval_data, tmp_path / "c",
                                                 tmp_path / "f"), tmp_path / "f"))


def test_sweep_resumes_and_summarizes(tiny_model, tiny_clip, eval_data, tmp_path):
    sweep = tmp_path / "sweep"
    base = eval_overrides(tiny_model, tiny_clip, eval_data, tmp_path / "cache", tmp_path / "unused")[:-1]
    base += [f"hydra.sweep.dir={sweep}", "eval.save_images=false"]
    # "interrupted" sweep: only part of the grid ran
    res = run_entry(["-m", *base, "eval.guidance_scale=1,3", "eval.seed=0"])
    assert res.returncode == 0, res.stderr[-3000:]
    assert len(read_rows(sweep / "results.jsonl")) == 2
    # the full sweep in the same dir computes only the missing cells
    res = run_entry(["-m", *base, "eval.guidance_scale=1,3", "eval.seed=0,1"])
    assert res.returncode == 0, res.stderr[-3000:]
    rows = read_rows(sweep / "results.jsonl")
    assert len(rows) == 4 and len({r["key"] for r in rows}) == 4
    assert res.stderr.count("already in") + res.stdout.count("already in") == 2

    res = run_entry(["task=summarize", f"sweep={sweep}", f"hydra.run.dir={tmp_path / 'sum'}"])
    assert res.returncode == 0, res.stderr[-3000:]
    lines = [ln for ln in (sweep / "summary.md").read_text().splitlines() if ln.startswith("|")]
    assert len(lines) == 2 + 2                   # header, rule, one row per guidance scale
    table = json.loads((sweep / "summary.json").read_text())["table"]
    assert [e["n_seeds"] for e in table] == [2, 2] and all("(t, 2 seeds)" in e["fid_ci"] for e in table)
    assert all(e["fid_ci_low"] <= e["fid"] <= e["fid_ci_high"] for e in table)
    assert (sweep / "fid_vs_clip.png").stat().st_size > 1000


def test_multirun_cells_are_separate_dashboard_runs_in_one_group(tiny_model, eval_data, tmp_path):
    from tests.wandb_offline import run_info

    sweep = tmp_path / "sweep"
    args = eval_overrides(tiny_model, "null", eval_data, tmp_path / "cache", tmp_path / "unused")[:-1]
    args = [a for a in args if a != "logger=none"]
    res = run_entry(["-m", *args, "logger=wandb", f"hydra.sweep.dir={sweep}", "eval.num_images=4",
                     "eval.guidance_scale=1,3", "eval.seed=0,1"])
    assert res.returncode == 0, res.stderr[-3000:]
    logs = sorted(sweep.glob("*/wandb/offline-run-*/run-*.wandb"))
    infos = [run_info(f) for f in logs]
    assert len(infos) == 4 and len({f.parent for f in logs}) == 4             # four runs, not one reused
    assert {i["group"] for i in infos} == {f"eval/{sweep.name}"} and {i["job_type"] for i in infos} == {"eval"}
    assert sorted(i["name"].split(":")[0] for i in infos) == ["0", "1", "2", "3"]
    assert all("eval_base/fid" in i["summary"] and any(t == "run_table" for t, _ in i["artifacts"]) for i in infos)
    assert "already in progress" not in res.stderr + res.stdout
    assert "wandb: WARNING" not in res.stderr + res.stdout                     # e.g. "the anonymous setting"


def test_a_reference_set_goes_through_the_data_policy(tiny_model, eval_data, tmp_path):
    """kohya layout with one caption file missing and one truncated image: both rejected and counted in
    the row's protocol, N the usable images, no prompt "None"."""
    import shutil

    refs = tmp_path / "refs"
    refs.mkdir()
    rows = [json.loads(line) for line in (eval_data / "metadata.jsonl").read_text().splitlines()]
    for r in rows:
        shutil.copy(eval_data / r["file_name"], refs / r["file_name"])
        (refs / r["file_name"]).with_suffix(".txt").write_text(r["text"])
    (refs / rows[0]["file_name"]).with_suffix(".txt").unlink()                      # no caption
    (refs / "truncated.png").write_bytes((eval_data / rows[1]["file_name"]).read_bytes()[:80])
    (refs / "truncated.txt").write_text("a caption for a broken file")
    out = tmp_path / "e"
    m = eval_task.run(compose_cfg(eval_overrides(tiny_model, "null", refs, tmp_path / "c", out), out))
    row = read_rows(out / "results.jsonl")[0]
    assert m["n_real"] == len(rows) - 1
    assert row["protocol"]["reference_scan"] == {"total": len(rows) + 1, "usable": len(rows) - 1, "converted": 0,
                                                 "rejected": {"missing caption": 1, "corrupt or truncated image": 1}}
    assert "None" not in json.dumps(row["per_prompt"])


def test_a_bad_held_out_image_is_rejected_by_the_training_runs_own_scan(tiny_model, tmp_path, monkeypatch):
    """eval.dataset=held_out reads the held-out rows through the scan the training run made of them
    (one cache key): the corrupt one is rejected, never evaluated; too few usable images for
    eval.num_ref stop a train-and-evaluate job before it trains."""
    from hydra.utils import instantiate

    import toolkit.data.datamodule as dm_module
    from tests.conftest import tiny_overrides
    from toolkit.data.sources import held_out
    from toolkit.evaluation.job import reference_set
    from toolkit.tasks import finetune_eval

    data = generate(tmp_path / "data", n=16, seed=4, size=32)
    bad = held_out(str(data), "train", None, 0.25, 0, "image", "text")[0]["image"]["path"]
    Path(bad).write_bytes(Path(bad).read_bytes()[:80])
    args = [*tiny_overrides(tiny_model, data, tmp_path / "run"), "task=finetune_eval", "eval.dataset=held_out",
            "metrics.clip_model=null", "eval.num_ref=4", f"paths.cache_dir={tmp_path / 'cache'}"]
    cfg = compose_cfg(args, tmp_path / "run")
    dm = instantiate(cfg.data)
    dm.setup("fit")                                    # the training run scans its held-out part
    assert len(dm.val_set) == 3
    monkeypatch.setattr(dm_module, "scan", lambda *a, **k: pytest.fail("the held-out set was scanned again"))
    with open_dict(cfg):
        cfg.eval.num_ref = 3
    refset = reference_set(cfg)
    assert len(refset.rows) == 3 and refset.scan["rejected"] == {"corrupt or truncated image": 1}
    assert bad not in [r["image"]["path"] for r in refset.rows]
    with pytest.raises(ValueError, match=r"eval.num_ref=4 but the held-out part .* has only 3 usable images"):
        finetune_eval.run(compose_cfg(args, tmp_path / "run"))
    assert not (tmp_path / "run" / "checkpoints").exists()   # refused before training
