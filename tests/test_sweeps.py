"""A train-and-evaluate sweep is the unit of a study: every cell (keyed by its whole identity) trains
and evaluates into one table, a re-run skips finished cells and resumes an interrupted cell's training
exactly, a folder holding another cell's training is refused (never reused), and the summary compares
every setting with the base model, paired."""

from __future__ import annotations

import json
import shutil

import torch
from safetensors.torch import load_file

from tests.conftest import run_entry
from toolkit.results import read_rows
from toolkit.run.history import history


def sweep_args(model: str, clip: str, data, evaldata, sweep, cache) -> list[str]:
    return ["-m", "task=finetune_eval", f"model.name_or_path={model}", f"data.path={data}", "data.resolution=16",
            "data.global_batch_size=4", "data.val_fraction=0.25", "logger=none", "trainer.max_steps=4",
            "trainer.val_check_interval=2", "trainer.limit_val_batches=1", "trainer.enable_progress_bar=false",
            "callbacks.model_checkpoint.every_n_train_steps=2", "callbacks.sample_grid.every_n_steps=0",
            "callbacks.sample_grid.steps=2", "module.optimizer.lr=1e-2", f"metrics.clip_model={clip}",
            f"eval.dataset={evaldata}", "eval.num_images=8", "eval.num_ref=null", "eval.steps=2",
            "eval.batch_size=8", "fabric.accelerator=cpu", f"metrics.cache_dir={cache}", f"hydra.sweep.dir={sweep}",
            "trainer.gradient_clip_val=1.0,0.01"]   # a key the cell's key once left out: two cells, two rows


