"""The report's results table: result rows → summary entries → display columns, and the Pareto front.

Entries come from ``toolkit.evaluation.summary.summarize_rows`` and are read generically: every
numeric key ``m`` is a metric unless it is a setting, a count (``n_*``) or one of the statistics
suffixes below; its interval is ``m_ci_low``/``m_ci_high`` or ``m_half``; a Δ vs the baseline is
``delta_m`` with optional ``delta_m_ci_low``/``delta_m_ci_high`` and ``delta_m_p``, shown under
``m``; booleans (``pareto``, ...) are flag columns, ``baseline`` the highlighted row.
``table_columns`` is the one function that maps these fields to columns: adapt it (and only it)
when the statistics change.
"""

from __future__ import annotations

import math
from typing import Any

from toolkit.evaluation.summary import PARETO, identity, is_base, mark, setting_label, summarize_rows
from toolkit.metrics import intervals

STAT_SUFFIXES = ("_ci_low", "_ci_high", "_half", "_p", "_ci", "_std")
COUNT_LABELS = {"n_images": ("N", "generated images per seed"), "n_seeds": ("seeds", "seeds (rows) per setting")}


def number(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def fmt(v: Any) -> str:
    x = number(v)
    return "—" if x is None else f"{x:.4g}"


def interval(entry: dict[str, Any], m: str) -> tuple[float, float] | None:
    """(low, high) of metric ``m`` in an entry: ``m_ci_low/high`` if present, else mean ± ``m_half``."""
    lo, hi = number(entry.get(f"{m}_ci_low")), number(entry.get(f"{m}_ci_high"))
    if lo is not None and hi is not None:
        return lo, hi
    mean, half = number(entry.get(m)), number(entry.get(f"{m}_half"))
    return (mean - half, mean + half) if mean is not None and half is not None else None


def metric_names(entries: list[dict[str, Any]], varying: list[str]) -> list[str]:
    names: dict[str, None] = {}
    for e in entries:
        for k, v in e.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in varying \
                    and not k.startswith(("n_", "delta_")) and not k.endswith(STAT_SUFFIXES):
                names[k] = None
    return list(names)


def significance(entry: dict[str, Any], m: str) -> tuple[str, str]:
    """(mark, explanation) for the Δ of metric ``m``: stars from ``delta_m_p``, else ``*`` when the
    Δ interval excludes 0, else nothing."""
    p = number(entry.get(f"delta_{m}_p"))
    if p is not None:
        return mark(p), f"p = {p:.3g}"
    ci = interval(entry, f"delta_{m}")
    if ci is not None:
        return ("*" if ci[0] > 0 or ci[1] < 0 else ""), f"95% CI [{fmt(ci[0])}, {fmt(ci[1])}]"
    method = str(entry.get("delta_method") or "")
    if method.startswith("not paired"):   # visibly: a plain difference of means, and why it is not paired
        return "†", f"difference of means, no test ({method})"
    return "", "difference of means, no test"


def table_columns(entries: list[dict[str, Any]], varying: list[str]) -> tuple[list[dict], list[dict]]:
    """Summary entries → (columns, records) for the HTML table: one column per metric, its Δ vs the
    baseline beneath the mean in the same cell, so a default job's nine metrics fit a 1280 px screen.

    A column is ``{key, label, title, kind}`` (kind: setting, count, metric, flag); a record is
    ``{label, baseline, cells}``: the setting's label, whether it is the baseline (the row is
    highlighted; not a column), and per column key a cell ``{text, sub, sort, mark, title, delta}``
    (``sub``: the interval, shown under the mean; ``sort``: a number where the cell has one, else
    the text; ``delta``: None, or the Δ as a cell of its own, shown under the metric).
    """
    metrics = metric_names(entries, varying)
    cols = [{"key": k, "label": k.split(".")[-1], "title": k, "kind": "setting"} for k in varying]
    cols += [{"key": k, "label": lab, "title": t, "kind": "count"} for k, (lab, t) in COUNT_LABELS.items()
             if any(k in e for e in entries)]
    for m in metrics:
        has_delta = any(f"delta_{m}" in e for e in entries)
        cols.append({"key": m, "label": m, "kind": "metric", "title": f"{m}: mean [95% interval]" + (
            "; beneath it, Δ: minus the baseline's, * p<0.05, ** p<0.01, *** p<0.001 (or * when the Δ interval "
            "excludes 0)" if has_delta else "")})
    flags = sorted({k for e in entries for k, v in e.items() if isinstance(v, bool)} - {"baseline"})
    cols += [{"key": k, "label": k, "title": k, "kind": "flag"} for k in flags]

    records = []
    for e in entries:
        rec: dict[str, Any] = {"label": setting_label(e, varying), "baseline": bool(e.get("baseline")), "cells": {}}
        for c in cols:
            k = c["key"]
            cell = value_cell(e, k, c["kind"])
            if c["kind"] == "metric" and f"delta_{k}" in e and not rec["baseline"]:
                cell["delta"] = value_cell(e, f"delta_{k}", "delta")
                if e[f"delta_{k}"] is not None:
                    cell["delta"]["mark"], cell["delta"]["title"] = significance(e, k)
            rec["cells"][k] = cell
        records.append(rec)
    return cols, records


def value_cell(e: dict[str, Any], k: str, kind: str) -> dict[str, Any]:
    """One number (or setting, or flag) of an entry with its interval beneath (``sub``)."""
    v = e.get(k)
    blank = v is None or isinstance(v, float) and number(v) is None   # missing, nan or inf
    cell = {"text": "—" if blank else fmt(v) if number(v) is not None else str(v),
            "sort": "" if blank else number(v) if number(v) is not None else str(v), "sub": "", "mark": "",
            "title": "", "delta": None}
    if kind in ("metric", "delta") and (ci := interval(e, k)) is not None:
        cell["sub"] = f"[{fmt(ci[0])}, {fmt(ci[1])}]"
    elif kind == "metric" and isinstance(e.get(f"{k}_ci"), str):   # summarize's text interval
        cell["title"] = e[f"{k}_ci"]
    if kind == "flag":
        cell["text"] = "✓" if v else ""
    return cell


def summary_entries(rows: list[dict[str, Any]], baseline: str | None = None, pareto: tuple[str, str] = PARETO
                    ) -> tuple[list[str], list[dict]]:
    """``summarize_rows`` with a baseline: the one given, else the rows without an adapter (or
    with LoRA scale 0) when the sweep has them. Δ columns are then paired (see summarize)."""
    base_settings = {tuple(sorted(identity(r).items())) for r in rows if is_base(r)}
    spec = baseline or ("base" if len(base_settings) == 1 and not all(is_base(r) for r in rows) else None)
    return summarize_rows(rows, spec, pareto)


def members(entry: dict[str, Any], rows: list[dict[str, Any]], varying: list[str]) -> list[dict[str, Any]]:
    """The result rows (seeds) that make up a summary entry."""
    return [r for r in rows if all(identity(r).get(k) == entry.get(k) for k in varying)]


def pareto_front(points: list[tuple[Any, Any]]) -> set[int]:
    """Indices of the (fid, clip) points on the Pareto front (``toolkit.metrics.intervals.pareto_front``)."""
    f = [number(p[0]) if number(p[0]) is not None else math.nan for p in points]
    c = [number(p[1]) if number(p[1]) is not None else math.nan for p in points]
    return {int(i) for i in intervals.pareto_front(f, c)}
