"""What a run or sweep dir holds, read into plain data for the report (no rendering here).

Kinds, detected from the files (``detect``):

- ``train``: a training run (``train_metrics.json``, ``adapter/``, ``samples/step=N.png`` or
  ``checkpoints/``) without result rows;
- ``finetune_eval``: a training run with ``results.jsonl`` (the default job: ``eval_base/``,
  ``eval_finetuned/``, ``base_vs_finetuned.png``);
- ``eval_sweep``: ``results.jsonl`` (one row per cell) and cells ``0/ 1/ ...`` with ``grid.png``
  (a single ``task=eval`` run dir is read the same way);
- ``train_eval_sweep``: cells ``0/ 1/ ...`` that are training runs, each with its own
  ``results.jsonl`` (a multirun of the default job), or without (a multirun of ``task=train``).
"""

from __future__ import annotations

import csv
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from toolkit.evaluation.summary import BASE_LABEL, is_seed
from toolkit.results import read_rows

log = logging.getLogger(__name__)
KIND_TITLES = {"train": "Training run", "finetune_eval": "Fine-tune + evaluate",
               "eval_sweep": "Evaluation sweep", "train_eval_sweep": "Training sweep"}


@dataclass
class TrainRun:
    """One training run: its CSV curves, in-training sample grids, data reports and config."""

    name: str
    path: Path
    curves: dict[str, list[tuple[float, float]]] = field(default_factory=dict)   # column -> [(step, value)]
    samples: list[tuple[int, Path]] = field(default_factory=list)                # (step, grid png)
    data_reports: dict[str, dict[str, Any]] = field(default_factory=dict)        # split -> save_scan JSON
    train_metrics: dict[str, Any] = field(default_factory=dict)
    config: str = ""
    log_note: str = ""   # why there are no curves, if there are none


@dataclass
class Collected:
    kind: str
    root: Path
    rows: list[dict[str, Any]]                      # result rows, settings made readable, unique by key
    runs: list[TrainRun]
    eval_grids: dict[str, Path]                     # row key -> the grid.png of that row's images
    extra_grids: list[tuple[str, Path]]             # (caption, png): e.g. base vs fine-tuned
    configs: list[tuple[str, str]]                  # (caption, YAML text) of the sweep / cells


def is_train_run(d: Path) -> bool:
    return ((d / "train_metrics.json").is_file() or (d / "adapter").is_dir() or (d / "checkpoints").is_dir()
            or any((d / "samples").glob("step=*.png")))


def cells(d: Path) -> list[Path]:
    return sorted((p for p in d.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))


def detect(d: Path) -> str:
    if not d.is_dir():
        raise FileNotFoundError(f"report.dir={d}: not a directory")
    if is_train_run(d):
        return "finetune_eval" if (d / "results.jsonl").is_file() else "train"
    if any(is_train_run(c) for c in cells(d)):
        return "train_eval_sweep"
    if (d / "results.jsonl").is_file():
        return "eval_sweep"
    raise FileNotFoundError(f"report.dir={d}: neither a training run (train_metrics.json, adapter/, samples/, "
                            "checkpoints/), nor an eval sweep (results.jsonl), nor a sweep of training runs")


def read_curves(run_dir: Path) -> dict[str, list[tuple[float, float]]]:
    """Every numeric column of the run's CSVLogger files (all versions: a resumed run adds one),
    as (step, value) pairs; blank cells (other metrics' rows) are skipped."""
    curves: dict[str, list[tuple[float, float]]] = {}
    files = sorted(run_dir.glob("csv/version_*/metrics.csv"), key=lambda p: int(p.parent.name.split("_")[-1]))
    for path in files:
        with open(path, newline="") as fh:
            for row in csv.DictReader(fh):
                step = _float(row.get("step"))
                for k, v in row.items():
                    if step is not None and k not in ("step", "epoch") and (x := _float(v)) is not None:
                        curves.setdefault(k, []).append((step, x))
    return {k: sorted(v) for k, v in curves.items()}


def _float(v: str | None) -> float | None:
    try:
        return float(v) if v else None
    except ValueError:
        return None


