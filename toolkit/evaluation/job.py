"""One evaluation: generate images for a reference set's captions, score what ``metrics.compute``
lists (FID, KID, CLIP score, CMMD, FD in DINOv2 space, style similarity, ...: ``scores.py``) with
intervals, append one row to the results table (the body of ``task=eval`` and of both halves of
``task=finetune_eval``'s evaluation).

Image i uses caption i of the reference set (cycled) and seed ``eval.seed·10⁶ + i``; the
``eval.num_held_out`` images after them cycle through ``eval.held_out_prompts``. Ranks take
disjoint indices, so N processes give the same images and metrics as one. Each feature space's
reference features are cached under a key of its own protocol. A row is keyed by the hash of its
identity (``toolkit.run.identity``, view ``evaluation``: the whole config but what cannot change a
number and what only training reads) and of its settings by content (prompts, reference set,
model, adapters, metric and feature-model weights); a cell whose key is in the table is skipped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from toolkit.atomic import atomic_open
from toolkit.data.sources import CAPTION_PROBLEM
from toolkit.data.validate import DataPolicy
from toolkit.evaluation import reference, shipped
from toolkit.evaluation.budget import eval_budget
from toolkit.evaluation.distributed import gather_by_index, shard
from toolkit.evaluation.protocol import METRIC_IMPL, read_prompts, versions
from toolkit.evaluation.scores import (
    PER_IMAGE_TEXT,
    Metric,
    compute_scores,
    parse_metrics,
    per_image_key,
    per_image_scores,
    per_prompt,
    reference_file_key,
    spaces_needed,
)
from toolkit.hashing import settings_key
from toolkit.inference.pipeline import call_kwargs, generate, generation_record, make_grid, pipeline_from_cfg
from toolkit.logs import route_library_logs
from toolkit.metrics import perceptual
from toolkit.metrics.clip import CLIPScorer, load_clip, load_preference
from toolkit.metrics.features import FeatureModel
from toolkit.metrics.inception import InceptionFeatures
from toolkit.metrics.intervals import mean_interval
from toolkit.metrics.moments import Moments, fid_from_moments
from toolkit.models.pretrained import denoiser_config, model_family, vae_factor
from toolkit.results import append_new_row, append_row, find_row, read_rows, resolved, stored_path, without_identity
from toolkit.run import signals
from toolkit.run.identity import identity
from toolkit.run.world import cluster_environment, job_world
from toolkit.tracking import MLflowLogger

log = logging.getLogger(__name__)


def results_path(cfg: DictConfig) -> Path:
    if cfg.eval.results_file:
        return Path(cfg.eval.results_file)
    hc = HydraConfig.get() if HydraConfig.initialized() else None
    if hc is not None and hc.mode == RunMode.MULTIRUN:
        return Path(hc.sweep.dir) / "results.jsonl"
    return Path(cfg.paths.output_dir) / "results.jsonl"


def loggers_of(cfg: DictConfig) -> list[Any]:
    """The configured dashboards, made at the start of an evaluation: a tracker that cannot be
    reached fails before anything is computed (wandb and TensorBoard start their runs lazily)."""
    return [instantiate(c) for c in (cfg.get("logger") or {}).values()]


def log_to_loggers(loggers: list[Any], row: dict[str, Any], grid_path: Path, table: Path) -> None:
    """The eval row on the dashboards: metrics, the settings as config, the row as a table with the
    cell's sample grid (wandb), as a text table (TensorBoard), or as a run of its own (MLflow)."""
    from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

    name = "eval_" + ("finetuned" if row["settings"].get("adapters") else "base")
    for lg in loggers:
        if isinstance(lg, MLflowLogger):   # one run per row, logged once: a sweep compares in the MLflow UI
            lg.log_row(row, [grid_path], lock=f"{table}.lock")
            continue
        lg.log_metrics({f"{name}/{k}": v for k, v in row["metrics"].items()})
        if isinstance(lg, WandbLogger):
            import wandb

            lg.experiment.config.update({name: row["settings"]}, allow_val_change=True)
            lg.experiment.summary.update({f"{name}/{k}": v for k, v in row["metrics"].items()})
            cols = ["key", *row["metrics"], "grid"]
            lg.log_table(f"{name}/results", columns=cols,
                         data=[[row["key"], *row["metrics"].values(), wandb.Image(str(grid_path))]])
        elif isinstance(lg, TensorBoardLogger):
            text = "| metric | value |\n|---|---|\n" + "\n".join(f"| {k} | {v:.5g} |"
                                                               for k, v in row["metrics"].items())
            lg.experiment.add_text(f"{name}/results", text)
            lg.experiment.add_image(f"{name}/grid", np.asarray(Image.open(grid_path).convert("RGB")), 0,
                                    dataformats="HWC")
        lg.finalize("success")


