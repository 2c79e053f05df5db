"""One evaluation: generate images for a reference set's captions, score FID/KID/CLIP with
intervals, append one row to the results table (the body of ``task=eval`` and of both halves of
``task=finetune_eval``'s evaluation).

Image i uses caption i of the reference set (cycled) and seed ``eval.seed·10⁶ + i``; ranks take
disjoint indices, so N processes give the same images and metrics as one. A row is keyed by the
hash of its settings (prompts, reference identity, model, adapters, metric weights); a cell whose
key is in the table is skipped.
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
from omegaconf import DictConfig
from PIL import Image

from toolkit.atomic import atomic_open
from toolkit.evaluation import reference
from toolkit.evaluation.distributed import gather_by_index, shard
from toolkit.evaluation.protocol import METRIC_IMPL, read_prompts, versions
from toolkit.evaluation.scores import compute_scores, per_prompt
from toolkit.hashing import settings_key
from toolkit.inference.pipeline import generate, generation_record, make_grid, pipeline_from_cfg
from toolkit.metrics.clip import load_clip
from toolkit.metrics.inception import InceptionFeatures
from toolkit.metrics.moments import Moments, fid_from_moments
from toolkit.models.pretrained import unet_config, vae_factor
from toolkit.results import append_new_row, append_row, find_row, resolved, stored_path

log = logging.getLogger(__name__)


def results_path(cfg: DictConfig) -> Path:
    if cfg.eval.results_file:
        return Path(cfg.eval.results_file)
    hc = HydraConfig.get() if HydraConfig.initialized() else None
    if hc is not None and hc.mode == RunMode.MULTIRUN:
        return Path(hc.sweep.dir) / "results.jsonl"
    return Path(cfg.paths.output_dir) / "results.jsonl"


def log_to_loggers(cfg: DictConfig, row: dict[str, Any], grid_path: Path) -> None:
    """The eval row on the dashboards: metrics, the settings as config, the row as a table with the
    cell's sample grid (wandb) or as a text table (TensorBoard)."""
    from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

    name = "eval_" + ("finetuned" if row["settings"].get("adapters") else "base")
    for lg_cfg in (cfg.get("logger") or {}).values():
        lg = instantiate(lg_cfg)
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


def prompt_groups(prompts: list[str]) -> tuple[list[str], list[str] | None]:
    """Prompts written ``[group] prompt`` (in a prompts file) are scored per group too: returns the
    prompts without the tag and the groups (None when the prompts carry no tags)."""
    tagged = [re.match(r"^\[([^\]]+)\]\s*(.+)$", p) for p in prompts]
    if not all(tagged):
        return prompts, None
    return [t.group(2) for t in tagged], [t.group(1) for t in tagged]


def reference_size(cfg: DictConfig) -> tuple[int, int] | None:
    """(width, height) reference images are brought to: the generated size (``metrics.reference_size
    = generated``, read from the eval settings or the UNet/VAE configs), or None (``native``)."""
    if cfg.metrics.reference_size == "native":
        return None
    if cfg.metrics.reference_size != "generated":
        raise ValueError(f"metrics.reference_size={cfg.metrics.reference_size!r}: expected generated or native")
    name, rev, conf = cfg.model.name_or_path, cfg.model.revision, cfg.model.get("config")
    native = unet_config(name, rev, conf)["sample_size"] * vae_factor(name, rev, conf)
    return int(cfg.eval.width or native), int(cfg.eval.height or native)


