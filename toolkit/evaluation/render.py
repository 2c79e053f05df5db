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

from toolkit.evaluation.summary import delta_columns, mark, metric_columns, metric_names
from toolkit.metrics.intervals import higher_is_better


def markdown(table: list[dict[str, Any]], varying: list[str]) -> list[str]:
    """A sweep's table as Markdown lines (the note under it says how to read it)."""
    cols = varying + ["n_seeds", "n_images"]
    metric_cols, deltas = metric_columns(table), delta_columns(table)
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
    x, y = (table[0].get("pareto_axes") or ["fid", "clip_score"]) if table else ["fid", "clip_score"]
    word = lambda m: "higher" if higher_is_better(m) else "lower"
    lines.append("KID ×1000. Intervals: Student t across seeds for settings with ≥ 2 seeds, else over images "
                 "(grouped jackknife, reference fixed). Δ = setting − baseline, paired by prompts and seeds; "
                 "* p<0.05, ** p<0.01, *** p<0.001; no mark: no significant difference. ✓: Pareto-optimal "
                 f"(no other setting has both {word(x)} {x} and {word(y)} {y}).")
    return lines


def write_csv(table: list[dict[str, Any]], varying: list[str], path: Path) -> None:
    """A sweep's table as CSV: the varying settings first, then every other column."""
    cols = sorted({k for e in table for k in e if k != "train_metrics"}, key=lambda k: (k not in varying, k))
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(table)


def plot(table: list[dict[str, Any]], varying: list[str], path: Path) -> None:
    """The two Pareto metrics per setting (``pareto_axes``: FID vs CLIP score by default) with 95%
    intervals; the Pareto front in red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def err(e: dict[str, Any], m: str) -> list[list[float]]:
        return [[e[m] - e.get(f"{m}_ci_low", e[m])], [e.get(f"{m}_ci_high", e[m]) - e[m]]]

    ym, xm = (table[0].get("pareto_axes") or ["fid", "clip_score"]) if table else ["fid", "clip_score"]
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for e in table:
        if xm not in e or ym not in e:
            continue
        ax.errorbar(e[xm], e[ym], xerr=err(e, xm), yerr=err(e, ym), fmt="o", capsize=3,
                    color="tab:red" if e.get("pareto") else "tab:blue")
        ax.annotate(", ".join(f"{k.split('.')[-1]}={e[k]}" for k in varying)[:60], (e[xm], e[ym]),
                    fontsize=6, xytext=(3, 3), textcoords="offset points")
    front = sorted((e for e in table if e.get("pareto") and xm in e and ym in e), key=lambda e: e[xm])
    if len(front) > 1:
        ax.plot([e[xm] for e in front], [e[ym] for e in front], "--", color="tab:red", lw=1)
    word = lambda m: "higher" if higher_is_better(m) else "lower"
    ax.set_xlabel(f"{xm} ({word(xm)} is better)")
    ax.set_ylabel(f"{ym} ({word(ym)} is better)")
    ax.set_title(f"{ym} vs {xm} per setting (95% CI; red: Pareto front)")
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
    names = metric_names([{"metrics": base}, {"metrics": tuned}])
    rows = ["| metric | base [95% CI] | fine-tuned [95% CI] | fine-tuned − base (paired) [95% CI], p |",
            "|---|---|---|---|"]
    for k in names:
        scale, digits = (1000, 2) if k == "kid" else (1, 4 if abs(tuned.get(k, base.get(k, 0)) or 0) < 10 else 2)
        d = deltas.get(k)
        delta = "—" if d is None else (f"{scale * d['delta']:+.{digits}f} [{scale * d['low']:+.{digits}f}, "
                                       f"{scale * d['high']:+.{digits}f}], p={d['p_value']:.2g}{mark(d['p_value'])}")
        rows.append(f"| {k}{' ×1000' if k == 'kid' else ''} | {fmt(base, k, scale, digits)} | "
                    f"{fmt(tuned, k, scale, digits)} | {delta} |")
    if not deltas and not_paired:
        rows.append(f"| fine-tuned − base | not paired: {not_paired} | | |")
    lines = [f"# Fine-tune + evaluate: {cfg.model.name_or_path}", "",
             f"Reference: `{cfg.eval.dataset}` ({base['n_real']} images); generated: {base['n_fake']} per model "
             f"(prompts = reference captions, seeds {cfg.eval.seed}·10⁶+i, {cfg.eval.steps} {cfg.eval.scheduler} "
             f"steps, guidance {cfg.eval.guidance_scale}).", "", *rows, "",
             "Intervals: over generated images, reference fixed (grouped jackknife; per-image means such as "
             "CLIP score: t over images). The paired column compares the two models image by image (same "
             "prompts and seeds); * p<0.05, ** p<0.01, *** p<0.001."]
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
