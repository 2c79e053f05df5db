"""The evaluation's batches from ``memory.budget_gib``: generation and feature extraction each take
the largest batch (up to ``eval.batch_size`` / ``metrics.feature_batch_size``) whose traced peak,
with everything the evaluation keeps on the device, fits the budget. From the configs only, so
every process of an evaluation computes the same batch before anything is loaded (shards hold
whole batches: ``job.shard_plan``), and the plan (``toolkit.plan``) prints the same numbers.

    on the device while generating:  pipeline weights + feature models + generation(batch)
    while extracting features:       the same weights + the largest extractor's cost(batch)
"""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from toolkit.evaluation.scores import parse_metrics, spaces_needed
from toolkit.locate import check_local_or_hub
from toolkit.models import footprints as fp
from toolkit.models import parts as model_parts
from toolkit.models.memory import Footprint, MaxOf, Memory

log = logging.getLogger(__name__)

KNOBS = ("Raise memory.budget_gib (below the device's memory), lower eval.height/width, or set model.quantize=int8 "
         "(a smaller UNet on the device).")


@dataclass
class Extractor:
    """A feature model: its weights and its cost per image."""

    name: str
    weights: int
    cost: Footprint


def _vision(m: torch.nn.Module, x: torch.Tensor) -> Any:
    if hasattr(m, "vision_model") and hasattr(m, "visual_projection"):   # a whole CLIPModel
        return m.visual_projection(m.vision_model(pixel_values=x).pooler_output)
    return m(pixel_values=x)


@functools.cache
def extractor(space: str, name: str | None, traces: str | None) -> Extractor:
    """A feature model's weights and per-image cost, from its config (transformers) or its
    TorchScript file loaded on the meta device (TF-Inception); either is built only when the trace
    cache does not hold them. ``clip_score``: the CLIP score's model."""
    if space == "inception":
        from toolkit.metrics.inception import SIZE, default_weights

        path = Path(name or default_weights())
        key = {"torchscript": str(path), "bytes": path.stat().st_size}
        cost, weights = fp.image_features(lambda: torch.jit.load(str(path), map_location="meta"), SIZE,
                                          lambda m, x: m(x), key, traces)
        return Extractor(space, weights, cost)
    import transformers

    from toolkit.metrics.features import RECIPES

    recipe = RECIPES.get(space)
    config = transformers.AutoConfig.from_pretrained(str(name))
    cls_name = recipe.loader if recipe else "CLIPModel"
    if cls_name == "CLIPVisionModelWithProjection" and config.model_type == "clip":
        cls_name = "CLIPModel"   # a whole CLIP checkpoint: its image tower is used (metrics.features.FeatureModel)
    vision = getattr(config, "vision_config", config)
    size = (recipe.fixed_size if recipe else None) or int(vision.image_size)

    def load() -> torch.nn.Module:
        with fp.meta_init():
            return getattr(transformers, cls_name)(config)

    key = {"class": cls_name, "config": json.dumps(config.to_dict(), sort_keys=True, default=str)}
    cost, weights = fp.image_features(load, size, _vision, key, traces)
    return Extractor(space, weights, cost)


def extractors(metrics: DictConfig, traces: str | None) -> list[Extractor]:
    """The feature models ``metrics.compute`` needs (``features.clip=same``: the CLIP score's model)."""
    wanted = parse_metrics(metrics.compute)
    out, clip = [], metrics.get("clip_model")
    if clip and any(x.name == "clip_score" or (x.space == "clip" and metrics.features.clip == "same") for x in wanted):
        check_local_or_hub(str(clip), "metrics.clip_model", "model")   # a missing one named before its config is read
        out.append(extractor("clip_score", str(clip), traces))
    for space in spaces_needed(wanted):
        name = metrics.features.get(space)
        if space == "clip" and name == "same":
            continue
        if space == "inception" or name:
            if space != "inception":
                check_local_or_hub(str(name), f"metrics.features.{space}", "model")
            out.append(extractor(space, name, traces))
    return out


@dataclass
class EvalBudget:
    """The evaluation's batches and what they hold (bytes)."""

    generation_batch: int
    feature_batch: int
    resident: int
    generation_peak: int
    feature_peak: int
    extractors: list[str]


def size_of(cfg: DictConfig, gen: DictConfig, p: model_parts.Parts) -> tuple[int, int]:
    """(height, width) generated: the generation block's, else the model's native size."""
    return int(gen.height or p.native), int(gen.width or p.native)


def eval_budget(cfg: DictConfig, gen: DictConfig, memory: Memory) -> EvalBudget:
    """The generation and feature batches of ``task=eval`` (``gen``: ``cfg.eval``)."""
    p = model_parts.parts(cfg.model)
    feats = extractors(cfg.metrics, memory.traces)
    resident = sum(p.weights().values()) + sum(e.weights for e in feats)
    h, w = size_of(cfg, gen, p)
    n_gen, gen_peak = _generation(p, gen, memory, resident, h, w, f"evaluation generation ({h}x{w})")
    fcost = MaxOf(tuple(e.cost for e in feats)) if feats else Footprint(0, 0)
    n_feat = memory.batch(fcost, resident, int(cfg.metrics.feature_batch_size), "evaluation features", KNOBS) \
        if feats else int(cfg.metrics.feature_batch_size)
    return EvalBudget(n_gen, n_feat, resident, gen_peak, resident + fcost.at(n_feat),
                      [e.name for e in feats])


def generation_budget(cfg: DictConfig, gen: DictConfig, memory: Memory) -> tuple[int, int, int]:
    """(batch, resident bytes, peak bytes) of ``task=sample``'s generation (``gen``: ``cfg.sample``)."""
    p = model_parts.parts(cfg.model)
    resident = sum(p.weights().values())
    h, w = size_of(cfg, gen, p)
    n, peak = _generation(p, gen, memory, resident, h, w, f"generation ({h}x{w})")
    return n, resident, peak


def _generation(p: model_parts.Parts, gen: DictConfig, memory: Memory, resident: int, h: int, w: int, what: str
                ) -> tuple[int, int]:
    """(batch, peak bytes) of generating at h x w; a family the tracer does not cover takes
    ``gen.batch_size`` (said in the log; its peak is then unknown: the resident weights)."""
    if not fp.traced(p.family):
        log.warning(fp.untraced(p.family, what))
        return int(gen.batch_size), resident
    cost = model_parts.generation_cost(p, h, w, float(gen.guidance_scale), memory.traces)
    n = memory.batch(cost, resident, int(gen.batch_size), what, KNOBS)
    return n, resident + cost.at(n)
