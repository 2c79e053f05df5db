"""The summary library: result rows -> settings -> one table, with the one paired Δ.

Rows that differ only in their seeds (``seed``: evaluation seed; ``train.seed``: training seed)
form one setting. Its interval is the Student-t interval across seeds when it has ≥ 2, else the
row's own interval over images (grouped jackknife, reference fixed: ``toolkit.metrics.intervals``).
Δ = setting − baseline is paired (``evaluation.pairing``): per seed, a setting's row is matched
with the baseline row evaluated on the same prompts and seeds; with one such pair the Δ interval
and p-value come from the paired jackknife over images, with several from the paired t-test
across seeds. The table's entries are plain dicts; ``evaluation.render`` writes them as Markdown,
CSV and a plot, ``toolkit.report`` as HTML.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from typing import Any

import numpy as np

from toolkit.evaluation.pairing import pair
from toolkit.metrics.intervals import compare_seeds, higher_is_better, mean_interval, pareto_front

log = logging.getLogger(__name__)
# the order of the columns; any other metric a row has (fd_dinov2, vendi_clip, clip_score_held_out, ...) follows
ORDER = ("fid", "kid", "cmmd", "clip_score", "style_similarity", "precision", "recall", "density", "coverage",
         "vendi", "lpips_diversity", "fid_inf")
BOOKKEEPING = ("seconds_", "images_per_second", "n_")   # row metrics that are not metrics
NO_DELTA = ("precision", "recall", "density", "coverage", "fid_inf", "fd_inf")   # no paired form
PARETO = ("fid", "clip_score")   # the default trade-off of the Pareto column and plot
BASE_LABEL = "base (no adapter)"   # the adapter column of rows without one (the report's label)
TRAINED_LABEL = "fine-tuned (trained in the run)"   # ... of rows whose adapter the run trained


def is_seed(key: str) -> bool:
    """A seed setting (``seed``, ``train.seed``, and what the training config derives from the seed,
    e.g. ``train.module.seed``, ``train.module.val_seed``): rows differing only there are replicates."""
    last = key.rsplit(".", 1)[-1]
    return last == "seed" or last.endswith("_seed")


def flat(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = json.dumps(v, sort_keys=True, default=str) if isinstance(v, list) else str(v)
    return out


def identity(row: dict[str, Any]) -> dict[str, str]:
    """The settings that make a row's setting: everything but the seeds (and, for trained rows,
    the adapter files, which differ per training seed: the training settings identify them)."""
    s = flat(row["settings"])
    trained = any(k.startswith("train.") for k in s)
    out = {k: v for k, v in s.items() if not is_seed(k)
           and not (trained and k.startswith("adapters") and row["settings"].get("adapters"))}
    if trained and row["settings"].get("adapters"):
        out["adapters"] = TRAINED_LABEL
    elif not row["settings"].get("adapters"):
        out["adapters"] = BASE_LABEL
    return out


def varying_keys(idents: list[dict[str, str]]) -> list[str]:
    """The settings that differ between rows. A key present in some rows only and constant where
    present (a fine-tuned row's ``train.*`` settings beside the base row) is left out when the
    other keys already tell the settings apart, so the table shows what was varied."""
    keys = sorted({k for s in idents for k in s})
    every = [k for k in keys if len({s.get(k) for s in idents}) > 1]
    core = [k for k in every if len({s[k] for s in idents if k in s}) > 1]
    distinct = len({tuple(s.get(k) for k in every) for s in idents})
    return core if len({tuple(s.get(k) for k in core) for s in idents}) == distinct else every


def is_base(row: dict[str, Any]) -> bool:
    s = row["settings"]
    scales = [float(x) for x in s.get("lora_scale") or [1.0]]
    return not s.get("adapters") or s["adapters"] == BASE_LABEL or all(x == 0 for x in scales)


def setting_label(entry: dict[str, Any], varying: list[str]) -> str:
    return ", ".join(f"{k.split('.')[-1]}={entry[k]}" for k in varying if entry.get(k) is not None) or "all rows"


def find_baseline(entries: list[dict[str, Any]], varying: list[str], members: list[list[dict[str, Any]]],
                  spec: str | None) -> int | None:
    """Index of the baseline setting: ``base`` (the rows without an adapter, or LoRA scale 0), a
    row key, or ``key=value[,key=value]`` on the varying settings (key: the setting or its last
    dotted part; value as shown in the table). None: no baseline."""
    if not spec:
        return None
    if spec == "base":
        hits = [i for i, rows in enumerate(members) if all(is_base(r) for r in rows)]
    elif "=" not in spec:
        hits = [i for i, rows in enumerate(members) if any(r.get("key") == spec for r in rows)]
    else:
        want = {}
        for part in spec.split(","):
            k, _, v = part.partition("=")
            full = k if k in varying else next((f for f in varying if f.split(".")[-1] == k), None)
            if full is None:
                raise ValueError(f"baseline={spec!r}: {k!r} is not a varying setting ({', '.join(varying) or 'none'})")
            want[full] = v
        norm = lambda t: str(t).replace(" ", "").replace("'", '"')
        hits = [i for i, e in enumerate(entries) if all(norm(e.get(k)) == norm(v) for k, v in want.items())]
    if len(hits) != 1:
        raise ValueError(f"baseline={spec!r} matches {len(hits)} settings, expected 1; settings: "
                         + "; ".join(setting_label(e, varying) for e in entries))
    return hits[0]


def metric_names(rows: list[dict[str, Any]]) -> list[str]:
    """The metrics the rows hold, in column order."""
    seen = {k for r in rows for k, v in r["metrics"].items() if isinstance(v, int | float) and not isinstance(v, bool)
            and not k.startswith(BOOKKEEPING) and not k.endswith(("_ci_low", "_ci_high", "_slope"))}
    return [m for m in ORDER if m in seen] + sorted(seen - set(ORDER))


def has_delta(metric: str) -> bool:
    return not metric.startswith(NO_DELTA)


def metric_columns(table: list[dict[str, Any]]) -> list[str]:
    """The metric columns of a summary table (``summarize_rows``' entries)."""
    return [m for m in table[0].get("metric_order", []) if any(m in e for e in table)] if table else []


def delta_columns(table: list[dict[str, Any]]) -> list[str]:
    return [m for m in metric_columns(table) if any(f"delta_{m}" in e for e in table)]


def replicate(row: dict[str, Any]) -> tuple[str, str]:
    s = flat(row["settings"])
    return s.get("train.seed", ""), s.get("seed", "")


def delta_entry(members: list[dict[str, Any]], base_rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Δ columns of one setting vs the baseline rows: paired by evaluation seed and images, and by
    training seed too when the baseline was itself trained with several seeds (same data order and
    noise on both sides; the base model has one row per evaluation seed). A single pair that is not
    one (other prompts, reference set, missing files, ...; ``toolkit.evaluation.pairing``) gets no
    paired Δ, only ``delta_method`` = ``not paired: <why>`` (``summarize_rows`` then shows the plain
    difference of the means)."""
    by_replicate = {replicate(b): b for b in base_rows}
    by_eval_seed = {flat(b["settings"]).get("seed"): b for b in base_rows}
    if len(by_replicate) > len(by_eval_seed):
        pairs = [(by_replicate.get(replicate(r)), r) for r in members]
    else:
        pairs = [(by_eval_seed.get(flat(r["settings"]).get("seed")), r) for r in members]
    pairs = [(b, r) for b, r in pairs if b is not None and b is not r]
    out: dict[str, Any] = {}
    if not pairs:
        return out
    if len(pairs) == 1:
        b, r = pairs[0]
        paired = pair(b, r)
        if paired.reason:
            log.warning("Δ of %s vs the baseline %s: %s", r.get("key"), b.get("key"), paired.method)
            return {"delta_method": paired.method}
        comps, method = paired.deltas, paired.method
    else:
        level = float((base_rows[0]["settings"].get("metrics") or {}).get("level", 0.95))   # the rows' own level
        comps = {}
        for m in (m for m in metric_names(base_rows) if has_delta(m)):
            if all(m in b["metrics"] and m in r["metrics"] for b, r in pairs):
                c = compare_seeds([b["metrics"][m] for b, _ in pairs], [r["metrics"][m] for _, r in pairs], m, level)
                comps[m] = c.to_dict() | {"verdict": c.verdict(names=("baseline", "setting"))}
        method = f"paired t across {len(pairs)} seeds"
    for m, c in comps.items():
        verdict = c["verdict"].replace("A better", "baseline better").replace("B better", "setting better")
        out.update({f"delta_{m}": c["delta"], f"delta_{m}_ci_low": c["low"], f"delta_{m}_ci_high": c["high"],
                    f"delta_{m}_p": c["p_value"], f"delta_{m}_verdict": verdict})
    out["delta_method"] = method
    return out


def summarize_rows(rows: list[dict[str, Any]], baseline: str | None = None, pareto: tuple[str, str] = PARETO
                   ) -> tuple[list[str], list[dict[str, Any]]]:
    """Group rows by their settings minus the seeds; return (varying setting names, table rows).
    A cell evaluated again (``eval.force=true``) appends a row with the same key: the last counts.
    ``pareto``: the two metrics of the ``pareto`` flag (each in its own direction: FID lower,
    CLIP / style similarity higher)."""
    rows = list({r.get("key") or id(r): r for r in rows}.values())
    order = metric_names(rows)
    if len(pareto) != 2 or (tuple(pareto) != PARETO and any(p not in order for p in pareto)):
        raise ValueError(f"pareto={list(pareto)}: expected two of the rows' metrics ({', '.join(order)})")
    idents = [identity(r) for r in rows]
    varying = varying_keys(idents)
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for s, r in zip(idents, rows):
        groups[tuple(s.get(k) for k in varying)].append(r)
    table, members = [], list(groups.values())
    for gkey, group in groups.items():
        entry: dict[str, Any] = dict(zip(varying, gkey))
        entry["n_seeds"] = len({replicate(r) for r in group})
        entry["n_images"] = group[0]["metrics"].get("n_fake")
        entry["metric_order"], entry["pareto_axes"] = order, list(pareto)
        for m in order:
            vals = [r["metrics"][m] for r in group if m in r["metrics"]]
            if not vals:
                continue
            iv = mean_interval(vals)   # across seeds: Student t over the per-seed values
            mean, half = iv.estimate, iv.high - iv.estimate
            entry[m] = mean
            if len(vals) >= 2:
                entry[f"{m}_ci_low"], entry[f"{m}_ci_high"] = mean - half, mean + half
                entry[f"{m}_ci"] = f"±{half:.4g} (t, {len(vals)} seeds)"
            elif f"{m}_ci_low" in group[0]["metrics"]:
                lo, hi = group[0]["metrics"][f"{m}_ci_low"], group[0]["metrics"][f"{m}_ci_high"]
                entry[f"{m}_ci_low"], entry[f"{m}_ci_high"] = lo, hi
                entry[f"{m}_ci"] = f"[{lo:.4g}, {hi:.4g}] (images)"
        entry["train_metrics"] = {k: v for k, v in (group[0].get("train") or {}).get("metrics", {}).items()
                                  if isinstance(v, int | float)}
        table.append(entry)
    base = find_baseline(table, varying, members, baseline)
    for i, entry in enumerate(table):
        entry["baseline"] = i == base
        if base is not None and i != base:
            entry.update(delta_entry(members[i], members[base]))
            if not any(f"delta_{m}" in entry for m in order):   # no paired Δ: the plain difference, said so
                entry.update({f"delta_{m}": entry[m] - table[base][m] for m in order
                              if has_delta(m) and m in entry and m in table[base]})
                entry.setdefault("delta_method", "not paired: no matching baseline row")
    sign = [1.0 if higher_is_better(pareto[0]) is False else -1.0, 1.0 if higher_is_better(pareto[1]) else -1.0]
    front = set(pareto_front([sign[0] * e.get(pareto[0], np.nan) for e in table],
                             [sign[1] * e.get(pareto[1], np.nan) for e in table]))
    for i, e in enumerate(table):
        e["pareto"] = i in front
    return varying, table


def mark(p: float) -> str:
    """Significance stars of a p-value (* < 0.05, ** < 0.01, *** < 0.001)."""
    return "***" if p < 1e-3 else "**" if p < 1e-2 else "*" if p < 0.05 else ""
