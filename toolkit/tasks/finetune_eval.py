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

A multirun is a train-and-evaluate sweep: every cell appends its rows (with the training
settings, the adapter hash and the training metrics) to ``<sweep dir>/results.jsonl``. Running
the same sweep again (``hydra.sweep.dir=<that dir>``) skips finished cells, resumes a cell whose
training was interrupted from its last checkpoint, and evaluates the shared base model once.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict
from PIL import Image

from toolkit.evaluation.job import evaluate, results_path
from toolkit.evaluation.pairing import pair
from toolkit.evaluation.render import finetune_markdown
from toolkit.hashing import settings_key
from toolkit.inference.pipeline import make_grid
from toolkit.report import write_report
from toolkit.results import read_rows
from toolkit.run import lifecycle, signals
from toolkit.training.fit import train

log = logging.getLogger(__name__)


def comparison_grid(base_dir: Path, tuned_dir: Path, n: int, out: Path) -> Path | None:
    names = sorted(p.name for p in (base_dir / "samples").glob("*.png"))[:n]
    if not names:
        return None
    ims = [Image.open(d / "samples" / f) for d in (base_dir, tuned_dir) for f in names]
    make_grid(ims, cols=len(names)).save(out)
    return out


def training_record(cfg: DictConfig) -> dict[str, Any]:
    """The settings that determine a trained adapter (what a train-and-evaluate sweep varies)."""
    module = OmegaConf.to_container(cfg.module, resolve=True)
    module.pop("pretrained", None)   # the model is in the eval settings already
    return {"module": module, "seed": int(cfg.seed),
            "data": {k: OmegaConf.to_container(cfg.data, resolve=True).get(k) for k in
                     ("path", "resolution", "global_batch_size", "center_crop", "random_flip", "buckets", "tags")},
            "trainer": {k: cfg.trainer.get(k) for k in ("max_steps", "precision", "accumulate_grad_batches")}}


def train_or_resume(cfg: DictConfig, out: Path) -> dict[str, Any]:
    """Train this cell, resume its interrupted training, or reuse its finished training."""
    cfg, done = lifecycle.reuse_or_resume(cfg, out)
    return done if done is not None else train(cfg)


def run(cfg: DictConfig) -> dict[str, Any]:
    out = Path(cfg.paths.output_dir)
    table = results_path(cfg)
    train_settings = training_record(cfg)
    cell = settings_key({"train": train_settings, "eval": OmegaConf.to_container(cfg.eval, resolve=True),
                         "metrics": OmegaConf.to_container(cfg.metrics, resolve=True),
                         "model": OmegaConf.to_container(cfg.model, resolve=True)})
    finished = next((r for r in read_rows(table) if (r.get("train") or {}).get("cell") == cell), None)
    if finished is not None:
        log.info("train-and-evaluate cell %s already in %s: skipped", cell, table)
        return {"finetuned": finished["metrics"], "skipped": True}
    train_metrics = train_or_resume(cfg, out)
    signals.check()       # a stop signal after the last step: the training is kept, the evaluation not begun
    lifecycle.barrier()   # rank zero wrote the adapter: every rank reads it next
    record = {"settings": train_settings, "metrics": train_metrics, "run_dir": str(out), "cell": cell}
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
    print(f"report: {metrics['report']}")
    return metrics
