"""Task ``finetune_eval`` (the default job): fine-tune an adapter, then evaluate base vs fine-tuned.

    python run.py                       # the embedded miniature on the "striped" style, ~5 min on 2 CPU cores
    python run.py -m task=finetune_eval module.lora.r=4,8,16 module.optimizer.lr=1e-4,3e-4 seed=0,1,2
    python run.py task=summarize sweep=multirun/finetune_eval/<time> baseline=base

1. ``train``: an adapter on ``data`` (the style set's train split);
2. ``eval`` twice against ``eval.dataset`` (the held-out style split), same prompts and seeds:
   the base model (no adapter) and base + the new adapter;
3. ``summary.md``: the FID/KID/CLIP table with intervals, fine-tuned − base with paired
   intervals and p-values, a grid with base (top) vs fine-tuned (bottom) images for the same
   prompts and seeds; and ``report.html`` (``toolkit.report``).

A multirun is a train-and-evaluate sweep: every cell appends its rows (with its training run's
identity, the adapter hash and the training metrics) to ``<sweep dir>/results.jsonl``. A cell is
keyed by its identity (``toolkit.run.identity``: the whole config but what cannot change a
number), so running the same sweep again (``hydra.sweep.dir=<that dir>``) skips finished cells,
resumes a cell whose training was interrupted from its last checkpoint, evaluates the shared base
model once, and refuses a folder that holds another cell's training.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, open_dict
from PIL import Image

from toolkit.evaluation.job import attach_to_loggers, evaluate, reference_set, results_path
from toolkit.evaluation.pairing import pair
from toolkit.evaluation.render import finetune_markdown
from toolkit.inference.pipeline import make_grid
from toolkit.report import write_report
from toolkit.results import read_rows, without_identity
from toolkit.run import lifecycle, signals
from toolkit.run.identity import Identity, identity
from toolkit.training.fit import train

log = logging.getLogger(__name__)


def comparison_grid(base_dir: Path, tuned_dir: Path, n: int, out: Path) -> Path | None:
    names = sorted(p.name for p in (base_dir / "samples").glob("*.png"))[:n]
    if not names:
        return None
    ims = [Image.open(d / "samples" / f) for d in (base_dir, tuned_dir) for f in names]
    make_grid(ims, cols=len(names)).save(out)
    return out


def train_or_resume(cfg: DictConfig, out: Path, ident: Identity) -> dict[str, Any]:
    """Train this cell, resume its interrupted training, or reuse its finished training (each only
    when ``out`` holds this cell's training: ``lifecycle.reuse_or_resume``)."""
    cfg, done = lifecycle.reuse_or_resume(cfg, out, ident)
    return done if done is not None else train(cfg, ident)


def run(cfg: DictConfig) -> dict[str, Any]:
    out = Path(cfg.paths.output_dir)
    table = results_path(cfg)
    trained = identity(cfg, "run")      # what the adapter is: the folder's identity
    cell = identity(cfg, "cell").digest   # ... and how it is evaluated: the row's
    rows = read_rows(table)
    if old := without_identity([r for r in rows if r.get("train")]):
        log.info("%s: %d train-and-evaluate rows were made before identities were recorded: never reused as this "
                 "cell's (it is computed)", table, len(old))
    finished = next((r for r in rows if (r.get("train") or {}).get("cell") == cell), None)
    if finished is not None:
        log.info("train-and-evaluate cell %s already in %s: skipped", cell, table)
        return {"finetuned": finished["metrics"], "skipped": True}
    reference_set(cfg)   # the reference set through the data policy now: a bad reference fails before training
    train_metrics = train_or_resume(cfg, out, trained)
    signals.check()       # a stop signal after the last step: the training is kept, the evaluation not begun
    lifecycle.barrier()   # rank zero wrote the adapter: every rank reads it next
    record = {"settings": trained.nested(), "identity": trained.digest, "metrics": train_metrics,
              "run_dir": str(out), "cell": cell}
    rows = {}
    for name, adapter in (("base", None), ("finetuned", str(out / "adapter"))):
        sub = copy.deepcopy(cfg)
        with open_dict(sub):
            sub.adapter = adapter
            sub.paths.output_dir = str(out / f"eval_{name}")
            sub.eval.results_file = str(table)
        rows[name] = evaluate(sub, record if adapter else None)
    if not rows["base"]:  # non-zero rank in a distributed run
        return {}
    base_row, tuned_row = rows["base"], rows["finetuned"]
    results = {k: r["metrics"] for k, r in rows.items()}
    paired = pair(base_row, tuned_row)   # the one paired Δ (summarize and the report use it too)
    if paired.reason:
        log.warning("fine-tuned vs base: %s", paired.method)
    deltas = paired.deltas
    grid = comparison_grid(out / "eval_base", out / "eval_finetuned", 8, out / "base_vs_finetuned.png")
    text = finetune_markdown(results["base"], results["finetuned"], deltas, cfg, grid, paired.reason)
    (out / "summary.md").write_text(text)
    (out / "paired.json").write_text(json.dumps(deltas if not paired.reason else {"not_paired": paired.reason},
                                                indent=1))
    print(text)
    metrics = {"train": train_metrics, "base": results["base"], "finetuned": results["finetuned"],
               "paired": deltas, "fid_ratio": results["finetuned"]["fid"] / results["base"]["fid"]}
    metrics["report"] = str(write_report(out))
    attach_to_loggers(cfg, tuned_row["key"], [Path(metrics["report"]), out / "summary.md", *([grid] if grid else [])])
    print(f"report: {metrics['report']}")
    return metrics
