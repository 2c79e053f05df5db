"""Task ``report``: one self-contained HTML report (results table, FID-vs-CLIP plot, sample grids,
training curves, data report, protocol) for a training run, the default job, an eval sweep or a
sweep of training runs. Opens offline: plotly.js and the images are inside the file.

    python run.py task=report report.dir=outputs/finetune_eval/<time>
    python run.py task=report report.dir=multirun/eval/<time> report.baseline='lora_scale=[0]'
"""

from __future__ import annotations

import logging
from typing import Any

from omegaconf import DictConfig

from toolkit.evaluation.summary import PARETO
from toolkit.report import collect, write_report

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> dict[str, Any]:
    path = write_report(cfg.report.dir, baseline=cfg.report.baseline, title=cfg.report.title,
                        pareto=tuple(cfg.report.get("pareto") or PARETO))
    c = collect(cfg.report.dir)
    print(path)
    log.info("report of %s (%s, %d result rows) written to %s", c.root, c.kind, len(c.rows), path)
    return {"report": str(path), "kind": c.kind, "rows": len(c.rows), "bytes": path.stat().st_size}
