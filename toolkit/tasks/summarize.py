"""Task ``summarize``: the comparison table of a sweep (mean ± 95% CI per setting) + FID-vs-CLIP plot.

    python run.py task=summarize sweep=multirun/eval/<timestamp>

Rows that differ only in ``seed`` form one setting: its CI is the Student-t interval across
seeds when there are ≥ 2, else the row's bootstrap CI over images. Writes ``summary.md``,
``summary.csv`` and ``fid_vs_clip.png`` into the sweep dir.
"""

from __future__ import annotations

import csv
import json
import logging
from collections import defaultdict
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from toolkit.metrics.bootstrap import t_interval
from toolkit.results import read_rows

log = logging.getLogger(__name__)
METRICS = ("fid", "kid", "clip_score")
CI_KEYS = {"fid": "fid", "kid": "kid", "clip_score": "clip"}


def flat(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = json.dumps(v, sort_keys=True, default=str) if isinstance(v, list) else str(v)
    return out


def summarize_rows(rows: list[dict[str, Any]]) -> tuple[list[str], list[dict[str, Any]]]:
    """Group rows by their settings minus the seed; return (varying setting names, table rows)."""
    settings = [{k: v for k, v in flat(r["settings"]).items() if k != "seed"} for r in rows]
    keys = sorted({k for s in settings for k in s})
    varying = [k for k in keys if len({s.get(k) for s in settings}) > 1]
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for s, r in zip(settings, rows):
        groups[tuple(s.get(k) for k in varying)].append(r)
    table = []
    for gkey, members in groups.items():
        entry: dict[str, Any] = dict(zip(varying, gkey))
        entry["n_seeds"] = len(members)
        entry["n_images"] = members[0]["metrics"].get("n_fake")
        for m in METRICS:
            vals = [r["metrics"][m] for r in members if m in r["metrics"]]
            if not vals:
                continue
            mean, half = t_interval(vals)
            if len(vals) < 2:
                lo = members[0]["metrics"].get(f"{CI_KEYS[m]}_ci_low", float("nan"))
                hi = members[0]["metrics"].get(f"{CI_KEYS[m]}_ci_high", float("nan"))
                entry[f"{m}_ci"] = f"[{lo:.4g}, {hi:.4g}] (bootstrap)"
            else:
                entry[f"{m}_ci"] = f"±{half:.4g} (t, {len(vals)} seeds)"
            entry[m], entry[f"{m}_half"] = mean, half
        table.append(entry)
    return varying, table


def plot(table: list[dict[str, Any]], varying: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for e in table:
        if "clip_score" not in e:
            continue
        ax.errorbar(e["clip_score"], e["fid"], xerr=e.get("clip_score_half") or 0, yerr=e.get("fid_half") or 0,
                    fmt="o", capsize=3)
        ax.annotate(", ".join(f"{k.split('.')[-1]}={e[k]}" for k in varying)[:60], (e["clip_score"], e["fid"]),
                    fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("CLIP score (higher is better)")
    ax.set_ylabel("FID (lower is better)")
    ax.set_title("FID vs CLIP score per setting (95% CI)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(cfg: DictConfig) -> dict[str, Any]:
    sweep = Path(cfg.sweep)
    rows = read_rows(sweep / "results.jsonl")
    if not rows:
        raise FileNotFoundError(f"no result rows in {sweep / 'results.jsonl'}: pass sweep=<multirun dir of task=eval>")
    varying, table = summarize_rows(rows)
    cols = varying + ["n_seeds", "n_images"] + [c for m in METRICS for c in (m, f"{m}_ci") if c in table[0]]
    md = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for e in table:
        md.append("| " + " | ".join(f"{e[c]:.4g}" if isinstance(e.get(c), float) else str(e.get(c, ""))
                                  for c in cols) + " |")
    (sweep / "summary.md").write_text("\n".join(md) + "\n")
    with open(sweep / "summary.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(table)
    plot(table, varying, sweep / "fid_vs_clip.png")
    print("\n".join(md))
    log.info("summary of %d rows / %d settings in %s", len(rows), len(table), sweep)
    return {"rows": len(rows), "settings": len(table), "summary": str(sweep / "summary.md")}
