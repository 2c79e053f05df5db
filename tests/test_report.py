"""The HTML report (toolkit/report, task=report): collection and table functions on fake-but-schema-correct
run/sweep dirs (written with the project's own writers: append_row, save_scan), and the rendered file
in a real headless Chromium (no console errors, no network, every image loaded, one table row and one
plot point per setting, header sorting), with a screenshot kept as a test artefact.

    python -m pytest -q tests/test_report.py
    REPORT_ARTIFACT_DIR=/tmp/shots python -m pytest -q tests/test_report.py     # also keep the screenshots there
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import compose_cfg
from toolkit.data.validate import ScanResult, save_scan
from toolkit.evaluation.summary import find_baseline, summarize_rows
from toolkit.hashing import settings_key
from toolkit.report import collect, detect, pareto_front, summary_entries, table_columns, write_report
from toolkit.report.collect import read_curves
from toolkit.report.figures import throughput
from toolkit.report.render import MAX_SIDE, image_uri
from toolkit.results import append_row
from toolkit.tasks import report as report_task

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
EVIL = "<b>evil</b>.png"   # a file name that must reach the page as text, never as markup

# The eval sweep: (lora_scale, seed) -> (fid, clip). Scale 0 has two seeds (t interval), the others one
# (its own interval over images). 0.5 dominates 0; 1 has the lowest FID: the Pareto front is {0.5, 1}.
SWEEP = {(0, 0): (298.0, 19.5), (0, 1): (302.0, 20.5), (0.5, 0): (250.0, 22.0), (1, 0): (240.0, 18.0)}
MEANS = {"lora_scale=[0]": (300.0, 20.0), "lora_scale=[0.5]": (250.0, 22.0), "lora_scale=[1]": (240.0, 18.0)}


def grid_png(path: Path, size: tuple[int, int] = (64, 64), seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.new("RGB", size)
    im.putdata([((x * 7 + seed * 50) % 256, (y * 5) % 256, (x * y + seed) % 256)
                for y in range(size[1]) for x in range(size[0])])
    im.save(path)
    return path


def default_job_metrics(fid: float, cell: int, tuned: bool) -> dict:
    """The default job's other metrics (metrics.compute = fid, kid, clip_score, prdc, vendi, cmmd), with
    numbers as wide as its report shows (4 significant digits, small and negative differences)."""
    k = 0.2031 + 0.0013 * cell if tuned else 0.3758
    m = {"kid": k, "kid_ci_low": k - 0.0084, "kid_ci_high": k + 0.0044, "cmmd": 2.17 - 0.0379 * tuned + 0.01 * cell,
         "precision": 0.0123 * tuned + 0.0004 * cell, "recall": 0.006 * tuned + 0.0011 * cell,
         "density": 0.004125 * tuned - 0.0003 * cell * tuned, "coverage": 0.0123 + 0.0007 * cell,
         "vendi": 4.703 - 0.02774 * tuned + 0.0131 * cell}
    m.update({"cmmd_ci_low": m["cmmd"] - 0.659, "cmmd_ci_high": m["cmmd"] + 0.66,
              "vendi_ci_low": m["vendi"] - 0.5441, "vendi_ci_high": m["vendi"] + 0.5448})
    return m


def result_row(run_dir: Path, adapters: list, lora_scale: float, seed: int, fid: float, clip: float,
               train: dict | None = None, extra: dict | None = None) -> dict:
    settings = {"adapters": adapters, "lora_scale": [lora_scale], "seed": seed, "guidance_scale": 5.0, "steps": 4,
                "scheduler": "DDIMScheduler", "num_images": 16, "num_ref": 32, "dataset": "files:0123",
                "model": {"name_or_path": "tiny", "dtype": "float32"}, "prompts": "dataset captions"}
    if train is not None:   # a row of a model trained in the run: its training settings, as finetune_eval writes
        settings["train"] = train
    metrics = {"fid": fid, "fid_ci_low": fid - 10, "fid_ci_high": fid + 12, "kid": fid / 1000,
               "kid_ci_low": fid / 1000 - 0.01, "kid_ci_high": fid / 1000 + 0.01, "kid_std": 0.01,
               "clip_score": clip, "clip_score_ci_low": clip - 1, "clip_score_ci_high": clip + 1.5, "n_fake": 16,
               "n_real": 32, **(extra or {})}
    return {"key": settings_key(settings), "settings": settings, "metrics": metrics, "time": "2026-01-01T00:00:00",
            "protocol": {"feature_extractor": "tf-inception-v3 pool3 (2048-d)", "reference_size": [32, 32]},
            "run_dir": str(run_dir)}


def make_eval_sweep(root: Path) -> Path:
    (root / "multirun.yaml").parent.mkdir(parents=True, exist_ok=True)
    (root / "multirun.yaml").write_text("hydra:\n  mode: MULTIRUN\ntask_name: eval\n")
    for i, ((scale, seed), (fid, clip)) in enumerate(SWEEP.items()):
        cell = root / str(i)
        grid_png(cell / "grid.png", (128, 32), seed=i)
        (cell / ".hydra").mkdir(parents=True)
        (cell / ".hydra/overrides.yaml").write_text(f"- eval.lora_scale={scale}\n- eval.seed={seed}\n")
        append_row(root / "results.jsonl", result_row(cell, [{"path": "/runs/a/adapter", "sha256": "abcdef0123"}],
                                                      scale, seed, fid, clip))
    return root


METRICS_CSV = """epoch,lr-AdamW,step,train/batches,train/grad_norm,train/loss,train/samples,train/time,val/loss
,0.0,0,,,,,,
0,,0,1,,,16,0.5,
0,,0,,0.5,0.34,,,
,5e-05,1,,,,,,
0,,1,2,,,32,1.0,
0,,1,,0.3,0.20,,,
0,,1,,,,,,0.24
,0.0001,2,,,,,,
0,,2,3,,,48,1.25,
0,,2,,0.4,0.26,,,
"""


def make_train_run(d: Path, seed: int = 0, r: int | None = None) -> Path:
    r = 4 * (seed + 1) if r is None else r
    (d / ".hydra").mkdir(parents=True, exist_ok=True)
    (d / ".hydra/config.yaml").write_text(f"seed: {seed}\nmodule:\n  lora:\n    r: {r}\n")
    (d / ".hydra/overrides.yaml").write_text(f"- debug=fast\n- module.lora.r={r}\n- seed={seed}\n")
    (d / "train_metrics.json").write_text(json.dumps({"train/loss": 0.26, "global_step": 3}))
    (d / "csv/version_0").mkdir(parents=True)
    (d / "csv/version_0/metrics.csv").write_text(METRICS_CSV)
    for step in (1, 2, 3):
        grid_png(d / "samples" / f"step={step}.png", seed=step + seed)
    (d / "adapter").mkdir()
    (d / "adapter/pytorch_lora_weights.safetensors").write_bytes(b"")
    save_scan(ScanResult(keep=list(range(8)), total=10,
                         rejected=[{"item": EVIL, "reason": "corrupt or truncated image", "detail": "truncated"},
                                   {"item": "b.jpg", "reason": "empty file", "detail": "0 bytes"}],
                         converted=[{"item": "c.png", "what": "converted from CMYK"}], sizes=[[32, 32]] * 8),
              d / "data_report_train.json")
    return d


def make_train_eval_sweep(root: Path, r: int | None = None, all_metrics: bool = False) -> Path:
    """Two cells of the default job (module.lora.r=4, 8, or both ``r`` with seeds 0 and 1): each a
    training run with its own results.jsonl, where the base model's row is the same cell (same key) in both;
    ``all_metrics``: with every metric the default job computes."""
    for i, (fid, clip) in enumerate(((238.7, 79.15), (236.1, 78.9)) if all_metrics else ((230.0, 21.0), (220.0, 19.0))):
        cell = make_train_run(root / str(i), seed=i, r=r)
        for name, adapters, (f, c) in (("base", [], (363.8, 65.88) if all_metrics else (300.0, 20.0)),
                                       ("finetuned", [{"path": str(cell / "adapter"), "sha256": f"{i}" * 16}],
                                        (fid, clip))):
            grid_png(cell / f"eval_{name}" / "grid.png", (128, 32), seed=i)
            train = {"seed": i, "module": {"seed": i, "lora": {"r": r or 4 * (i + 1)}},
                     "data": {"path": "/d", "resolution": 32}}
            extra = default_job_metrics(f, i, bool(adapters)) if all_metrics else None
            append_row(cell / "results.jsonl", result_row(cell / f"eval_{name}", adapters, 1.0, 0, f, c,
                                                          train if adapters else None, extra))
        grid_png(cell / "base_vs_finetuned.png", (128, 64))
    return root


# ---------------------------------------------------------------- collection and table functions


def test_detect_kinds(tmp_path):
    sweep = make_eval_sweep(tmp_path / "sweep")
    tes = make_train_eval_sweep(tmp_path / "tes")
    train = make_train_run(tmp_path / "train")
    assert detect(sweep) == "eval_sweep"
    assert detect(tes) == "train_eval_sweep"
    assert detect(tes / "0") == "finetune_eval"
    assert detect(train) == "train"
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="neither a training run"):
        detect(tmp_path / "empty")


def test_read_curves_skips_blanks_and_derives_throughput(tmp_path):
    curves = read_curves(make_train_run(tmp_path / "run"))
    assert curves["train/loss"] == [(0, 0.34), (1, 0.20), (2, 0.26)]
    assert curves["val/loss"] == [(1, 0.24)]
    assert curves["lr-AdamW"] == [(0, 0.0), (1, 5e-05), (2, 0.0001)]
    assert "epoch" not in curves and "step" not in curves
    assert throughput(curves) == [(1, 32.0), (2, 64.0)]   # 16 images in 0.5 s, then in 0.25 s


def test_summary_entries_intervals_pareto_baseline(tmp_path):
    rows = collect(make_eval_sweep(tmp_path / "sweep")).rows
    varying, entries = summary_entries(rows)
    assert varying == ["lora_scale"]
    by = {e["lora_scale"]: e for e in entries}
    assert by["[0]"]["n_seeds"] == 2 and by["[0]"]["fid"] == pytest.approx(300.0)
    assert math.isfinite(by["[0]"]["fid_ci_low"]) and "2 seeds" in by["[0]"]["fid_ci"]   # t across 2 seeds
    assert (by["[1]"]["fid_ci_low"], by["[1]"]["fid_ci_high"]) == (230.0, 252.0)   # the row's interval
    assert (by["[1]"]["clip_score_ci_low"], by["[1]"]["clip_score_ci_high"]) == (17.0, 19.5)
    assert {k: e["pareto"] for k, e in by.items()} == {"[0]": False, "[0.5]": True, "[1]": True}
    assert by["[0]"]["baseline"] and not by["[1]"].get("baseline")                # scale 0 = the base model
    assert by["[1]"]["delta_fid"] == pytest.approx(-60.0)                           # plain difference of means
    with pytest.raises(ValueError, match="matches 0 settings"):
        summary_entries(rows, baseline="lora_scale=[7]")
    _, entries = summary_entries(rows, baseline="lora_scale=[1]")
    assert next(e for e in entries if e.get("baseline"))["lora_scale"] == "[1]"


def test_fine_tuned_vs_base_table_shows_what_was_varied(tmp_path):
    """The default job's table: base vs fine-tuned, Δ against the base — not one column per training
    setting the base row lacks (they pushed the metrics off the page)."""
    tes = make_train_eval_sweep(tmp_path / "tes")
    varying, entries = summary_entries(collect(tes / "0").rows)
    assert varying == ["adapters"]
    base, tuned = sorted(entries, key=lambda e: not e.get("baseline"))
    assert base["adapters"] == "base (no adapter)" and base["baseline"]
    assert tuned["adapters"] == "fine-tuned (trained in the run)" and tuned["delta_fid"] == pytest.approx(-70.0)
    varying, entries = summary_entries(collect(tes).rows)             # two cells: r = 4 and r = 8
    assert varying == ["adapters", "run", "train.module.lora.r"] and len(entries) == 3   # run: the cell's overrides
    reps = make_train_eval_sweep(tmp_path / "reps", r=4)               # two cells: r = 4, seeds 0 and 1
    varying, entries = summary_entries(collect(reps).rows)
    assert varying == ["adapters"] and [e["n_seeds"] for e in entries] == [1, 2]   # one setting, two seeds


def test_training_seeds_and_what_derives_from_them_are_replicates(tmp_path):
    """Two training seeds of one setting are one table row with n_seeds 2, also when the training
    config carries values derived from the seed (the module's ``seed`` / ``val_seed``)."""
    rows = [result_row(tmp_path, [], 1.0, 0, 300.0, 20.0)]
    for seed, fid in ((0, 230.0), (1, 220.0)):
        train = {"seed": seed, "module": {"seed": seed, "val_seed": seed + 7, "lora": {"r": 4}}}
        rows.append(result_row(tmp_path, [{"path": f"/runs/{seed}/adapter", "sha256": f"{seed}" * 16}], 1.0, 0, fid,
                               21.0, train))
    varying, entries = summarize_rows(rows, "base")
    assert varying == ["adapters"] and [e["n_seeds"] for e in entries] == [1, 2]
    assert entries[1]["fid"] == pytest.approx(225.0) and entries[1]["delta_method"] == "paired t across 2 seeds"
    for seed, fid in ((0, 240.0), (1, 226.0)):   # a second setting, same two seeds: Δ vs r=4 pairs seed with seed
        train = {"seed": seed, "module": {"seed": seed, "val_seed": seed + 7, "lora": {"r": 8}}}
        rows.append(result_row(tmp_path, [{"path": f"/runs/8{seed}/adapter", "sha256": "8" * 16}], 1.0, 0, fid, 21.0,
                               train))
    _, entries = summarize_rows(rows, "r=4")
    r8 = next(e for e in entries if e.get("train.module.lora.r") == "8")
    assert r8["delta_fid"] == pytest.approx(8.0)          # (240 − 230 + 226 − 220) / 2, not against one seed


def test_two_base_settings_leave_the_baseline_open_and_repeated_cells_count_once(tmp_path):
    """A sweep with two adapter-free settings (e.g. two guidance scales) has no single base: no Δ
    columns unless baseline= names one, instead of an error; a cell evaluated again (same key) is one
    row, the newer, not a second seed."""
    rows = [result_row(tmp_path, [], 1.0, 0, 300.0, 20.0), result_row(tmp_path, [], 1.0, 0, 310.0, 20.0)]
    rows[1]["settings"]["guidance_scale"] = 7.0
    rows[1]["key"] = settings_key(rows[1]["settings"])
    rows.append(result_row(tmp_path, [{"path": "/runs/a/adapter", "sha256": "a" * 16}], 1.0, 0, 230.0, 21.0))
    again = result_row(tmp_path, [{"path": "/runs/a/adapter", "sha256": "a" * 16}], 1.0, 0, 240.0, 21.0)
    _, entries = summary_entries([*rows, again])
    assert len(entries) == 3 and not any(e.get("baseline") for e in entries)
    tuned = next(e for e in entries if e["fid"] > 200 and e["fid"] < 300)
    assert tuned["n_seeds"] == 1 and tuned["fid"] == 240.0


def test_reference_statistics_are_computed_once_per_file(tmp_path):
    from toolkit.evaluation import reference
    from toolkit.metrics.intervals import Reference

    feats = np.random.default_rng(0).normal(size=(40, 16))
    path = reference.save_cached(tmp_path, "ref", feats)
    first = reference.statistics(path)
    assert reference.statistics(path) is first                                  # reused, not recomputed
    want = Reference.from_features(feats)
    assert np.array_equal(first.sigma_sqrt, want.sigma_sqrt) and first.kxx_mean == want.kxx_mean


def test_table_columns_reads_generic_fields():
    """Fields the statistics may add later (a new metric, flags) become columns; a Δ (with CI and p-value)
    goes under its metric, in the same cell; the baseline is the highlighted row, not a column."""
    entries = [{"adapter": "a", "n_seeds": 3, "n_images": 100, "fid": 10.0, "fid_ci_low": 9.0, "fid_ci_high": 11.5,
                "delta_fid": -2.0, "delta_fid_ci_low": -3.0, "delta_fid_ci_high": -1.0, "delta_fid_p": 0.003,
                "precision": 0.7, "precision_half": 0.05, "delta_precision": 0.01, "delta_precision_ci_low": -0.02,
                "delta_precision_ci_high": 0.04, "pareto": True},
               {"adapter": "b", "n_seeds": 3, "n_images": 100, "fid": 12.0, "fid_ci_low": 11.0, "fid_ci_high": 13.0,
                "precision": float("nan"), "pareto": False, "baseline": True}]
    cols, recs = table_columns(entries, ["adapter"])
    assert [c["key"] for c in cols] == ["adapter", "n_images", "n_seeds", "fid", "precision", "pareto"]
    a, b = (r["cells"] for r in recs)
    assert (a["fid"]["text"], a["fid"]["sub"], a["fid"]["sort"]) == ("10", "[9, 11.5]", 10.0)
    d = a["fid"]["delta"]
    assert (d["text"], d["sub"], d["mark"], d["title"]) == ("-2", "[-3, -1]", "**", "p = 0.003")
    assert a["precision"]["sub"] == "[0.65, 0.75]"                  # from the half-width
    assert a["precision"]["delta"]["mark"] == ""                    # its CI contains 0
    assert (b["precision"]["text"], b["precision"]["sort"]) == ("—", "")
    assert b["fid"]["delta"] is None and (a["pareto"]["text"], b["pareto"]["text"]) == ("✓", "")   # b: the baseline
    assert [r["baseline"] for r in recs] == [False, True] and recs[0]["label"] == "adapter=a"


def test_pareto_front():
    pts = [(300, 20), (250, 22), (240, 18), (260, 22), (None, 30), (240, 18)]
    assert pareto_front(pts) == {1, 2, 5}   # (260, 22) is beaten by (250, 22); ties both stay


def test_find_baseline_needs_a_varying_key():
    with pytest.raises(ValueError, match="not a varying setting"):
        find_baseline([{"a": "1"}], ["a"], [[{}]], "b=1")


def test_train_eval_sweep_dedupes_base_and_labels_cells(tmp_path):
    c = collect(make_train_eval_sweep(tmp_path / "tes"))
    assert len(c.rows) == 3                                       # base row once, not once per cell
    labels = sorted(r["settings"].get("run", "-") for r in c.rows)
    assert labels == ["-", "module.lora.r=4", "module.lora.r=8"]  # overrides not shared by all cells
    base = next(r for r in c.rows if "run" not in r["settings"])
    assert base["settings"]["adapters"] == "base (no adapter)"
    assert len(c.eval_grids) == 3 and len(c.runs) == 2 and len(c.extra_grids) == 2
    assert [s for s, _ in c.runs[0].samples] == [1, 2, 3]
    assert c.runs[0].data_reports["train"]["counts"] == {"corrupt or truncated image": 1, "empty file": 1}


def test_image_uri_downscales_large_grids(tmp_path):
    big = image_uri(grid_png(tmp_path / "big.png", (2400, 600)))
    assert (big["width"], big["height"]) == (MAX_SIDE, MAX_SIDE // 4) and big["uri"].startswith("data:image/jpeg")
    small = image_uri(grid_png(tmp_path / "small.png", (64, 32)))
    assert (small["width"], small["height"]) == (64, 32) and small["uri"].startswith("data:image/png")


def test_train_run_report_and_escaping(tmp_path):
    run = make_train_run(tmp_path / "train")
    (run / "csv").rename(run / "csv_off")
    html = write_report(run).read_text()
    assert 'id="results-table"' not in html and "no CSV log" in html      # no rows, no curves: said so
    assert "&lt;b&gt;evil&lt;/b&gt;.png" in html and EVIL not in html      # autoescaped
    assert "<script src=" not in html and "<link " not in html             # nothing fetched


def test_task_entry_writes_report(tmp_path, capsys):
    sweep = make_eval_sweep(tmp_path / "sweep")
    cfg = compose_cfg(["task=report", f"report.dir={sweep}", "report.title=My sweep"], tmp_path / "hydra")
    out = report_task.run(cfg)
    assert out["report"] == str(sweep / "report.html") and out["kind"] == "eval_sweep" and out["rows"] == 4
    assert str(sweep / "report.html") in capsys.readouterr().out
    assert "<title>My sweep</title>" in (sweep / "report.html").read_text()


# ---------------------------------------------------------------- the rendered file in a real browser


@pytest.fixture(scope="module")
def browser():
    missing = None
    if not CHROMIUM.is_file():
        missing = f"no Chromium at {CHROMIUM}: install the Debian package (apt-get install -y chromium)"
    else:
        try:
            from playwright.sync_api import sync_playwright
        except ImportError:
            missing = "the playwright Python package is not installed (pip install -e '.[dev]')"
    if missing:
        if os.environ.get("CI_REQUIRE_BROWSER") == "1":
            pytest.fail(f"CI_REQUIRE_BROWSER=1 but {missing}")
        pytest.skip(f"{missing}; the report's browser test needs it (CI sets CI_REQUIRE_BROWSER=1)")
    with sync_playwright() as p:
        # Debian's Chromium, never Playwright's downloaded build; Playwright gives each launch a fresh profile.
        b = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


def open_report(browser, path: Path, width: int = 1366):
    page = browser.new_page(viewport={"width": width, "height": 800})
    problems, requests = [], []
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}")
            if m.type in ("error", "warning") or "WARN" in m.text else None)
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.route("**/*", lambda route: route.continue_() if route.request.url.startswith(("file:", "data:"))
               else (requests.append(route.request.url), route.abort()))
    page.goto(path.as_uri(), wait_until="load")
    page.wait_for_function("document.getElementById('fig-scatter') && document.getElementById('fig-scatter').data")
    return page, problems, requests


