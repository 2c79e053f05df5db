"""Task ``finetune_eval`` (the default job): fine-tune a LoRA, then evaluate base vs fine-tuned.

    python run.py                       # the embedded miniature on the "striped" style, ~10 min on 2 CPU cores

1. ``train``: LoRA on ``data`` (the style set's train split);
2. ``eval`` twice against ``eval.dataset`` (the held-out style split), same prompts and seeds:
   the base model (no adapter) and base + the new adapter;
3. ``summary.md`` in the run dir: the FID/KID/CLIP table with CIs, the FID ratio, and a grid
   with base (top) vs fine-tuned (bottom) images for the same prompts and seeds.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, open_dict
from PIL import Image

from toolkit.inference.pipeline import make_grid
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


def summary_markdown(base: dict[str, Any], tuned: dict[str, Any], cfg: DictConfig, grid: Path | None) -> str:
    rows = ["| model | FID [95% CI] | KID ×1000 [95% CI] | CLIP score [95% CI] |", "|---|---|---|---|"]
    for name, m in (("base", base), ("fine-tuned", tuned)):
        clip = (f"{m['clip_score']:.2f} [{m['clip_ci_low']:.2f}, {m['clip_ci_high']:.2f}]"
                if "clip_score" in m else "skipped")
        rows.append(f"| {name} | {m['fid']:.1f} [{m['fid_ci_low']:.1f}, {m['fid_ci_high']:.1f}] | "
                    f"{1000 * m['kid']:.1f} [{1000 * m['kid_ci_low']:.1f}, {1000 * m['kid_ci_high']:.1f}] | {clip} |")
    ratio = tuned["fid"] / base["fid"]
    lines = [f"# Fine-tune + evaluate: {cfg.model.name_or_path}", "",
             f"Reference: `{cfg.eval.dataset}` ({base['n_real']} images); generated: {base['n_fake']} per model "
             f"(prompts = reference captions, seeds {cfg.eval.seed}·10⁶+i, {cfg.eval.steps} {cfg.eval.scheduler} "
             f"steps, guidance {cfg.eval.guidance_scale}).", "", *rows, "",
             f"FID ratio fine-tuned / base = **{ratio:.3f}**"]
    if "clip_score" in base and "clip_score" in tuned:
        lines.append(f"CLIP ratio fine-tuned / base = **{tuned['clip_score'] / base['clip_score']:.3f}**")
    out = Path(cfg.paths.output_dir)
    lines += ["", "Files:", f"- adapter: `{out / 'adapter'}`", f"- eval rows: `{out / 'results.jsonl'}`",
              f"- training grids: `{out / 'samples'}`"]
    if grid:
        lines.append(f"- base (top) vs fine-tuned (bottom), same prompts and seeds: `{grid}`")
    return "\n".join(lines) + "\n"


def run(cfg: DictConfig) -> dict[str, Any]:
    out = Path(cfg.paths.output_dir)
    train_metrics = train_task.run(cfg)
    results = {}
    for name, adapter in (("base", None), ("finetuned", str(out / "adapter"))):
        sub = copy.deepcopy(cfg)
        with open_dict(sub):
            sub.adapter = adapter
            sub.paths.output_dir = str(out / f"eval_{name}")
            sub.eval.results_file = str(out / "results.jsonl")
        results[name] = eval_task.run(sub)
    if not results["base"]:  # non-zero rank in a distributed run
        return {}
    grid = comparison_grid(out / "eval_base", out / "eval_finetuned", 8, out / "base_vs_finetuned.png")
    text = summary_markdown(results["base"], results["finetuned"], cfg, grid)
    (out / "summary.md").write_text(text)
    print(text)
    return {"train": train_metrics, "base": results["base"], "finetuned": results["finetuned"],
            "fid_ratio": results["finetuned"]["fid"] / results["base"]["fid"]}