def test_train_and_evaluate_sweep_resumes_and_summarizes(tiny_model, tiny_clip, imagefolder_data, tmp_path):
    from miniature.world import generate

    evaldata = generate(tmp_path / "evaldata", n=8, seed=5, striped=True, size=32)
    sweep, cache = tmp_path / "sweep", tmp_path / "cache"
    args = sweep_args(tiny_model, tiny_clip, imagefolder_data, evaldata, sweep, cache)
    res = run_entry(args, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = read_rows(sweep / "results.jsonl")
    trained = [r for r in rows if r.get("train")]
    assert len(rows) == 3 and len(trained) == 2                   # the base model evaluated once
    assert sorted(r["train"]["settings"]["trainer"]["gradient_clip_val"] for r in trained) == [0.01, 1.0]
    assert len({r["metrics"]["fid"] for r in trained}) == 2       # each row its own cell's numbers
    for cell in ("0", "1"):   # cell 1 pairs with the base row it read back from the table
        assert "not_paired" not in json.loads((sweep / cell / "paired.json").read_text())
    assert all(r["train"]["metrics"]["global_step"] == 4 and r["settings"]["adapters"][0]["sha256"] for r in trained)
    first_adapter = load_file(sweep / "1" / "adapter" / "pytorch_lora_weights.safetensors")

    # cell 1 "interrupted" after its step-2 checkpoint: no final adapter, no result row
    (sweep / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows
                                                 if (r.get("train") or {}).get("run_dir") != str(sweep / "1")))
    shutil.rmtree(sweep / "1" / "adapter")
    (sweep / "1" / "train_metrics.json").unlink()
    shutil.copy(sweep / "1" / "checkpoints" / "step=2.ckpt", sweep / "1" / "checkpoints" / "last.ckpt")
    (sweep / "1" / "checkpoints" / "step=4.ckpt").unlink()
    step2 = (sweep / "1" / "checkpoints" / "step=2.ckpt").stat().st_mtime_ns
    res = run_entry(args, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    log = res.stdout + res.stderr
    assert "already in" in log and "resuming from its last checkpoint" in log
    assert (sweep / "1" / "checkpoints" / "step=2.ckpt").stat().st_mtime_ns == step2   # steps 1-2 not redone
    assert (sweep / "1" / "checkpoints" / "step=4.ckpt").is_file()
    events = [(h["event"], h.get("ckpt_path")) for h in history(sweep / "1")]
    assert events == [("start", None), ("rerun", None), ("resume", "last")]   # the cell's record says what happened
    assert [h["event"] for h in history(sweep / "0")] == ["start", "rerun"]
    again = read_rows(sweep / "results.jsonl")
    assert len(again) == 3
    resumed = load_file(sweep / "1" / "adapter" / "pytorch_lora_weights.safetensors")
    assert resumed.keys() == first_adapter.keys()
    assert all(torch.equal(resumed[k], first_adapter[k]) for k in resumed)   # exact resume

    res = run_entry(["task=summarize", f"sweep={sweep}", "baseline=base", f"hydra.run.dir={tmp_path / 's'}"])
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((sweep / "summary.json").read_text())
    entries = summary["table"]
    assert len(entries) == 3 and sum(e["baseline"] for e in entries) == 1
    for e in entries:
        if not e["baseline"]:
            assert e["delta_method"] == "paired jackknife over images"
            assert e["delta_fid_ci_low"] <= e["delta_fid"] <= e["delta_fid_ci_high"] and 0 <= e["delta_fid_p"] <= 1
    assert any(e["pareto"] for e in entries) and (sweep / "fid_vs_clip.png").is_file()
    assert "Δfid" in (sweep / "summary.md").read_text() and "gradient_clip_val" in (sweep / "summary.md").read_text()

    # the sweep dir again with other values: cell 0 (now 0.5) finds cell 0 of the first sweep (1.0) in its
    # folder: refused, naming the key; the folder's record and Hydra's first files are left as they were
    first_record = (sweep / "0" / ".hydra" / "config.yaml").read_text()
    res = run_entry([*args[:-1], "trainer.gradient_clip_val=0.5,0.01"], timeout=900)
    assert res.returncode != 0
    assert "trainer.gradient_clip_val: recorded 1.0, now 0.5" in res.stdout + res.stderr
    assert (sweep / "0" / ".hydra" / "config.yaml").read_text() == first_record
    assert (sweep / "0" / ".hydra" / "rerun-2" / "config.yaml").is_file()   # this attempt's own record
    assert len(read_rows(sweep / "results.jsonl")) == 3


def test_cells_as_separate_jobs_write_one_row_each_and_a_rerun_adds_none(tiny_model, tiny_clip, tmp_path):
    """hydra/launcher=local (submitit's local executor): the two cells run as two processes at once
    and append to one table; the same sweep again finds both cells and computes nothing."""
    from miniature.world import generate
    from tests.test_eval import eval_overrides

    evaldata = generate(tmp_path / "evaldata", n=8, seed=5, striped=True, size=32)
    sweep = tmp_path / "sweep"
    args = ["-m", *eval_overrides(tiny_model, tiny_clip, evaldata, tmp_path / "cache", tmp_path / "unused")[:-1],
            f"hydra.sweep.dir={sweep}", "eval.save_images=false", "hydra/launcher=local", "eval.seed=0,1"]
    res = run_entry(args, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = read_rows(sweep / "results.jsonl")
    assert len(rows) == 2 and sorted(r["settings"]["seed"] for r in rows) == [0, 1]
    jobs = [p.name for p in (sweep / ".submitit").iterdir() if p.name.isdigit()]
    assert len(jobs) == 2   # each cell its own submitit job (a process of its own: the id is its pid)
    res = run_entry(args, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    assert len(read_rows(sweep / "results.jsonl")) == 2


def test_concurrent_appends_of_one_cell_keep_one_row(tmp_path):
    """Four processes finishing the same cell at once (two submissions of one sweep): one row."""
    import multiprocessing as mp

    table = tmp_path / "results.jsonl"
    ctx = mp.get_context("spawn")
    with ctx.Pool(4) as pool:
        written = pool.starmap(_append, [(str(table), "cell-a", i) for i in range(4)] +
                               [(str(table), f"cell-{i}", i) for i in range(8)])
    rows = read_rows(table)
    assert sum(written[:4]) == 1 and all(written[4:])
    assert sorted(r["key"] for r in rows) == sorted({"cell-a", *(f"cell-{i}" for i in range(8))})


def _append(table: str, key: str, i: int) -> bool:
    from toolkit.results import append_new_row

    return append_new_row(table, {"key": key, "writer": i, "pad": "x" * 100_000})