def screenshot(page, tmp_path: Path, name: str) -> None:
    shot = tmp_path / f"{name}.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    if os.environ.get("REPORT_ARTIFACT_DIR"):
        Path(os.environ["REPORT_ARTIFACT_DIR"]).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(os.environ["REPORT_ARTIFACT_DIR"]) / shot.name)


def assert_close(got: dict[str, tuple], want: dict[str, tuple], rel: float) -> None:
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k] == pytest.approx(want[k], rel=rel), k


def check_page(page, problems, requests, expected: dict[str, tuple[float, float]]) -> None:
    assert problems == [] and requests == []
    images = page.evaluate("Array.from(document.images, i => [i.complete, i.naturalWidth])")
    assert images and all(done and w > 0 for done, w in images)
    rows = page.evaluate("""Array.from(document.querySelectorAll('#results-table tbody tr'), tr => [
        tr.dataset.setting, tr.querySelector('td[data-key=fid] .v').textContent,
        tr.querySelector('td[data-key=clip_score] .v').textContent])""")
    assert len(rows) == len(expected)
    assert_close({s: (float(f), float(c)) for s, f, c in rows}, expected, rel=1e-3)   # 4 significant digits
    traces = page.evaluate("""Array.from(document.getElementById('fig-scatter').data,
        t => ({name: t.name, x: Array.from(t.x), y: Array.from(t.y), text: t.text}))""")
    points = next(t for t in traces if t["name"] == "settings")
    assert len(points["x"]) == len(expected)
    got = {text.split("<br>")[0]: (y, x) for text, x, y in zip(points["text"], points["x"], points["y"])}
    assert_close(got, expected, rel=1e-9)                     # hover text = the setting, at (CLIP, FID)
    assert page.locator(".plot .main-svg").count() >= 1         # plotly actually drew