def attach_to_loggers(cfg: DictConfig, row_key: str, files: list[Path]) -> None:
    """Files written after the evaluation (the job's report, summary and comparison grid) to the
    trackers that keep files per run (MLflow: the row's run and the training's)."""
    for lg in loggers_of(cfg):
        if isinstance(lg, MLflowLogger):
            lg.attach(row_key, files)


def prompt_groups(prompts: list[str]) -> tuple[list[str], list[str] | None]:
    """Prompts written ``[group] prompt`` (in a prompts file) are scored per group too: returns the
    prompts without the tag and the groups (None when the prompts carry no tags)."""
    tagged = [re.match(r"^\[([^\]]+)\]\s*(.+)$", p) for p in prompts]
    if not all(tagged):
        return prompts, None
    return [t.group(2) for t in tagged], [t.group(1) for t in tagged]


def generated_size(cfg: DictConfig) -> tuple[int, int]:
    """(width, height) of the generated images: the eval settings, else the denoiser/VAE configs'."""
    name, rev, conf = cfg.model.name_or_path, cfg.model.revision, cfg.model.get("config")
    native = model_family(name, rev, conf).native_size(denoiser_config(name, rev, conf), vae_factor(name, rev, conf))
    return int(cfg.eval.width or native), int(cfg.eval.height or native)


def reference_size(cfg: DictConfig) -> tuple[int, int] | None:
    """(width, height) reference images are brought to: the generated size (``metrics.reference_size
    = generated``), or None (``native``)."""
    if cfg.metrics.reference_size == "native":
        return None
    if cfg.metrics.reference_size != "generated":
        raise ValueError(f"metrics.reference_size={cfg.metrics.reference_size!r}: expected generated or native")
    return generated_size(cfg)


def build_fabric(cfg: DictConfig) -> Any:
    """The evaluation's processes. A job that already runs on several evaluates on those same
    processes, once, sharded: DDP training earlier in this job (its process group is up), or a
    launch by srun, sbatch, submitit or torchrun (``run.world``: SLURM and torchrun set no
    ``WORLD_SIZE`` that would tell otherwise, srun none at all); otherwise ``cfg.fabric`` (one
    process unless ``fabric.devices`` says more, started by Lightning's launcher)."""
    import torch.distributed as dist
    from lightning import Fabric

    route_library_logs()   # importing lightning (here, for an eval task) gave it its own console handler
    world = job_world()
    joined = dist.is_available() and dist.is_initialized()
    size = dist.get_world_size() if joined else world.size if world.external else 1
    if size > 1:
        local = world.local_size if world.external else int(os.environ.get("LOCAL_WORLD_SIZE", 0)) or \
            size // (int(cfg.trainer.num_nodes) if "trainer" in cfg else 1)
        fabric = Fabric(accelerator=cfg.fabric.accelerator, devices=local, num_nodes=size // local, strategy="ddp",
                        plugins=[cluster_environment()])
    else:
        fabric = instantiate(cfg.fabric)
    fabric.launch()
    signals.forward_to(getattr(fabric.strategy.launcher, "procs", None) or [])
    return fabric


def reference_set(cfg: DictConfig) -> reference.ReferenceSet:
    """The usable reference rows (through ``data.policy``), their identity, image column and captions."""
    ev = cfg.eval
    if ev.dataset in (None, "auto"):
        raise ValueError(f"eval.dataset={ev.dataset!r}: run.py chooses it from the model "
                         "(toolkit.model_defaults); composed by hand, name a reference set")
    if ev.dataset == "held_out":
        return reference.load_held_out(cfg.data, ev.num_ref)
    policy = DataPolicy(**OmegaConf.to_container(cfg.data.policy, resolve=True))
    return reference.load_reference(ev.dataset, ev.image_column, ev.caption_column, ev.split, ev.num_ref,
                                    ev.revision, f"{cfg.paths.cache_dir}/prepared",   # as data.local
                                    policy, cfg.data.get("resolution"), cfg.data.get("scan_cache_dir"))


