"""Renderers of the summary library's table: Markdown (a sweep's and a fine-tune run's),
CSV and the FID-vs-CLIP plot. They only format: every number comes from ``evaluation.summary``
(sweeps) or the rows and ``evaluation.pairing`` (a fine-tune run); the HTML report is
``toolkit.report``'s.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from toolkit.evaluation.summary import DELTA_METRICS, METRICS, mark


def markdown(table: list[dict[str, Any]], varying: list[str]) -> list[str]:
    """A sweep's table as Markdown lines (the note under it says how to read it)."""
    cols = varying + ["n_seeds", "n_images"]
    metric_cols = [m for m in METRICS if any(m in e for e in table)]
    deltas = [m for m in DELTA_METRICS if any(f"delta_{m}" in e for e in table)]
    head = cols + [f"{m} [95% CI]" for m in metric_cols] + [f"Δ{m} [95% CI] p" for m in deltas] + ["Pareto"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for e in table:
        cells = ["—" if e.get(c) in (None, "None") else str(e[c]) for c in cols]
        for m in metric_cols:
            scale = 1000 if m == "kid" else 1
            cells.append(f"{scale * e[m]:.4g}" + (f" [{scale * e[m + '_ci_low']:.4g}, {scale * e[m + '_ci_high']:.4g}]"
                                                   if m + "_ci_low" in e else "") if m in e else "")
        for m in deltas:
            if f"delta_{m}" in e and f"delta_{m}_ci_low" not in e:   # not a pair: the plain difference, said so
                scale = 1000 if m == "kid" else 1
                cells.append(f"{scale * e[f'delta_{m}']:+.4g} ({e.get('delta_method', 'not paired')})")
            elif f"delta_{m}" in e:
                scale = 1000 if m == "kid" else 1
                cells.append(f"{scale * e[f'delta_{m}']:+.4g} [{scale * e[f'delta_{m}_ci_low']:+.4g}, "
                             f"{scale * e[f'delta_{m}_ci_high']:+.4g}] p={e[f'delta_{m}_p']:.2g}"
                             f"{mark(e[f'delta_{m}_p'])}")
            else:
                cells.append("baseline" if e.get("baseline") else "")
        cells.append("✓" if e.get("pareto") else "")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("KID ×1000. Intervals: Student t across seeds for settings with ≥ 2 seeds, else over images "
                 "(grouped jackknife, reference fixed). Δ = setting − baseline, paired by prompts and seeds; "
                 "* p<0.05, ** p<0.01, *** p<0.001; no mark: no significant difference. ✓: Pareto-optimal "
                 "(no other setting has both lower FID and higher CLIP score).")
    return lines


def write_csv(table: list[dict[str, Any]], varying: list[str], path: Path) -> None:
    """A sweep's table as CSV: the varying settings first, then every other column."""
    cols = sorted({k for e in table for k in e if k != "train_metrics"}, key=lambda k: (k not in varying, k))
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(table)


def plot(table: list[dict[str, Any]], varying: list[str], path: Path) -> None:
    """FID vs CLIP score per setting with 95% intervals; the Pareto front in red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def err(e: dict[str, Any], m: str) -> list[list[float]]:
        return [[e[m] - e.get(f"{m}_ci_low", e[m])], [e.get(f"{m}_ci_high", e[m]) - e[m]]]

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for e in table:
        if "clip_score" not in e:
            continue
        ax.errorbar(e["clip_score"], e["fid"], xerr=err(e, "clip_score"), yerr=err(e, "fid"), fmt="o", capsize=3,
                    color="tab:red" if e.get("pareto") else "tab:blue")
        ax.annotate(", ".join(f"{k.split('.')[-1]}={e[k]}" for k in varying)[:60], (e["clip_score"], e["fid"]),
                    fontsize=6, xytext=(3, 3), textcoords="offset points")
    front = sorted((e for e in table if e.get("pareto") and "clip_score" in e), key=lambda e: e["fid"])
    if len(front) > 1:
        ax.plot([e["clip_score"] for e in front], [e["fid"] for e in front], "--", color="tab:red", lw=1)
    ax.set_xlabel("CLIP score (higher is better)")
    ax.set_ylabel("FID (lower is better)")
    ax.set_title("FID vs CLIP score per setting (95% CI; red: Pareto front)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def fmt(m: dict[str, Any], k: str, scale: float = 1, digits: int = 1) -> str:
    if k not in m:
        return "skipped"
    lo, hi = m.get(k + "_ci_low"), m.get(k + "_ci_high")
    iv = f" [{scale * lo:.{digits}f}, {scale * hi:.{digits}f}]" if lo is not None else ""
    return f"{scale * m[k]:.{digits}f}{iv}"


def finetune_markdown(base: dict[str, Any], tuned: dict[str, Any], deltas: dict[str, dict[str, Any]],
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
