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

from toolkit.evaluation.pairing import pair
from toolkit.inference.pipeline import make_grid
from toolkit.report import write_report
from toolkit.results import read_rows, settings_key
from toolkit.tasks import eval as eval_task
from toolkit.tasks import train as train_task

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


def fmt(m: dict[str, Any], k: str, scale: float = 1, digits: int = 1) -> str:
    if k not in m:
        return "skipped"
    lo, hi = m.get(k + "_ci_low"), m.get(k + "_ci_high")
    iv = f" [{scale * lo:.{digits}f}, {scale * hi:.{digits}f}]" if lo is not None else ""
    return f"{scale * m[k]:.{digits}f}{iv}"


def summary_markdown(base: dict[str, Any], tuned: dict[str, Any], deltas: dict[str, dict[str, Any]],
                     cfg: DictConfig, grid: Path | None, not_paired: str | None = None) -> str:
    rows = ["| model | FID [95% CI] | KID ×1000 [95% CI] | CLIP score [95% CI] | precision | recall |",
            "|---|---|---|---|---|---|"]
    for name, m in (("base", base), ("fine-tuned", tuned)):
        rows.append(f"| {name} | {fmt(m, 'fid')} | {fmt(m, 'kid', 1000)} | {fmt(m, 'clip_score', 1, 2)} | "
                    f"{fmt(m, 'precision', 1, 3)} | {fmt(m, 'recall', 1, 3)} |")
    if deltas:
        cells = []
        for k, scale, digits in (("fid", 1, 1), ("kid", 1000, 1), ("clip_score", 1, 2)):
            d = deltas.get(k)
            cells.append("—" if d is None else f"{scale * d['delta']:+.{digits}f} [{scale * d['low']:+.{digits}f}, "
                         f"{scale * d['high']:+.{digits}f}], p={d['p_value']:.2g}")
        rows.append(f"| fine-tuned − base (paired) | {' | '.join(cells)} | | |")
    elif not_paired:
        rows.append(f"| fine-tuned − base | not paired: {not_paired} | | | | |")
    lines = [f"# Fine-tune + evaluate: {cfg.model.name_or_path}", "",
             f"Reference: `{cfg.eval.dataset}` ({base['n_real']} images); generated: {base['n_fake']} per model "
             f"(prompts = reference captions, seeds {cfg.eval.seed}·10⁶+i, {cfg.eval.steps} {cfg.eval.scheduler} "
             f"steps, guidance {cfg.eval.guidance_scale}).", "", *rows, "",
             "Intervals: over generated images, reference fixed (grouped jackknife; CLIP: t over images). "
             "The paired row compares the two models image by image (same prompts and seeds)."]
    for k, d in deltas.items():
        verdict = d["verdict"].replace("A better", "base better").replace("B better", "fine-tuned better")
        lines.append(f"- {k}: {verdict}")
    lines += ["", f"FID ratio fine-tuned / base = **{tuned['fid'] / base['fid']:.3f}**"]
    if base.get("clip_score") and "clip_score" in tuned:
        lines.append(f"CLIP ratio fine-tuned / base = **{tuned['clip_score'] / base['clip_score']:.3f}**")
    out = Path(cfg.paths.output_dir)
    lines += ["", "Files:", f"- adapter: `{out / 'adapter'}`", f"- training grids: `{out / 'samples'}`"]
    if grid:
        lines.append(f"- base (top) vs fine-tuned (bottom), same prompts and seeds: `{grid}`")
    return "\n".join(lines) + "\n"


def train_or_resume(cfg: DictConfig, out: Path) -> dict[str, Any]:
    """Train this cell, resume its interrupted training, or reuse its finished training."""
    cfg, done = train_task.reuse_or_resume(cfg, out)
    return done if done is not None else train_task.run(cfg)


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def run(cfg: DictConfig) -> dict[str, Any]:
    out = Path(cfg.paths.output_dir)
    table = eval_task.results_path(cfg)
    train_settings = training_record(cfg)
    cell = settings_key({"train": train_settings, "eval": OmegaConf.to_container(cfg.eval, resolve=True),
                         "metrics": OmegaConf.to_container(cfg.metrics, resolve=True),
                         "model": OmegaConf.to_container(cfg.model, resolve=True)})
    finished = next((r for r in read_rows(table) if (r.get("train") or {}).get("cell") == cell), None)
    if finished is not None:
        log.info("train-and-evaluate cell %s already in %s: skipped", cell, table)
        return {"finetuned": finished["metrics"], "skipped": True}
    train_metrics = train_or_resume(cfg, out)
    barrier()   # rank zero wrote the adapter: every rank reads it next
    record = {"settings": train_settings, "metrics": train_metrics, "run_dir": str(out), "cell": cell}
    rows = {}
    for name, adapter in (("base", None), ("finetuned", str(out / "adapter"))):
        sub = copy.deepcopy(cfg)
        with open_dict(sub):
            sub.adapter = adapter
            sub.paths.output_dir = str(out / f"eval_{name}")
            sub.eval.results_file = str(table)
        rows[name] = eval_task.evaluate(sub, record if adapter else None)
    if not rows["base"]:  # non-zero rank in a distributed run
        return {}
    base_row, tuned_row = rows["base"], rows["finetuned"]
    results = {k: r["metrics"] for k, r in rows.items()}
    paired = pair(base_row, tuned_row)   # the one paired Δ (summarize and the report use it too)
    if paired.reason:
        log.warning("fine-tuned vs base: %s", paired.method)
    deltas = paired.deltas
    grid = comparison_grid(out / "eval_base", out / "eval_finetuned", 8, out / "base_vs_finetuned.png")
    text = summary_markdown(results["base"], results["finetuned"], deltas, cfg, grid, paired.reason)
    (out / "summary.md").write_text(text)
    (out / "paired.json").write_text(json.dumps(deltas if not paired.reason else {"not_paired": paired.reason},
                                                indent=1))
    print(text)
    metrics = {"train": train_metrics, "base": results["base"], "finetuned": results["finetuned"],
               "paired": deltas, "fid_ratio": results["finetuned"]["fid"] / results["base"]["fid"]}
    metrics["report"] = str(write_report(out))
    print(f"report: {metrics['report']}")
    return metrics
