"""A result's identity, written once: the whole resolved config minus a short named deny-list, plus
the content of the files it reads.

Every keyed result uses it: a training run's folder (``<run>/identity.json``, compared before a
sweep re-run reuses it or a resume continues it), a train-and-evaluate cell, an evaluation row,
a prepared set's plan. A key belongs to an identity unless it is listed below with the reason it
cannot change a number; a hand-picked list of "keys that matter" is how stale results are made.

    NOT_IDENTITY   keys that cannot change any number (outputs, logs, progress, caches keyed by content)
    RECORDED       recorded with each result, not in its identity (process count and device: rounding only)
    RESUMABLE      what a resume may change besides those: how long the run trains
    VIEW_IGNORES   what one kind of result does not read (the root config serves every task)
    CONTENT        keys naming files whose content joins the identity (``run.fingerprint``)

Not config keys, recorded beside an identity (``recorded()``): library versions, threads per process.

This room (``run``) is the lowest that may import the base's atomic writes (base modules import no
other base module), so the identity lives here rather than in ``hashing.py``.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import platform
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from toolkit.atomic import atomic_open
from toolkit.run.fingerprint import fingerprint

# key (a dotted key, or a prefix meaning the key and everything under it) -> why it cannot change a number
NOT_IDENTITY: dict[str, str] = {
    "hydra": "Hydra's own settings: where its files and logs go, how cells are launched",
    "paths": "where files go (outputs, caches, the miniature's folder); what is read there is fingerprinted",
    "logger": "dashboards and log files: what is reported, never what is computed",
    "task_reads": "the entry's bookkeeping: which groups a task reads",
    "chosen": "the reasons for values chosen from the model; the values are in the keys they set",
    "ckpt_path": "a resume continues the same run exactly; a checkpoint file given is fingerprinted by content",
    "trainer.enable_progress_bar": "progress output",
    "trainer.enable_model_summary": "a printed table of layers",
    "trainer.log_every_n_steps": "how often curves are written; the run's final figures are its last step's",
    "trainer.default_root_dir": "an output folder",
    "trainer.plugins": "how checkpoints are written (temp file, then rename)",
    "callbacks.model_checkpoint": "which checkpoints stay on disk; a resume from any of them is exact",
    "callbacks.preemption": "what a signal does; a run it stops resumes exactly",
    "max_requeues": "how often a job warned of its time limit requeues itself; a run it stops resumes exactly",
    "callbacks.progress": "progress output",
    "callbacks.lr_monitor": "a logged curve",
    "callbacks.throughput": "a logged speed",
    "callbacks.adapter_export": "which files the adapter is written as (each checked to carry it whole)",
    "callbacks.sample_grid": "a progress view from its own seeds; every training draw is seeded per sample",
    "callbacks.encoded_cache.dirpath": "where encoded rows are kept (keyed by encoder and content)",
    "callbacks.encoded_cache.from_prepared": "rows read from a prepared set or encoded here: the same rows",
    "callbacks.prior.dirpath": "where class images are kept (keyed by model, prompt and seed)",
    "module.speed.compile_cache": "where compiled graphs are kept",
    "module.speed.compile_check": "a check before the first update: a run it lets through is unchanged",
    "data.num_workers": "loader processes; every item's draws come from its own (seed, epoch, index)",
    "data.pin_memory": "page-locked loader memory",
    "data.policy.scan_workers": "scan threads",
    "data.report_dir": "where the data reports go",
    "data.scan_cache_dir": "where scan results are kept (keyed by the data's listing and the policy)",
    "data.local": "where a prepared set's shards are fetched to (each checked against its SHA-256)",
    "eval.results_file": "where rows are appended",
    "eval.save_images": "whether the generated images are also written as PNG",
    "eval.force": "recompute a cell that has a row",
    "eval.shard_size": "images per evaluation shard: whole batches, each image from its own seed",
    "metrics.cache_dir": "where reference features are kept (keyed by the set's content and the extractor)",
    "metrics.cache_reference": "whether reference features are kept between evaluations",
    "prepare.output": "where a prepared set is written (its plan is stored there)",
    "prepare.endpoint_url": "which S3 endpoint serves it",
    "prepare.multipart_mb": "how uploads are cut into parts; the stored shards are the same bytes",
    "prepare.wait_s": "how long processes of one prepare wait for each other",
    "memory.traces": "where traced memory footprints are kept (keyed by shapes, dtypes and library versions)",
    "memory.plan": "whether the memory plan is printed before the run (or only printed)",
    "memory.mode": "which memory the plan counts (cpu or gpu); batches come from memory.budget_gib alone",
    "memory.device_gib": "what the plan checks each phase against: it refuses or lets the run through unchanged",
    "callbacks.encoded_cache.memory": "the root memory settings handed to the callback: memory.* says each",
    "callbacks.prior.memory": "the root memory settings handed to the callback: memory.* says each",
}

# recorded with a result, not in its identity: how a job is spread, never what it computes
RECORDED: dict[str, str] = {
    "trainer.devices": "processes per node: folded into derived.micro_batches_per_step",
    "trainer.num_nodes": "nodes: folded into derived.micro_batches_per_step",
    "trainer.accumulate_grad_batches": "micro-batches per process and step: folded into derived.micro_batches_per_step",
    "trainer.accelerator": "the device type (rounding only)",
    "trainer.strategy": "how processes exchange gradients (DDP)",
    "fabric.accelerator": "the evaluation's device type (rounding only)",
    "fabric.devices": "evaluation processes: N give the images and metrics one gives",
    "fabric.strategy": "how evaluation processes meet",
    "prepare.device": "where a prepare encodes (rounding only)",
    "memory.budget_gib": "the batch of frozen-model phases (encoding, grids, generation, features): float rounding "
                         "only (tests/test_memory.py); the evaluation row records it",
}

# a resume may change these besides every key above: users extend (or cap) a run
RESUMABLE: dict[str, str] = {
    "trainer.max_steps": "train longer (the LR schedule is rebuilt for the new length)",
    "trainer.max_time": "a wall-clock cap",
}

# What one kind of result does not read: the root config holds every task's groups.
VIEW_IGNORES: dict[str, dict[str, str]] = {
    "run": {   # a training run (task=train, the training half of finetune_eval)
        "task_name": "train and finetune_eval train alike",
        "eval": "the evaluation's settings", "metrics": "the evaluation's metrics",
        "fabric": "the evaluation's processes",
        "adapter": "the adapter a task evaluates or samples", "adapter_variant": "which weights of that adapter",
        "generation": "read by training only through callbacks.prior.* and sample_grid.*, which hold its values",
    },
    "evaluation": {   # an evaluation row; a fine-tuned row also carries its training run's identity
        "task_name": "eval and finetune_eval evaluate alike",
        "adapter": "where the adapters are: each enters the row's key by its SHA-256",
        "module": "training only", "trainer": "training only", "callbacks": "training only", "seed": "training only",
        "data": "a held-out reference enters by its content and definition (evaluation.reference)",
    },
    "cell": {"task_name": "one task: finetune_eval"},   # a train-and-evaluate cell: the run and its evaluation
    "plan": {   # task=prepare's shards: scope data + prepare
        "data.global_batch_size": "how training batches the stored rows",
        "data.center_crop": "a training transform", "data.random_flip": "a training transform",
        "data.val_fraction": "training's held-out split", "data.validation_split": "training's held-out split",
        "data.seed": "training's split and order", "data.tags": "training's caption handling",
        "data.masks": "training's loss masks", "data.buckets": "training's batching by shape",
        "data.remote": "the same value as data.path (data=streaming)",
        "prepare.encode": "a second job on the prepared rows, keyed by its own settings",
    },
}
VIEW_SCOPE: dict[str, tuple[str, ...]] = {"plan": ("data", "prepare")}

# keys naming files whose content joins the identity: key -> (revision key, hub repo type)
CONTENT: dict[str, tuple[str | None, str]] = {
    "model.name_or_path": ("model.revision", "model"),
    "model.config": (None, "model"),
    "model.vae": (None, "model"),
    "module.init_adapter": (None, "model"),
    "data.path": ("data.revision", "dataset"),
    "data.masks": (None, "dataset"),
}
RECORD = "identity.json"
PACKAGES = ("toolkit", "torch", "diffusers", "transformers", "peft", "numpy", "scipy", "pillow",
            "lightning", "datasets")


def under(key: str, names: Iterable[str]) -> bool:
    """``key`` is one of ``names`` or lies under one of them."""
    return any(key == n or key.startswith(f"{n}.") for n in names)


def in_identity(key: str, view: str = "run") -> bool:
    """Whether a config key belongs to the ``view``'s identity (False: listed above)."""
    return not under(key, (*NOT_IDENTITY, *RECORDED, *VIEW_IGNORES.get(view, {})))


