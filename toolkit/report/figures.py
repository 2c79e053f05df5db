"""Plotly figures of the report, as JSON-ready dicts (``{"data": ..., "layout": ...}``) that the
template hands to ``Plotly.newPlot``; the plotly.js bundle itself is inlined once by the template."""

from __future__ import annotations

import json
from typing import Any

import plotly.graph_objects as go

from toolkit.evaluation.summary import PARETO
from toolkit.metrics.intervals import higher_is_better
from toolkit.report.collect import TrainRun
from toolkit.report.table import fmt, interval, number, setting_label

BASE_LAYOUT = {"template": "plotly_white", "margin": {"l": 60, "r": 20, "t": 40, "b": 50}}
FRONT_COLOUR, OTHER_COLOUR = "#d62728", "#1f77b4"
# Panels of the training curves: (title, which CSV columns); the first panel that matches takes a column.
PANELS = (("loss", lambda k: "loss" in k), ("learning rate", lambda k: k.startswith("lr")),
          ("grad norm", lambda k: "grad_norm" in k), ("images / s", lambda k: "per_sec" in k))
BOOKKEEPING = ("/batches", "/samples", "/time")   # ThroughputMonitor counters: only used to derive img/s


def as_json(fig: go.Figure) -> dict[str, Any]:
    return json.loads(fig.to_json())


def pareto_figure(entries: list[dict[str, Any]], varying: list[str]) -> dict[str, Any] | None:
    """The Pareto trade-off (``pareto_axes``: FID (y) vs CLIP score (x) by default): one marker per
    setting with its 95% interval as error bars (clipped at the point, for intervals from older
    results that miss it), Pareto points in red and joined by a dashed line, the baseline as a
    diamond. None without both metrics."""
    ym, xm = (entries[0].get("pareto_axes") or PARETO) if entries else PARETO
    pts = [e for e in entries if number(e.get(ym)) is not None and number(e.get(xm)) is not None]
    if not pts:
        return None
    x, y = [e[xm] for e in pts], [e[ym] for e in pts]

    def bars(m: str, vals: list[float]) -> dict[str, Any]:
        cis = [interval(e, m) or (v, v) for e, v in zip(pts, vals)]
        return {"type": "data", "symmetric": False, "array": [max(hi - v, 0) for (_, hi), v in zip(cis, vals)],
                "arrayminus": [max(v - lo, 0) for (lo, _), v in zip(cis, vals)], "thickness": 1.2, "width": 4,
                "color": "#666"}

    def hover(e: dict[str, Any]) -> str:
        parts = [setting_label(e, varying)]
        for m in (ym, xm):
            ci = interval(e, m)
            parts.append(f"{m} {fmt(e[m])}" + (f" [{fmt(ci[0])}, {fmt(ci[1])}]" if ci else ""))
        return "<br>".join(parts + (["Pareto front"] if e.get("pareto") else []))

    fig = go.Figure()
    fig.add_trace(go.Scatter(
        x=x, y=y, mode="markers", name="settings", text=[hover(e) for e in pts], hovertemplate="%{text}<extra></extra>",
        error_x=bars(xm, x), error_y=bars(ym, y),
        marker={"size": 12, "color": [FRONT_COLOUR if e.get("pareto") else OTHER_COLOUR for e in pts],
                "symbol": ["diamond" if e.get("baseline") else "circle" for e in pts],
                "line": {"width": 1, "color": "white"}}))
    front = sorted((e[xm], e[ym]) for e in pts if e.get("pareto"))
    if len(front) > 1:
        fig.add_trace(go.Scatter(x=[c for c, _ in front], y=[f for _, f in front], mode="lines", name="Pareto front",
                                 line={"color": FRONT_COLOUR, "dash": "dash", "width": 1.5}, hoverinfo="skip"))
    word = lambda m: "higher" if higher_is_better(m) else "lower"
    fig.update_layout(**BASE_LAYOUT, height=460, showlegend=False, hovermode="closest",
                      title=f"{ym} vs {xm} per setting (95% intervals; red: Pareto front)",
                      xaxis_title=f"{xm} ({word(xm)} is better)", yaxis_title=f"{ym} ({word(ym)} is better)")
    return as_json(fig)


def throughput(curves: dict[str, list[tuple[float, float]]]) -> list[tuple[float, float]]:
    """Images/s between consecutive ThroughputMonitor logs (``train/samples``, ``train/time``)."""
    samples, time = dict(curves.get("train/samples", [])), dict(curves.get("train/time", []))
    steps = sorted(set(samples) & set(time))
    return [(b, (samples[b] - samples[a]) / (time[b] - time[a]))
            for a, b in zip(steps, steps[1:]) if time[b] > time[a] and samples[b] > samples[a]]


def curve_figures(runs: list[TrainRun]) -> list[dict[str, Any]]:
    """One small figure per panel (loss, learning rate, grad norm, images/s, then any other logged
    column), one line per (run, column)."""
    panels: dict[str, list[tuple[str, list[tuple[float, float]]]]] = {}
    for run in runs:
        cols = {k: v for k, v in run.curves.items() if not k.endswith(BOOKKEEPING) and not k.startswith("validate/")}
        if not any("per_sec" in k for k in cols) and (derived := throughput(run.curves)):
            cols["images/s (train/samples ÷ train/time)"] = derived
        for k, pts in cols.items():
            title = next((t for t, match in PANELS if match(k)), "images / s" if k.startswith("images/s") else k)
            name = f"{run.name}: {k}" if len(runs) > 1 else k
            panels.setdefault(title, []).append((name, pts))
    order = [t for t, _ in PANELS] + sorted(t for t in panels if t not in dict(PANELS))
    figs = []
    for title in (t for t in order if t in panels):
        fig = go.Figure([go.Scatter(x=[s for s, _ in pts], y=[v for _, v in pts], name=name,
                                    mode="lines+markers" if len(pts) < 30 else "lines")
                         for name, pts in panels[title]])
        fig.update_layout(**BASE_LAYOUT, height=300, title=title, xaxis_title="step", showlegend=True,
                          legend={"orientation": "h", "y": -0.3})
        figs.append(as_json(fig))
    return figs