def read_run(d: Path, name: str) -> TrainRun:
    run = TrainRun(name=name, path=d, curves=read_curves(d))
    for p in d.glob("samples/step=*.png"):
        m = re.fullmatch(r"step=(\d+)\.png", p.name)
        if m:
            run.samples.append((int(m.group(1)), p))
    run.samples.sort()
    for p in sorted(d.glob("data_report_*.json")):
        try:
            run.data_reports[p.stem.removeprefix("data_report_")] = json.loads(p.read_text())
        except (OSError, ValueError) as err:
            log.warning("%s unreadable: %s", p, err)
    if (d / "train_metrics.json").is_file():
        run.train_metrics = json.loads((d / "train_metrics.json").read_text())
    if (d / ".hydra/config.yaml").is_file():
        run.config = (d / ".hydra/config.yaml").read_text()
    if not run.curves:
        run.log_note = ("no CSV log (csv/version_*/metrics.csv): curves need logger=csv; "
                        "a wandb offline run is read with `wandb sync`" if (d / "wandb").is_dir()
                        else "no CSV log (csv/version_*/metrics.csv) in this run")
    return run


def cell_labels(dirs: list[Path], seeds: bool = True) -> dict[Path, str]:
    """Each cell's overrides that not all cells share (``.hydra/overrides.yaml``), e.g. ``module.lora.r=4``;
    ``seeds=False`` leaves out seed overrides (the label of the setting, shared by its replicates)."""
    import yaml

    ovr = {}
    for c in dirs:
        f = c / ".hydra/overrides.yaml"
        ovr[c] = list(yaml.safe_load(f.read_text()) or []) if f.is_file() else []
    shared = set.intersection(*(set(v) for v in ovr.values())) if ovr else set()
    keep = {c: [o for o in v if o not in shared and (seeds or not is_seed(o.split("=")[0].lstrip("+~")))]
            for c, v in ovr.items()}
    return {c: " ".join(v) or (f"cell {c.name}" if seeds else "") for c, v in keep.items()}


def readable(row: dict[str, Any], root: Path, runs: dict[Path, str]) -> dict[str, Any]:
    """The row with ``settings.adapters`` as a short label (base, or path relative to the report
    dir + sha) and, for adapters trained in a sweep cell, ``settings.run`` = that cell's overrides."""
    s = dict(row["settings"])
    adapters = s.get("adapters")
    if isinstance(adapters, list):
        names = []
        for a in adapters:
            path = Path(a["path"] if isinstance(a, dict) else a)
            names.append(_short(path, root) + (f" ({a['sha256'][:8]})" if isinstance(a, dict) and a.get("sha256")
                                               else ""))
            run = next((lab for d, lab in runs.items() if path.is_relative_to(d)), None)
            if run is not None:
                s["run"] = run
        s["adapters"] = ", ".join(names) or BASE_LABEL
    return {**row, "settings": s}


def _short(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(Path(*path.parts[-2:]))


def eval_grid(row: dict[str, Any], root: Path) -> Path | None:
    """The grid.png in the row's run dir; if the dir was moved with its sweep, the same name under root."""
    rd = Path(row.get("run_dir") or "")
    for cand in (rd / "grid.png", root / rd.name / "grid.png"):
        if rd.name and cand.is_file():
            return cand
    return None


def collect(d: str | Path) -> Collected:
    root = Path(d).resolve()
    kind = detect(root)
    if kind in ("train", "finetune_eval"):
        run_dirs = {root: root.name}
    elif kind == "train_eval_sweep":
        run_dirs = cell_labels([c for c in cells(root) if is_train_run(c)])
    else:
        run_dirs = {}
    settings = cell_labels(list(run_dirs), seeds=False) if kind == "train_eval_sweep" else run_dirs
    raw = read_rows(root / "results.jsonl") + [r for c in run_dirs if c != root for r in read_rows(c / "results.jsonl")]
    seen, rows = set(), []
    for r in raw:   # the base model's row repeats in every cell of a train sweep: the same cell key
        if r.get("key") not in seen:
            seen.add(r.get("key"))
            rows.append(readable(r, root, {c: lab for c, lab in settings.items() if c != root}))
    grids = {r["key"]: g for r in rows if (g := eval_grid(r, root)) is not None}
    extra = [(("" if c == root else f"{lab}: ") + "base (top) vs fine-tuned (bottom), same prompts and seeds", p)
             for c, lab in run_dirs.items() for p in [c / "base_vs_finetuned.png"] if p.is_file()]
    configs = [("multirun.yaml (the sweep)", (root / "multirun.yaml").read_text())] \
        if (root / "multirun.yaml").is_file() else []
    if kind == "eval_sweep":
        configs += [(f"cell {c.name}: .hydra/overrides.yaml", (c / ".hydra/overrides.yaml").read_text())
                    for c in cells(root) if (c / ".hydra/overrides.yaml").is_file()]
        if not configs and (root / ".hydra/config.yaml").is_file():
            configs.append((".hydra/config.yaml", (root / ".hydra/config.yaml").read_text()))
    runs = [read_run(c, lab) for c, lab in run_dirs.items()]
    return Collected(kind, root, rows, runs, grids, extra, configs)