MIN_SHARDS = 8   # a small evaluation is cut into this many shards (whole batches allowing), so 8 ranks share it


def shard_plan(n: int, shard_size: int, batch_size: int) -> list[tuple[int, int]]:
    """Images ``[start, stop)`` per shard: whole batches, so a batch holds the same images whatever
    the number of processes (the numerics of a batch depend on its members); at most
    ``shard_size`` images (rounded up to whole batches), and at least ``MIN_SHARDS`` shards where
    the batches allow, so a small evaluation (the default 250 images) is spread over up to 8
    ranks. The plan depends on n alone, never on the number of processes: a shard holds the same
    images, scored in the same feature batches, on any number of them."""
    per_shard = min(-(-shard_size // batch_size), max(1, -(-n // (MIN_SHARDS * batch_size))))
    size = max(1, per_shard) * batch_size
    return [(a, min(a + size, n)) for a in range(0, n, size)]


def shard_file(shard_dir: Path, start: int, stop: int) -> Path:
    return shard_dir / f"{start:08d}-{stop:08d}.npz"


def write_shard(path: Path, index: np.ndarray, feats: dict[str, np.ndarray], texts: dict[str, np.ndarray]) -> None:
    """One shard's per-image features (per space, ``per_image_key``) and text–image scores (``clip``,
    ``preference``), written whole or not at all. Features are float32 network outputs, stored as
    float32 where that loses nothing."""
    arrays = {}
    for space, f in feats.items():
        exact = np.array_equal(f.astype(np.float32).astype(f.dtype), f)
        arrays[per_image_key(space)] = f.astype(np.float32) if exact else f
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path) as fh:
        np.savez(fh, index=index, **{PER_IMAGE_TEXT[k]: v for k, v in texts.items()}, **arrays)


def read_shards(shard_dir: Path, plan: list[tuple[int, int]], spaces: list[str], first: int | None = None,
                texts: tuple[str, ...] = ("clip_score",)
                ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], Moments | None]:
    """All shards in index order: each space's features (float64), the ``texts`` scores, and the float64
    moments of the Inception features of images below ``first`` (all: None) combined shard by
    shard (None without Inception). Every image must be there exactly once."""
    feats: dict[str, list[np.ndarray]] = {s: [] for s in spaces}
    scores: dict[str, list[np.ndarray]] = {t: [] for t in texts}
    total = None
    for start, stop in plan:
        path = shard_file(shard_dir, start, stop)
        if not path.is_file():
            raise RuntimeError(f"evaluation shard {path} is missing after every rank finished: a rank failed "
                               "to write it (see its log); run the evaluation again to compute only what is missing")
        with np.load(path) as z:
            if not np.array_equal(z["index"], np.arange(start, stop)):
                raise RuntimeError(f"evaluation shard {path} holds other images than {start}-{stop}")
            for s in spaces:
                f = z[per_image_key(s)].astype(np.float64)
                feats[s].append(f)
                part = f[: max(0, min(stop, first) - start)] if first is not None else f
                if s == "inception" and len(part):   # one d×d scatter held
                    total = Moments.of(part) if total is None else total + Moments.of(part)
            for t in texts:
                scores[t].append(z[PER_IMAGE_TEXT[t]])
    return ({s: np.concatenate(v) for s, v in feats.items()}, {t: np.concatenate(v) for t, v in scores.items()},
            total)


def check_moments(fid: float, fid_moments: float) -> None:
    """The FID of the combined per-shard moments must be the FID of the assembled features: a
    mismatch means shards that do not belong together."""
    if abs(fid - fid_moments) > 1e-6 * max(abs(fid), 1.0):
        raise RuntimeError(f"FID from the assembled features ({fid!r}) and from the shards' combined moments "
                           f"({fid_moments!r}) differ: the evaluation shards are inconsistent")