def build_fabric(cfg: DictConfig) -> Any:
    """The evaluation's processes. A job that already runs on several (DDP training earlier in this
    job, or a launch by torchrun / srun / Lightning's launcher: ``WORLD_SIZE`` > 1) evaluates on
    those same processes, once, sharded; otherwise ``cfg.fabric`` (one process unless
    ``fabric.devices`` says more)."""
    import torch.distributed as dist
    from lightning import Fabric

    joined = dist.is_available() and dist.is_initialized()
    world = dist.get_world_size() if joined else int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        nodes = int(cfg.trainer.num_nodes) if "trainer" in cfg else 1
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world // nodes))
        fabric = Fabric(accelerator=cfg.fabric.accelerator, devices=local, num_nodes=world // local, strategy="ddp")
    else:
        fabric = instantiate(cfg.fabric)
    fabric.launch()
    return fabric


def reference_set(cfg: DictConfig) -> tuple[Any, dict[str, Any], str, str]:
    """The reference rows, their identity and their image / caption columns."""
    ev = cfg.eval
    if ev.dataset in (None, "auto"):
        raise ValueError(f"eval.dataset={ev.dataset!r}: run.py chooses it from the model "
                         "(toolkit.model_defaults); composed by hand, name a reference set")
    if ev.dataset == "held_out":
        ref, ident = reference.load_held_out(cfg.data, ev.num_ref)
        return ref, ident, cfg.data.image_column, cfg.data.caption_column
    ref, ident = reference.load_reference(ev.dataset, ev.image_column, ev.caption_column, ev.split, ev.num_ref,
                                          ev.revision, f"{cfg.paths.cache_dir}/prepared")   # as data.local
    return ref, ident, ev.image_column, ev.caption_column


def shard_plan(n: int, shard_size: int, batch_size: int) -> list[tuple[int, int]]:
    """Images ``[start, stop)`` per shard: whole batches, so a batch holds the same images whatever
    the number of processes (the numerics of a batch depend on its members)."""
    size = max(1, -(-shard_size // batch_size)) * batch_size
    return [(a, min(a + size, n)) for a in range(0, n, size)]


def shard_file(shard_dir: Path, start: int, stop: int) -> Path:
    return shard_dir / f"{start:08d}-{stop:08d}.npz"


def write_shard(path: Path, index: np.ndarray, feats: np.ndarray, clips: np.ndarray) -> None:
    """One shard's per-image features and CLIP scores, written whole or not at all. Features are
    the Inception network's float32 outputs, stored as float32 where that loses nothing."""
    exact = np.array_equal(feats.astype(np.float32).astype(feats.dtype), feats)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path) as fh:
        np.savez(fh, index=index, features=feats.astype(np.float32) if exact else feats, clip=clips)


def read_shards(shard_dir: Path, plan: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray, Moments]:
    """All shards in index order: features (float64), CLIP scores, and the float64 moments of the
    features combined shard by shard. Every image must be there exactly once."""
    feats, clips, total = [], [], None
    for start, stop in plan:
        path = shard_file(shard_dir, start, stop)
        if not path.is_file():
            raise RuntimeError(f"evaluation shard {path} is missing after every rank finished: a rank failed "
                               "to write it (see its log); run the evaluation again to compute only what is missing")
        with np.load(path) as z:
            if not np.array_equal(z["index"], np.arange(start, stop)):
                raise RuntimeError(f"evaluation shard {path} holds other images than {start}-{stop}")
            f = z["features"].astype(np.float64)
            feats.append(f)
            clips.append(z["clip"])
            total = Moments.of(f) if total is None else total + Moments.of(f)   # one d×d scatter held
    return np.concatenate(feats), np.concatenate(clips), total


def check_moments(fid: float, fid_moments: float) -> None:
    """The FID of the combined per-shard moments must be the FID of the assembled features: a
    mismatch means shards that do not belong together."""
    if abs(fid - fid_moments) > 1e-6 * max(abs(fid), 1.0):
        raise RuntimeError(f"FID from the assembled features ({fid!r}) and from the shards' combined moments "
                           f"({fid_moments!r}) differ: the evaluation shards are inconsistent")


def evaluate(cfg: DictConfig, record: dict[str, Any] | None = None) -> dict[str, Any]:
    """One evaluation cell; returns its results row ({} on ranks other than zero). ``record`` (the
    training run behind the adapter) joins the row and its key, so a train-and-evaluate sweep
    keeps one row per trained cell. Rank zero alone reads and writes the results table."""
    fabric = build_fabric(cfg)
    rank, world = fabric.global_rank, fabric.world_size
    ev, m = cfg.eval, cfg.metrics
    out = Path(cfg.paths.output_dir)
    table = results_path(cfg)

    ref, ref_identity, image_column, caption_column = reference_set(cfg)
    inception = InceptionFeatures(m.inception_weights, fabric.device, m.feature_batch_size, m.channels_last)
    clip = load_clip(m.clip_model)
    prompts = read_prompts(ev.prompts, "eval.prompts") if ev.prompts else [str(c) for c in ref[caption_column]]
    prompts_sha256 = hashlib.sha256(json.dumps(prompts).encode()).hexdigest()
    prompts, groups = prompt_groups(prompts)
    n = int(ev.num_images)
    ref_size = reference_size(cfg)
    # Everything the row's numbers depend on: a change to any of these recomputes the cell.
    settings = {**generation_record(cfg, ev), "dataset": ref_identity, "num_ref": len(ref), "num_images": n,
                "seed": int(ev.seed), "prompts": str(ev.prompts or "dataset captions"),
                "prompts_sha256": prompts_sha256, "inception_sha256": inception.sha256,
                "clip_model": m.clip_model if clip else None, "clip_sha256": clip.sha256 if clip else None,
                "metrics": {**{k: m[k] for k in ("level", "interval_groups", "prdc", "vendi", "fid_infinity",
                                                   "channels_last")},
                            "reference_size": ref_size}}
    if record:
        settings["train"] = record["settings"]
    key = settings_key(settings)
    done = fabric.broadcast(find_row(table, key) if rank == 0 else None, 0)
    if done is not None and not ev.force:
        if rank == 0:
            log.info("cell %s already in %s: skipped (eval.force=true recomputes)", key, table)
        return done if rank == 0 else {}

    t0 = time.time()
    protocol = {**inception.protocol, "reference_size": ref_size}
    ckey = reference.cache_key(ref_identity, protocol)
    # Rank zero decides whether the cached reference is there (a node-local cache may differ per node).
    real = reference.load_cached(m.cache_dir, ckey) if m.cache_reference and rank == 0 else None
    if not fabric.broadcast(real is not None, 0):
        idx = shard(len(ref), rank, world, m.feature_batch_size)
        feats = inception([reference.reference_image(ref[i][image_column], ref_size) for i in idx],
                          desc="reference features")
        real = np.stack(gather_by_index(idx, list(feats), world))
        if rank == 0 and m.cache_reference:
            reference.save_cached(m.cache_dir, ckey, real)
    t_ref = time.time() - t0

    grid = out / "grid.png"
    plan, shard_dir = shard_plan(n, int(ev.shard_size), int(ev.batch_size)), out / "eval_shards" / key
    mine = plan[rank::world]
    todo = [(a, b) for a, b in mine if not shard_file(shard_dir, a, b).is_file()]   # others: an earlier attempt's
    made, reused = 0, len(mine) - len(todo)
    pipe = pipeline_from_cfg(cfg, ev, fabric.device) if todo else None
    t1 = time.time()
    for start, stop in todo:
        path = shard_file(shard_dir, start, stop)
        idx = list(range(start, stop))
        my_prompts = [prompts[i % len(prompts)] for i in idx]
        images = generate(pipe, my_prompts, [int(ev.seed) * 10**6 + i for i in idx], ev.steps, ev.guidance_scale,
                          ev.negative_prompt, ev.height, ev.width, ev.batch_size,
                          desc=f"generate {start}-{stop} (rank {rank})")
        if ev.save_images:
            (out / "samples").mkdir(parents=True, exist_ok=True)
            for i, img in zip(idx, images):
                img.save(out / "samples" / f"{i:05d}.png")
        if start == 0:
            make_grid(images[:64], cols=8).save(grid)
        feats = inception(images, desc="generated features")
        clips = np.array(clip.scores(images, my_prompts) if clip else [np.nan] * len(images), np.float64)
        write_shard(path, np.array(idx), feats, clips)
        made += len(idx)
    t_gen = time.time() - t1
    counts = gather_by_index([rank], [(made, reused)], world)
    fabric.barrier()
    if rank != 0:
        return {}
    made, reused = sum(c[0] for c in counts), sum(c[1] for c in counts)
    if reused:
        log.info("eval %s: %d of %d shards from an earlier attempt (%s), %d images generated now",
                 key, reused, len(plan), shard_dir, made)
    fake, clip_all, moments = read_shards(shard_dir, plan)
    clip_scores = clip_all if clip else None
    ref_file = reference.cache_path(m.cache_dir, ckey) if m.cache_reference else \
        reference.save_cached(out, "reference_features", real)
    scores = compute_scores(reference.statistics(ref_file), fake, clip_scores, m.interval_groups, m.level,
                            seed=int(ev.seed), with_fid_infinity=m.fid_infinity, with_prdc=m.prdc,
                            with_vendi=m.vendi)
    methods = {k: scores.pop(k) for k in list(scores) if k.endswith("_ci_method")}
    fid_inf_fit = {k: scores.pop(k) for k in ("fid_inf_sizes", "fid_inf_fids") if k in scores}
    ref_stats = reference.statistics(ref_file)
    check_moments(scores["fid"], fid_from_moments(ref_stats.mu, ref_stats.sigma, moments, ref_stats.sigma_sqrt))
    metrics = {**scores, "seconds_reference": t_ref, "seconds_generate": t_gen,
               "images_per_second": made / max(t_gen, 1e-9)}
    # Per-image features and scores: what a paired comparison with another cell (same prompts and
    # seeds) needs, without generating anything again.
    all_seeds = np.array([int(ev.seed) * 10**6 + i for i in range(n)])
    per_image = out / "per_image.npz"
    with atomic_open(per_image) as fh:
        np.savez(fh, features=fake.astype(np.float32), seeds=all_seeds,
                 clip=clip_scores if clip_scores is not None else np.full(n, np.nan))
    row = {"key": key, "settings": settings, "metrics": metrics, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
           "per_prompt": per_prompt([prompts[i % len(prompts)] for i in range(n)], clip_scores,
                                    groups and [groups[i % len(groups)] for i in range(n)])
           if clip_scores is not None else {},
           # relative to the table's folder where under it: a moved sweep keeps its files (and pairs)
           "files": {k: stored_path(v, table.parent) for k, v in
                     (("per_image", per_image), ("reference_features", ref_file), ("grid", grid))},
           "protocol": {**protocol, **(clip.protocol if clip else {"clip": "skipped"}),
                        "metric_impl": METRIC_IMPL, "intervals": methods, "level": m.level,
                        "fid_infinity": fid_inf_fit or "off", "versions": versions(), "world_size": world,
                        "seed_rule": "seed_i = eval.seed*1e6 + i", "reference_cache": ckey,
                        "shards": {"images": plan[0][1] - plan[0][0], "count": len(plan), "reused": reused}},
           "run_dir": str(out), **({"train": record} if record else {})}
    if ev.force:
        append_row(table, row)
    elif not append_new_row(table, row):   # a concurrent job evaluated the same cell first
        log.warning("cell %s: a row was written to %s by another job meanwhile; kept that one", key, table)
    shutil.rmtree(shard_dir, ignore_errors=True)   # per_image.npz holds what they held
    log.info("eval %s: %s", key, {k: round(v, 4) for k, v in metrics.items()})
    log_to_loggers(cfg, row, grid)
    return resolved(row, table.parent)