def may_change_on_resume(key: str) -> bool:
    return key in RESUMABLE or not in_identity(key)


@dataclass(frozen=True)
class Identity:
    """Flat ``keys`` (dotted config keys, ``content.<key>`` for file contents, ``derived.*``) and their digest."""

    keys: Mapping[str, Any]
    view: str = "run"
    digest: str = field(init=False)

    def __post_init__(self) -> None:
        blob = json.dumps(dict(self.keys), sort_keys=True, default=str)
        object.__setattr__(self, "digest", hashlib.sha256(blob.encode()).hexdigest()[:16])

    def nested(self) -> dict[str, Any]:
        """The keys as a tree (for rows and summaries)."""
        out: dict[str, Any] = {}
        for key, value in self.keys.items():
            *parents, leaf = key.split(".")
            node = out
            for p in parents:
                node = node.setdefault(p, {}) if isinstance(node.get(p, {}), dict) else node
            node[leaf] = value
        return out

    def differences(self, other: Mapping[str, Any], allow: Iterable[str] = (),
                    labels: tuple[str, str] = ("recorded", "now")) -> list[str]:
        """``key: recorded <other's>, now <this>`` for every key that differs, keys in ``allow`` left out."""
        allow = tuple(allow)
        keys = sorted(k for k in set(self.keys) | set(other) if not under(k, allow)
                      and _norm(self.keys.get(k, ABSENT)) != _norm(other.get(k, ABSENT)))
        return [f"{k}: {labels[0]} {other.get(k, ABSENT)!r}, {labels[1]} {self.keys.get(k, ABSENT)!r}" for k in keys]