def test_eval_sweep_report_in_browser(browser, tmp_path):
    sweep = make_eval_sweep(tmp_path / "sweep")
    page, problems, requests = open_report(browser, write_report(sweep))
    check_page(page, problems, requests, MEANS)
    assert page.locator("#fig-scatter .scatterlayer .trace").count() == 2   # the points + the Pareto line
    header = page.locator("#results-table th", has_text="fid").first
    fid_order = "Array.from(document.querySelectorAll('#results-table td[data-key=fid]'), td => +td.dataset.sort)"
    header.click()
    assert page.evaluate(fid_order) == pytest.approx([240.0, 250.0, 300.0])
    header.click()
    assert page.evaluate(fid_order) == pytest.approx([300.0, 250.0, 240.0])
    screenshot(page, tmp_path, "report-eval-sweep")
    page.close()


def test_train_eval_sweep_report_in_browser(browser, tmp_path):
    root = make_train_eval_sweep(tmp_path / "tes")
    page, problems, requests = open_report(browser, write_report(root))
    expected = {"adapters=base (no adapter)": (300.0, 20.0),
                "adapters=fine-tuned (trained in the run), run=module.lora.r=4, r=4": (230.0, 21.0),
                "adapters=fine-tuned (trained in the run), run=module.lora.r=8, r=8": (220.0, 19.0)}
    check_page(page, problems, requests, expected)
    assert page.locator(".strip img").count() == 6                       # 3 training grids per run
    assert page.locator("[id^=fig-curve-] .main-svg").count() >= 4       # loss, lr, grad norm, img/s
    assert page.locator("details.data-report").count() == 2
    screenshot(page, tmp_path, "report-train-eval-sweep")
    page.close()