def feature_models(m: DictConfig, metrics: list[Metric], clip: CLIPScorer | None, device: Any,
                   batch_size: int | None = None) -> dict[str, Any]:
    """The extractor of every feature space ``metrics`` use. ``features.clip=same`` is the CLIP
    score's model (absent, with its metrics, when ``metrics.clip_model=null``); any other space
    named null while a metric needs it is an error saying which key to set. ``batch_size``: the
    budget's (``evaluation.budget``), else ``metrics.feature_batch_size``."""
    out: dict[str, Any] = {}
    batch = batch_size or m.feature_batch_size
    for space in spaces_needed(metrics):
        name = m.features.get(space)
        if space == "inception":
            out[space] = InceptionFeatures(name, device, batch, m.channels_last)
        elif space == "clip" and name == "same":
            if clip is not None:
                out[space] = FeatureModel("clip", clip.name, device, batch, model=clip.model, sha256=clip.sha256)
        elif not name:
            users = [x.name for x in metrics if x.space == space]
            raise ValueError(f"metrics.compute has {users}, computed on metrics.features.{space}, which is null: "
                             f"name the model (hub id or local folder; README, Evaluation) or drop them from "
                             "metrics.compute")
        else:
            out[space] = FeatureModel(space, name, device, batch)
    return out


def protocol_of(space: str, extractor: Any, ref_size: tuple[int, int] | None) -> dict[str, Any]:
    """A space's preprocessing and weights: in the row and in its reference cache key (Inception's
    as before feature spaces existed, so its cached reference features stay valid)."""
    return {**extractor.protocol, "reference_size": ref_size}


def reference_features(fabric: Any, m: DictConfig, ref: Any, image_column: str, ref_size: tuple[int, int] | None,
                       ref_identity: dict[str, Any], extractors: dict[str, Any], batch_size: int | None = None
                       ) -> tuple[dict[str, np.ndarray], dict[str, str], dict[str, str]]:
    """Each space's reference features, from the cache where there, else shipped with the reference
    set under the same key (``metrics.shipped_reference``; rank zero decides: a node-local cache may
    differ per node), else computed sharded over the processes from one decoding of the images;
    each space's cache key; and where each came from (cache, shipped, computed)."""
    rank, world = fabric.global_rank, fabric.world_size
    protocols = {s: protocol_of(s, e, ref_size) for s, e in extractors.items()}
    keys = {s: reference.cache_key(ref_identity, p) for s, p in protocols.items()}
    found = {s: reference.load_cached(m.cache_dir, k) for s, k in keys.items()} if m.cache_reference and rank == 0 \
        else {}
    source = {s: "cache" for s, v in found.items() if v is not None}
    if rank == 0:
        folder = reference.shipped_folder(m.get("shipped_reference"))
        for s in [s for s in extractors if found.get(s) is None]:
            if (v := shipped.lookup(folder, keys[s], s, ref_identity, protocols[s])) is not None:
                found[s], source[s] = v, "shipped"
                if m.cache_reference:   # where the row's reference file points, as if computed
                    reference.save_cached(m.cache_dir, keys[s], v)
    missing = fabric.broadcast([s for s in extractors if found.get(s) is None], 0)
    real = {s: v for s, v in found.items() if v is not None}
    source.update(dict.fromkeys(missing, "computed"))
    if missing:
        idx = shard(len(ref), rank, world, batch_size or m.feature_batch_size)   # the extractors' batches
        rows = (ref[i] for i in idx)
        images = [reference.reference_image(r[image_column], ref_size, r.get(CAPTION_PROBLEM)) for r in rows]
        for s in missing:
            feats = extractors[s](images, desc=f"reference features ({s})")
            real[s] = np.stack(gather_by_index(idx, list(feats), world))
            if rank == 0 and m.cache_reference:
                reference.save_cached(m.cache_dir, keys[s], real[s])
    return real, keys, source


def image_prompts(prompts: list[str], groups: list[str] | None, held: list[str] | None, n: int, n_held: int
                  ) -> tuple[list[str], list[str] | None]:
    """The prompt (and group) of each image: i < n cycles through the prompts, the n_held after
    them through the held-out prompts (group ``held-out``; the others ``in-distribution`` unless
    tagged)."""
    first = [prompts[i % len(prompts)] for i in range(n)]
    if not held:
        return first, groups and [groups[i % len(groups)] for i in range(n)]
    tags = [groups[i % len(groups)] for i in range(n)] if groups else ["in-distribution"] * n
    return first + [held[i % len(held)] for i in range(n_held)], tags + ["held-out"] * n_held


