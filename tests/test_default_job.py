"""The default job (train → eval base vs fine-tuned) end to end, reduced by debug=fast."""

import json

import pytest

from tests.conftest import run_entry
from toolkit.results import read_rows


def test_default_job_fast(tmp_path):
    """The default job, then the same on 2 DDP processes (gloo): one evaluation, sharded, written once.
    Both at one thread a process: another thread count rounds the last bits differently (an image's
    pixel one level off now and then; docs/distributed.md "Threads"), which is not what is compared."""
    threads = {"OMP_NUM_THREADS": "1"}
    out = tmp_path / "run"
    res = run_entry(["debug=fast", f"hydra.run.dir={out}", f"metrics.cache_dir={tmp_path / 'cache'}",
                     "logger=none"], timeout=900, env=threads)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (out / "adapter" / "pytorch_lora_weights.safetensors").is_file()
    rows = read_rows(out / "results.jsonl")
    assert len(rows) == 2 and [len(r["settings"]["adapters"]) for r in rows] == [0, 1]
    assert all(r["metrics"]["n_fake"] == 16 and r["metrics"]["n_real"] == 32 for r in rows)
    summary = (out / "summary.md").read_text()
    assert "FID ratio fine-tuned / base" in summary and "| metric | base [95% CI] | fine-tuned [95% CI] |" in summary
    assert all(f"| {k} |" in summary for k in ("fid", "cmmd", "clip_score", "vendi"))
    assert (out / "base_vs_finetuned.png").is_file() and (out / "report.html").is_file()
    for r in rows:   # every interval contains its estimate
        m = r["metrics"]
        assert all(m[f"{k}_ci_low"] <= m[k] <= m[f"{k}_ci_high"] for k in ("fid", "kid", "clip_score"))
        assert {"precision", "recall", "density", "coverage"} <= set(m) and r["per_prompt"]["prompt"]
    paired = json.loads((out / "paired.json").read_text())
    for k in ("fid", "kid", "clip_score"):
        d = paired[k]
        assert d["low"] <= d["delta"] <= d["high"] and 0 <= d["p_value"] <= 1 and d["verdict"]
        assert d["delta"] == pytest.approx(rows[1]["metrics"][k] - rows[0]["metrics"][k], rel=1e-6)

    # 2 processes: they train together, then evaluate once (sharded), rank zero alone writing; the
    # reference features are computed sharded too (a cache of their own).
    ddp = tmp_path / "ddp"
    res = run_entry(["debug=fast", f"hydra.run.dir={ddp}", f"metrics.cache_dir={tmp_path / 'cache_ddp'}",
                     "logger=none", "trainer=ddp", "trainer.devices=2"], timeout=900, env=threads)
    assert res.returncode == 0, res.stderr[-3000:]
    ddp_rows = read_rows(ddp / "results.jsonl")
    assert len(ddp_rows) == 2 and [len(r["settings"]["adapters"]) for r in ddp_rows] == [0, 1]
    assert all(r["protocol"]["world_size"] == 2 for r in ddp_rows)
    assert res.stdout.count("report: ") == 1 and res.stdout.count("# Fine-tune + evaluate") == 1
    assert sorted(p.name for p in (ddp / "eval_base" / "samples").glob("*.png")) == [f"{i:05d}.png" for i in range(16)]
    base, base_ddp = rows[0]["metrics"], ddp_rows[0]["metrics"]   # the base model: the same images either way
    assert all(base_ddp[k] == pytest.approx(base[k], rel=1e-6) for k in ("fid", "kid", "clip_score"))
    assert all((out / "eval_base" / "samples" / f.name).read_bytes() == f.read_bytes()
               for f in (ddp / "eval_base" / "samples").glob("*.png"))   # the same images, byte for byte
    assert json.loads((ddp / "paired.json").read_text())["fid"]["delta"] == pytest.approx(
        ddp_rows[1]["metrics"]["fid"] - base_ddp["fid"], rel=1e-6)
