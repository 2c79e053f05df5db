"""Task ``summarize``: the comparison table of a sweep — mean and 95% interval per setting, Δ against
a baseline with a paired interval and p-value, the Pareto-optimal settings — and a FID-vs-CLIP plot.

    python run.py task=summarize sweep=multirun/eval/<timestamp>
    python run.py task=summarize sweep=<dir> 'baseline=lora_scale=[0.0]'     # Δ columns vs that setting
    python run.py task=summarize sweep=<train-and-evaluate sweep dir> baseline=base

How settings, intervals and the paired Δ are computed: ``toolkit.evaluation.summary``.
``baseline=base`` picks the rows without an adapter (or with LoRA scale 0).
Writes ``summary.md``, ``summary.csv``, ``summary.json`` and the Pareto plot (``fid_vs_clip.png``, or
``<y>_vs_<x>.png`` for another ``pareto=[y,x]``) into the sweep dir.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from toolkit.evaluation.render import markdown, plot, write_csv
from toolkit.evaluation.summary import PARETO, summarize_rows
from toolkit.results import read_rows

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> dict[str, Any]:
    sweep = Path(cfg.sweep)
    rows = read_rows(sweep / "results.jsonl")
    if not rows:
        raise FileNotFoundError(f"no result rows in {sweep / 'results.jsonl'}: pass sweep=<multirun dir of task=eval "
                                "or task=finetune_eval>")
    pareto = tuple(cfg.get("pareto") or PARETO)
    varying, table = summarize_rows(rows, cfg.get("baseline"), pareto)
    md = markdown(table, varying)
    (sweep / "summary.md").write_text("\n".join(md) + "\n")
    (sweep / "summary.json").write_text(json.dumps({"varying": varying, "table": table}, indent=1, default=str))
    write_csv(table, varying, sweep / "summary.csv")
    plot(table, varying, sweep / ("fid_vs_clip.png" if pareto == PARETO else f"{pareto[0]}_vs_{pareto[1]}.png"))
    print("\n".join(md))
    log.info("summary of %d rows / %d settings in %s", len(rows), len(table), sweep)
    return {"rows": len(rows), "settings": len(table), "summary": str(sweep / "summary.md")}