def prompt_ids(prompts: list[str], n: int) -> np.ndarray:
    """Each image's prompt as an integer: images from the same prompt text in the same part (the
    first n in-distribution, the rest held-out) share one."""
    ids: dict[tuple[bool, str], int] = {}
    return np.array([ids.setdefault((i >= n, p), len(ids)) for i, p in enumerate(prompts)], dtype=np.int64)


def lpips_plan(prompt_index: np.ndarray, n: int, size: tuple[int, int], smallest: int, net: str) -> dict[str, int]:
    """How many prompts of each part have two images or more (scored) or one (left out, counted);
    an in-distribution part with none scored, or images too small for the trunk, fail before
    anything is generated."""
    if min(size) < smallest:
        raise ValueError(f"lpips_diversity with metrics.lpips.net={net} needs images of at least {smallest} px a side, "
                         f"but the eval generates {size[0]}x{size[1]}: set eval.width and eval.height to "
                         f"{smallest} or more, or metrics.lpips.net=vgg (16 px)")
    out = {}
    for part, ids in (("in_distribution", prompt_index[:n]), ("held_out", prompt_index[n:])):
        counts = np.unique(ids, return_counts=True)[1]
        out[f"{part}_prompts_scored"], out[f"{part}_prompts_with_one_image"] = int((counts > 1).sum()), \
            int((counts == 1).sum())
    if not out["in_distribution_prompts_scored"]:
        raise ValueError(f"lpips_diversity compares images of the same prompt, but eval.num_images={n} gives each of "
                         f"its {out['in_distribution_prompts_with_one_image']} prompts one image: raise "
                         "eval.num_images to a multiple of the prompts (or give eval.prompts fewer)")
    for part in ("in_distribution", "held_out"):
        if out[f"{part}_prompts_with_one_image"]:
            log.warning("lpips_diversity: %d %s prompt(s) have one image and are left out of it (%d scored)",
                        out[f"{part}_prompts_with_one_image"], part.replace("_", "-"), out[f"{part}_prompts_scored"])
    return out


def image_file(shard_dir: Path, i: int) -> Path:
    return shard_dir / "images" / f"{i:08d}.npy"


def lpips_by_prompt(model: perceptual.LPIPS, shard_dir: Path, prompt_index: np.ndarray, rank: int, world: int,
                    batch_size: int, device: Any) -> tuple[list[int], list[float]]:
    """rᵢ (``perceptual.per_image``; NaN alone in its prompt) of every image of the prompts p with
    p ≡ rank (mod world), from the images the shards saved: a prompt's images lie in several shards."""
    index, values = [], []
    for p in np.unique(prompt_index)[rank::world]:
        idx = np.flatnonzero(prompt_index == p)
        d = perceptual.pairwise(model, [np.load(image_file(shard_dir, i)) for i in idx], batch_size, device)
        index += idx.tolist()
        values += perceptual.per_image(d).tolist()
    return index, values