def table_overflow(page) -> list[str]:
    """Header cells whose right edge lies outside the results card's content box, and any sideways scroll."""
    return page.evaluate("""(() => {
        const card = document.getElementById('results'), style = getComputedStyle(card);
        const right = card.getBoundingClientRect().right - parseFloat(style.borderRightWidth)
                      - parseFloat(style.paddingRight);
        const out = Array.from(document.querySelectorAll('#results-table th'))
            .filter(th => th.getBoundingClientRect().right > right + 0.5)
            .map(th => `${th.textContent} ends at ${th.getBoundingClientRect().right} > ${right}`);
        if (card.scrollWidth > card.clientWidth) out.push(`scrolls: ${card.scrollWidth} > ${card.clientWidth}`);
        return out; })()""")


@pytest.mark.parametrize("width", [1280, 1366])
def test_every_metric_of_the_default_job_fits_the_card(browser, tmp_path, width):
    """The default job with two training seeds: its nine metrics, each with an interval and a Δ with an
    interval beneath (wider than one seed's table: every metric gets a t interval), no sideways scrolling."""
    page, problems, _ = open_report(browser, write_report(make_train_eval_sweep(tmp_path / "tes", 4, True)), width)
    assert problems == []
    heads = page.evaluate("Array.from(document.querySelectorAll('#results-table th'), th => th.textContent)")
    metrics = ["fid", "kid", "clip_score", "precision", "recall", "density", "coverage", "vendi", "cmmd"]
    assert set(metrics) <= set(heads)
    deltas = page.evaluate("Array.from(document.querySelectorAll('#results-table td .delta .dv'), e => e.textContent)")
    assert len(deltas) == 5   # the fine-tuned row's Δ of fid, kid, clip_score, vendi and cmmd (PRDC: no Δ)
    assert table_overflow(page) == []
    screenshot(page, tmp_path, f"report-default-job-metrics-{width}")
    page.close()
