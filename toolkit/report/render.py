"""Render a collected run/sweep into one self-contained ``report.html``.

Everything is inside the file: the plotly.js bundle (inlined, no CDN), figures as JSON, images as
base64 data URIs (grids larger than ``MAX_SIDE`` are downscaled), so it opens offline and can be
mailed or attached to a ticket. HTML comes only from the jinja2 templates (autoescaped).
"""

from __future__ import annotations

import base64
import io
import json
import time
from pathlib import Path
from typing import Any

import yaml
from jinja2 import Environment, PackageLoader
from markupsafe import Markup
from PIL import Image

from toolkit.atomic import atomic_open
from toolkit.evaluation.summary import PARETO, flat
from toolkit.report.collect import KIND_TITLES, Collected, TrainRun, collect
from toolkit.report.figures import curve_figures, pareto_figure
from toolkit.report.table import members, setting_label, summary_entries, table_columns

MAX_SIDE = 1024          # px: larger grids are downscaled (a 4096² SD grid would be ~20 MB as PNG)
JPEG_ABOVE = 512         # px: larger images are stored as JPEG (photos), smaller as PNG (pixel-exact)
MAX_TRAIN_GRIDS = 12     # in-training grids shown per run, evenly spaced, first and last included
MAX_LISTED = 200         # rejected / converted files listed per data report


def image_uri(path: Path) -> dict[str, Any]:
    """``{uri, width, height}``: the image as a data URI, downscaled to ``MAX_SIDE``."""
    with Image.open(path) as im:
        im = im.convert("RGB")
        if max(im.size) > MAX_SIDE:
            im.thumbnail((MAX_SIDE, MAX_SIDE), Image.LANCZOS)
        buf = io.BytesIO()
        fmt = "JPEG" if max(im.size) > JPEG_ABOVE else "PNG"
        im.save(buf, fmt, **({"quality": 88} if fmt == "JPEG" else {"optimize": True}))
    return {"uri": f"data:image/{fmt.lower()};base64,{base64.b64encode(buf.getvalue()).decode()}",
            "width": im.width, "height": im.height, "name": path.name}


def spaced(items: list[Any], k: int) -> list[Any]:
    if len(items) <= k:
        return items
    return [items[i] for i in sorted({round(j * (len(items) - 1) / (k - 1)) for j in range(k)})]


def data_report_view(split: str, rep: dict[str, Any]) -> dict[str, Any]:
    rejected, converted = rep.get("rejected", []), rep.get("converted", [])
    return {"split": split, "total": rep.get("total"), "kept": len(rep.get("keep", [])),
            "converted": len(converted), "rejected": len(rejected), "summary": rep.get("summary", ""),
            "counts": sorted((rep.get("counts") or {}).items(), key=lambda kv: -kv[1]),
            "rejected_list": rejected[:MAX_LISTED], "converted_list": converted[:MAX_LISTED],
            "more_rejected": max(len(rejected) - MAX_LISTED, 0), "more_converted": max(len(converted) - MAX_LISTED, 0)}


def run_view(run: TrainRun) -> dict[str, Any]:
    shown = spaced(run.samples, MAX_TRAIN_GRIDS)
    return {"name": run.name, "path": str(run.path), "log_note": run.log_note, "config": run.config,
            "samples": [{"step": s, **image_uri(p)} for s, p in shown], "samples_total": len(run.samples),
            "data_reports": [data_report_view(k, v) for k, v in sorted(run.data_reports.items())],
            "train_metrics": run.train_metrics}


def shared_settings(rows: list[dict[str, Any]]) -> dict[str, str]:
    """Settings every row has with the same value (the fixed part of the protocol)."""
    flats = [flat(r["settings"]) for r in rows]
    return {k: v for k, v in flats[0].items() if all(f.get(k) == v for f in flats[1:])} if flats else {}


def context(c: Collected, baseline: str | None = None, title: str | None = None, pareto: tuple[str, str] = PARETO
            ) -> dict[str, Any]:
    ctx: dict[str, Any] = {"title": title or f"{KIND_TITLES[c.kind]}: {Path(*c.root.parts[-2:])}",
                           "kind": c.kind, "kind_title": KIND_TITLES[c.kind], "root": str(c.root),
                           "generated": time.strftime("%Y-%m-%d %H:%M:%S"), "n_rows": len(c.rows),
                           "table": None, "scatter": None, "eval_grids": [], "protocols": [], "shared": ""}
    if c.rows:
        varying, entries = summary_entries(c.rows, baseline, pareto)
        columns, records = table_columns(entries, varying)
        ctx["table"] = {"columns": columns, "records": records}
        ctx["scatter"] = pareto_figure(entries, varying)
        for e in sorted(entries, key=lambda e: not e.get("baseline")):
            grid = next((c.eval_grids[r["key"]] for r in members(e, c.rows, varying) if r["key"] in c.eval_grids),
                        None)
            if grid is not None:
                ctx["eval_grids"].append({"label": setting_label(e, varying), "baseline": bool(e.get("baseline")),
                                          **image_uri(grid)})
        protocols = {json.dumps(r.get("protocol", {}), sort_keys=True, default=str) for r in c.rows}
        ctx["protocols"] = [yaml.safe_dump(json.loads(p), sort_keys=True) for p in sorted(protocols)]
        ctx["shared"] = yaml.safe_dump(shared_settings(c.rows), sort_keys=True)
    ctx["extra_grids"] = [{"caption": cap, **image_uri(p)} for cap, p in c.extra_grids]
    ctx["runs"] = [run_view(r) for r in c.runs]
    ctx["curves"] = curve_figures(c.runs)
    ctx["configs"] = c.configs
    return ctx


def render(ctx: dict[str, Any]) -> str:
    from plotly.offline import get_plotlyjs

    env = Environment(loader=PackageLoader("toolkit.report", "templates"), autoescape=True,
                      trim_blocks=True, lstrip_blocks=True)
    # The one piece of raw markup: plotly's own bundle, inlined so the file needs no network.
    return env.get_template("report.html.j2").render(**ctx, plotly_js=Markup(get_plotlyjs()))


def write_report(d: str | Path, baseline: str | None = None, title: str | None = None,
                 out: str | Path | None = None, pareto: tuple[str, str] = PARETO) -> Path:
    """Write ``<d>/report.html`` (or ``out``) for a training run, default job, eval sweep or sweep of
    training runs, and return its path.

    Args:
        d: the run or sweep dir.
        baseline: the setting the Δ columns compare with, ``key=value[,key=value]`` (e.g.
            ``lora_scale=[0]``); None: the no-adapter or LoRA-scale-0 setting, if there is one.
        title: the report's title (default: the kind of dir and its name).
        out: where to write (default ``<d>/report.html``).
        pareto: the two metrics of the Pareto figure and column (``summarize_rows``).
    """
    c = collect(d)
    path = Path(out) if out else c.root / "report.html"
    html = render(context(c, baseline, title, pareto))
    with atomic_open(path, "wb") as fh:
        fh.write(html.encode("utf-8"))
    return path