def evaluate(cfg: DictConfig, record: dict[str, Any] | None = None) -> dict[str, Any]:
    """One evaluation cell; returns its results row ({} on ranks other than zero). ``record`` (the
    training run behind the adapter) joins the row and its key, so a train-and-evaluate sweep
    keeps one row per trained cell. Rank zero alone reads and writes the results table."""
    fabric = build_fabric(cfg)
    rank, world = fabric.global_rank, fabric.world_size
    ev, m = cfg.eval, cfg.metrics
    out = Path(cfg.paths.output_dir)
    table = results_path(cfg)

    loggers = loggers_of(cfg) if rank == 0 else []
    refset = reference_set(cfg)
    ref, ref_identity, image_column = refset.rows, refset.identity, refset.image_column
    wanted = parse_metrics(m.compute)
    # batches from memory.budget_gib and the configs alone: the same on every process (whole-batch shards)
    mem = instantiate(cfg.memory)
    budget = eval_budget(cfg, ev, mem)
    needs_clip = any(x.name == "clip_score" or (x.space == "clip" and m.features.clip == "same") for x in wanted)
    clip = load_clip(m.clip_model, fabric.device, budget.feature_batch) if needs_clip else None
    preference = load_preference(m.get("preference_model"), fabric.device, budget.feature_batch) if any(
        x.name == "preference" for x in wanted) else None
    extractors = feature_models(m, wanted, clip, fabric.device, budget.feature_batch)
    lp, lp_protocol = perceptual.load(m.lpips.net, m.lpips.backbone, m.lpips.heads) if any(
        x.name == "lpips_diversity" for x in wanted) else (None, {})
    lp = lp.to(fabric.device) if lp is not None else None
    scorers = {k: v for k, v in (("clip_score", clip), ("preference", preference)) if v is not None}
    metrics = [x for x in wanted
               if (x.space in extractors if x.space else x.name in scorers or x.name == "lpips_diversity")]
    skipped = [x.name for x in wanted if x not in metrics]   # CLIP off: said in the row's protocol
    spaces = list(extractors)
    prompts = read_prompts(ev.prompts, "eval.prompts") if ev.prompts else refset.captions
    prompts_sha256 = hashlib.sha256(json.dumps(prompts).encode()).hexdigest()
    prompts, groups = prompt_groups(prompts)
    held = read_prompts(ev.held_out_prompts, "eval.held_out_prompts") if ev.get("held_out_prompts") else None
    n, n_held = int(ev.num_images), int(ev.num_held_out) if held else 0
    total = n + n_held
    all_prompts, all_groups = image_prompts(prompts, groups, held, n, n_held)
    prompt_index = prompt_ids(all_prompts, n)
    lp_counts = lpips_plan(prompt_index, n, generated_size(cfg), lp.smallest_input(), lp.net) if lp is not None else {}
    ref_size = reference_size(cfg)
    inception = extractors.get("inception")
    # Everything the row's numbers depend on: a change to any of these recomputes the cell.
    settings = {**generation_record(cfg, ev), "dataset": ref_identity, "num_ref": len(ref), "num_images": n,
                "seed": int(ev.seed), "prompts": str(ev.prompts or "dataset captions"),
                "prompts_sha256": prompts_sha256, "inception_sha256": inception.sha256 if inception else None,
                "clip_model": m.clip_model if clip else None, "clip_sha256": clip.sha256 if clip else None,
                **({"preference_model": preference.name, "preference_sha256": preference.sha256} if preference
                   else {}),
                "features": {s: {"model": e.name, "sha256": e.sha256} for s, e in extractors.items()
                             if s != "inception"},
                **({"lpips": {k: lp_protocol[k] for k in ("net", "backbone_sha256", "heads_sha256")}} if lp else {}),
                "metrics": {"compute": sorted(x.name for x in metrics),
                            **{k: m[k] for k in ("level", "interval_groups", "channels_last")},
                            "reference_size": ref_size}}
    if held:
        settings["held_out"] = {"prompts_sha256": hashlib.sha256(json.dumps(held).encode()).hexdigest(),
                                "num_images": n_held}
    if record:
        settings["train"] = record["settings"]
    ident = identity(cfg, "evaluation")
    # keyed by content: an adapter is its SHA-256 (the path stays in the row's settings, for reading)
    by_content = [{k: v for k, v in a.items() if k != "path"} for a in settings["adapters"]]
    key = settings_key({**settings, "adapters": by_content, "identity": ident.digest})
    if rank == 0 and (old := without_identity(read_rows(table))):
        log.info("%s: %d rows were made before identities were recorded: never reused as this cell's", table,
                 len(old))
    done = fabric.broadcast(find_row(table, key) if rank == 0 else None, 0)
    if done is not None and not ev.force:
        if rank == 0:
            log.info("cell %s already in %s: skipped (eval.force=true recomputes)", key, table)
            for lg in loggers:   # a tracker added later gets the row once (MLflow: never twice)
                if isinstance(lg, MLflowLogger):
                    lg.log_row(done, [Path(done["files"]["grid"])], lock=f"{table}.lock")
        return done if rank == 0 else {}

    t0 = time.time()
    real, ckeys, ref_source = reference_features(fabric, m, ref, image_column, ref_size, ref_identity, extractors,
                                                 budget.feature_batch)
    t_ref = time.time() - t0

    grid = out / "grid.png"
    plan, shard_dir = shard_plan(total, int(ev.shard_size), budget.generation_batch), out / "eval_shards" / key
    mine = plan[rank::world]
    todo = [(a, b) for a, b in mine if not shard_file(shard_dir, a, b).is_file()]   # others: an earlier attempt's
    made, reused = 0, len(mine) - len(todo)
    pipe = pipeline_from_cfg(cfg, ev, fabric.device) if todo else None
    from_scorer = {"clip"} if "clip" in extractors and m.features.clip == "same" and clip is not None else set()
    timing = dict.fromkeys(["generate", *scorers, *(s for s in spaces if s not in from_scorer),
                            *(["lpips"] if lp else [])], 0.0)
    t1 = time.time()
    for start, stop in todo:
        path = shard_file(shard_dir, start, stop)
        idx = list(range(start, stop))
        my_prompts = [all_prompts[i] for i in idx]
        tg = time.time()
        images = generate(pipe, my_prompts, [int(ev.seed) * 10**6 + i for i in idx], ev.steps, ev.guidance_scale,
                          ev.negative_prompt, ev.height, ev.width, budget.generation_batch,
                          desc=f"generate {start}-{stop} (rank {rank})", call_kwargs=call_kwargs(cfg.model))
        timing["generate"] += time.time() - tg
        if ev.save_images:
            (out / "samples").mkdir(parents=True, exist_ok=True)
            for i, img in zip(idx, images):
                img.save(out / "samples" / f"{i:05d}.png")
        if start == 0:
            grid.parent.mkdir(parents=True, exist_ok=True)   # eval.save_images=false made no samples/ folder
            make_grid(images[:64], cols=8).save(grid)
        if lp is not None:   # LPIPS pairs a prompt's images, which lie in several shards
            (shard_dir / "images").mkdir(parents=True, exist_ok=True)
            for i, img in zip(idx, images):
                with atomic_open(image_file(shard_dir, i)) as fh:
                    np.save(fh, np.asarray(img.convert("RGB")))
        feats, texts = {}, {}
        for name, scorer in scorers.items():   # the CLIP score's unit image embeddings are CMMD's (clip=same)
            tc = time.time()
            texts[name], embeddings = scorer.scores_and_embeddings(images, my_prompts)
            if name == "clip_score" and from_scorer:
                feats["clip"] = embeddings
            timing[name] += time.time() - tc
        for s in spaces:
            if s not in feats:
                ts = time.time()
                feats[s] = extractors[s](images, desc=f"generated features ({s})")
                timing[s] += time.time() - ts
        write_shard(path, np.array(idx), feats, {k: np.asarray(v, np.float64) for k, v in texts.items()})
        made += len(idx)
    t_gen = time.time() - t1
    if lp is not None:   # every shard's images written, each rank scores its share of the prompts
        fabric.barrier()
        tl = time.time()
        lp_values = gather_by_index(*lpips_by_prompt(lp, shard_dir, prompt_index, rank, world,
                                                     int(m.feature_batch_size), fabric.device), world)
        timing["lpips"] = time.time() - tl
    counts = gather_by_index([rank], [(made, reused, timing)], world)
    fabric.barrier()
    if rank != 0:
        return {}
    made, reused = sum(c[0] for c in counts), sum(c[1] for c in counts)
    timing = {k: sum(c[2][k] for c in counts) for k in timing}   # process-seconds of each part
    if reused:
        log.info("eval %s: %d of %d shards from an earlier attempt (%s), %d images generated now",
                 key, reused, len(plan), shard_dir, made)
    fake, text_scores, moments = read_shards(shard_dir, plan, spaces, first=n, texts=tuple(scorers))
    if lp is not None:
        text_scores["lpips_diversity"] = np.asarray(lp_values, np.float64)
    ref_files = {s: reference.cache_path(m.cache_dir, ckeys[s]) if m.cache_reference else
                 reference.save_cached(out, f"reference_features_{s}", real[s]) for s in spaces}
    refs = {s: reference.statistics(f) for s, f in ref_files.items()}
    t2 = time.time()
    scores = compute_scores(refs, {s: f[:n] for s, f in fake.items()}, {k: v[:n] for k, v in text_scores.items()},
                            metrics, m.interval_groups, m.level, seed=int(ev.seed), prompt_index=prompt_index[:n])
    per_img = per_image_scores(refs, fake, text_scores, metrics)
    for k, v in per_img.items():
        if n_held and k == "lpips_diversity":   # the per-image metrics on the held-out prompts
            if lp_counts["held_out_prompts_scored"]:
                scores.update(perceptual.diversity_interval(v[n:], prompt_index[n:], m.level).to_dict(f"{k}_held_out"))
        elif n_held:
            scores.update(mean_interval(v[n:], m.level).to_dict(f"{k}_held_out"))
    t_score = time.time() - t2
    methods = {k: scores.pop(k) for k in list(scores) if k.endswith("_ci_method")}
    fits = {k: scores.pop(k) for k in list(scores) if isinstance(scores[k], list)}   # FD∞'s subset fits
    if "fid" in scores:
        ref_stats = refs["inception"]
        check_moments(scores["fid"], fid_from_moments(ref_stats.mu, ref_stats.sigma, moments, ref_stats.sigma_sqrt))
    # seconds: the reference features, the loop over shards (generation + features + text scores:
    # images_per_second counts it), each of its parts (process-seconds), and the metrics' maths
    metrics_out = {**scores, "seconds_reference": t_ref, "seconds_loop": t_gen,
                   "images_per_second": made / max(t_gen, 1e-9), "seconds_scores": t_score,
                   **{f"seconds_{k}": v for k, v in timing.items()}}
    # Per-image features and scores: what a paired comparison with another cell (same prompts and
    # seeds) needs, without generating anything again.
    all_seeds = np.array([int(ev.seed) * 10**6 + i for i in range(total)])
    per_image = out / "per_image.npz"
    with atomic_open(per_image) as fh:
        texts = {"clip": np.full(total, np.nan)} | {PER_IMAGE_TEXT[k]: v for k, v in text_scores.items()}   # NaN: off
        np.savez(fh, seeds=all_seeds, prompt_index=prompt_index, **texts,
                 **{per_image_key(s): f.astype(np.float32) for s, f in fake.items()})
    files = {"per_image": per_image, "grid": grid,
             **{reference_file_key(s): f for s, f in ref_files.items()}}
    row = {"key": key, "identity": ident.digest, "settings": settings, "metrics": metrics_out,
           "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
           "per_prompt": per_prompt(all_prompts, per_img, all_groups, m.level, prompt_index),
           # relative to the table's folder where under it: a moved sweep keeps its files (and pairs)
           "files": {k: stored_path(v, table.parent) for k, v in files.items()},
           "protocol": {**(protocol_of("inception", inception, ref_size) if inception else {}),
                        "reference_size": ref_size,
                        "features": {s: e.protocol for s, e in extractors.items() if s != "inception"},
                        **(clip.protocol if clip else {"clip": "skipped"}),
                        **(preference.protocol if preference else {}),
                        **({"lpips": lp_protocol | lp_counts} if lp else {}),
                        "skipped": {x: "metrics.clip_model=null" for x in skipped},
                        "metric_impl": METRIC_IMPL, "intervals": methods, "level": m.level,
                        "fid_infinity": fits or "off", "versions": versions(), "world_size": world,
                        "seed_rule": "seed_i = eval.seed*1e6 + i",
                        "images": {"in_distribution": n, "held_out": n_held},
                        "reference_cache": ckeys.get("inception"), "reference_caches": ckeys,
                        "reference_source": ref_source,
                        "reference_scan": refset.scan,   # the data policy's rejections (data.policy)
                        "shards": {"images": plan[0][1] - plan[0][0], "count": len(plan), "reused": reused},
                        "memory": {"budget_gib": mem.budget_gib, "generation_batch": budget.generation_batch,
                                   "feature_batch": budget.feature_batch}},
           "run_dir": str(out), **({"train": record} if record else {})}
    if ev.force:
        append_row(table, row)
    elif not append_new_row(table, row):   # a concurrent job evaluated the same cell first
        log.warning("cell %s: a row was written to %s by another job meanwhile; kept that one", key, table)
    shutil.rmtree(shard_dir, ignore_errors=True)   # per_image.npz holds what they held
    log.info("eval %s: %s", key, {k: round(v, 4) for k, v in metrics_out.items()})
    log_to_loggers(loggers, row, grid, table)
    # as the table holds it (JSON: tuples are lists), so a row computed now pairs with one read back (a
    # sweep's second cell reads the shared base row from the table)
    return resolved(json.loads(json.dumps(row, sort_keys=True, default=str)), table.parent)