ABSENT = "(absent)"


def _norm(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def _leaves(node: Any, prefix: str = "") -> list[str]:
    """Dotted leaf keys of an unresolved container (lists and empty dicts are leaves)."""
    if isinstance(node, dict) and node:
        return [k for key, v in node.items() for k in _leaves(v, f"{prefix}{key}.")]
    return [prefix[:-1]]


def _plain(value: Any) -> Any:
    if isinstance(value, DictConfig | ListConfig):
        return OmegaConf.to_container(value, resolve=True)
    return value


def _flat(key: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, dict) and value:
        for k, v in value.items():
            _flat(f"{key}.{k}", v, out)
    else:
        out[key] = value


def config_keys(cfg: DictConfig | Mapping[str, Any], view: str = "run") -> dict[str, Any]:
    """The view's resolved config leaves. Keys outside the identity are never resolved (they may
    interpolate Hydra's runtime, which a composed config lacks)."""
    c = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(dict(cfg))
    scope = VIEW_SCOPE.get(view)
    out: dict[str, Any] = {}
    for key in _leaves(OmegaConf.to_container(c, resolve=False)):
        if not in_identity(key, view) or (scope and not under(key, scope)):
            continue
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(c, parent) if parent else c
        value = "???" if OmegaConf.is_missing(node, leaf) else _plain(OmegaConf.select(c, key))
        _flat(key, value, out)
    return {k: v for k, v in out.items() if in_identity(k, view)}


def derived(keys: Mapping[str, Any], cfg: DictConfig | Mapping[str, Any]) -> dict[str, Any]:
    """What the folded keys determine together: micro-batches per optimizer step (processes ×
    accumulation), with ``data.global_batch_size`` the per-process micro-batch."""
    if "trainer.max_steps" not in keys:   # not a training view
        return {}
    t = OmegaConf.select(cfg, "trainer") if isinstance(cfg, DictConfig) else cfg.get("trainer", {})
    parts = [t.get("devices", 1), t.get("num_nodes", 1), t.get("accumulate_grad_batches", 1)]
    if all(isinstance(p, int) for p in parts):
        return {"derived.micro_batches_per_step": parts[0] * parts[1] * parts[2]}
    return {"derived.micro_batches_per_step": "x".join(map(str, parts))}


def contents(keys: Mapping[str, Any], cache_dir: str | Path | None) -> dict[str, Any]:
    """``content.<key>`` for every CONTENT key in ``keys`` naming a file, folder or hub id."""
    out = {}
    for key, (rev_key, repo_type) in CONTENT.items():
        value = keys.get(key)
        if value in (None, "", "alpha"):
            continue
        out[f"content.{key}"] = fingerprint(str(value), cache_dir, keys.get(rev_key) if rev_key else None, repo_type)
    return out


def started_from(cfg: DictConfig | Mapping[str, Any]) -> Path | None:
    """A checkpoint file of another run this run starts from (``ckpt_path=<file>`` outside the run's
    folder); None for a fresh start or a resume of the run itself."""
    if not isinstance(cfg, DictConfig) or OmegaConf.select(cfg, "ckpt_path") in (None, "last"):
        return None
    ckpt = Path(str(cfg.ckpt_path)).expanduser().resolve()
    try:
        own = Path(str(cfg.paths.output_dir)).resolve()
    except Exception:   # noqa: BLE001 - composed without Hydra's runtime: no run folder to compare with
        own = None
    return ckpt if ckpt.is_file() and (own is None or not ckpt.is_relative_to(own)) else None


def identity(cfg: DictConfig | Mapping[str, Any], view: str = "run", with_contents: bool = True) -> Identity:
    """The identity of what ``cfg`` computes, seen as ``view`` (``run``, ``evaluation``, ``cell``,
    ``plan``): config keys, derived keys and (``with_contents``) the content of the files named."""
    keys = config_keys(cfg, view)
    keys.update(derived(keys, cfg))
    if with_contents:
        cache = OmegaConf.select(cfg, "paths.cache_dir") if isinstance(cfg, DictConfig) else None
        keys.update(contents(keys, cache))
        if view in ("run", "cell") and (ckpt := started_from(cfg)) is not None:
            keys["content.ckpt_path"] = fingerprint(str(ckpt), cache)
    return Identity(dict(sorted(keys.items())), view)


def versions() -> dict[str, str]:
    """The Python and library versions a result was made with (recorded, not identity)."""
    out = {"python": platform.python_version()}
    for p in PACKAGES:
        try:
            out[p] = importlib.metadata.version(p)
        except importlib.metadata.PackageNotFoundError:
            out[p] = "absent"
    return out


def recorded(cfg: DictConfig | None = None) -> dict[str, Any]:
    """What a result records beside its identity: versions, threads, the RECORDED keys' values."""
    import torch

    out: dict[str, Any] = {"versions": versions(), "threads": torch.get_num_threads()}
    if cfg is not None:
        out["config"] = {k: OmegaConf.select(cfg, k) for k in RECORDED if OmegaConf.select(cfg, k) is not None}
    return out


def write_record(run: str | Path, ident: Identity, cfg: DictConfig | None = None) -> Path:
    """``<run>/identity.json``: the identity of what the folder holds, and what was recorded beside it."""
    path = Path(run) / RECORD
    with atomic_open(path, "w") as fh:
        json.dump({"view": ident.view, "digest": ident.digest, "keys": dict(ident.keys),
                   "recorded": recorded(cfg)}, fh, indent=1, default=str)
    return path


def read_record(run: str | Path) -> dict[str, Any] | None:
    """The folder's recorded identity keys, or None when it has none (made before identities were recorded)."""
    path = Path(run) / RECORD
    if not path.is_file():
        return None
    return json.loads(path.read_text())["keys"]
