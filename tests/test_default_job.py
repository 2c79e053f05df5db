"""The default job (train → eval base vs fine-tuned) end to end, reduced by debug=fast."""

from tests.conftest import run_entry
from toolkit.results import read_rows


def test_default_job_fast(tmp_path):
    out = tmp_path / "run"
    res = run_entry(["debug=fast", f"hydra.run.dir={out}", f"metrics.cache_dir={tmp_path / 'cache'}",
                     "logger=none"], timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (out / "adapter" / "pytorch_lora_weights.safetensors").is_file()
    rows = read_rows(out / "results.jsonl")
    assert len(rows) == 2 and [len(r["settings"]["adapters"]) for r in rows] == [0, 1]
    assert all(r["metrics"]["n_fake"] == 16 and r["metrics"]["n_real"] == 32 for r in rows)
    summary = (out / "summary.md").read_text()
    assert "FID ratio fine-tuned / base" in summary and "| fine-tuned |" in summary
    assert (out / "base_vs_finetuned.png").is_file()
