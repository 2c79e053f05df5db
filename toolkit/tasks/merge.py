"""Task ``merge``: bake adapters into the base model and write it as people load models.

    python run.py task=merge adapter=<run dir>                                   # one adapter, scale 1
    python run.py task=merge 'adapter=[a.safetensors,b.safetensors]' 'merge.lora_scale=[0.7,0.5]'
    python run.py task=merge adapter=<run dir> merge.dtype=bfloat16 'merge.formats=[single_file]'

Writes into the run dir ``<name>/`` (a diffusers pipeline folder: ``from_pretrained``) and
``<name>.safetensors`` (one file in the family's original layout, LDM/sgm or SD3's MMDiT, that
A1111 and ComfyUI load, and diffusers' ``from_single_file(path, config=<name>/)``), with a model
card (``<name>/README.md``)
naming the base, the adapters, their scales and SHA-256 hashes.

The adapters load through the verified loader, and the merge itself is checked before anything is
written: every adapted weight must equal base + Σ scale_i · ΔW_i (relative error ≤ 1e-6 in float32,
computed before the cast to ``merge.dtype``), and no other weight may change.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from toolkit.adapters.layers import compare_updates, model_updates
from toolkit.adapters.loading import components, load_adapters
from toolkit.config import as_list
from toolkit.evaluation.protocol import versions
from toolkit.inference.pipeline import apply_schedule, load_pipeline
from toolkit.models.pretrained import check_model_path, model_family, resolve_dtype
from toolkit.models.single_file import pipeline_to_single_file

log = logging.getLogger(__name__)
FORMATS = ("diffusers", "single_file")


def model_card(base: dict[str, Any], adapters: list[dict[str, Any]], dtype: str, check: str) -> str:
    rows = "\n".join(f"| `{a['path']}` | {a['format']} | {a['scale']:g} | `{a['sha256']}` | {a['layers']} |"
                     for a in adapters)
    return (f"# Merged model\n\nBase: `{base['name_or_path']}` (revision {base.get('revision')}).\n"
            f"Weights: {dtype}.\n\n| adapter | format | scale | sha256 | layers |\n|---|---|---|---|---|\n{rows}\n\n"
            f"Merged weights = base + Σ scale · ΔW, checked per layer before the cast: {check}.\n\n"
            "Load: `DiffusionPipeline.from_pretrained(<this folder>)`, or the single file with "
            "`from_single_file(<file>, config=<this folder>)` (diffusers), or drop the file into A1111/ComfyUI's "
            "checkpoint folder.\n")


def run(cfg: DictConfig) -> dict[str, Any]:
    mc = cfg.merge
    adapters = as_list(cfg.adapter)
    if not adapters:
        raise ValueError("task=merge needs adapter=<run dir, adapter dir or file> (or a list)")
    formats = as_list(mc.formats)
    if not formats or set(formats) - set(FORMATS):
        raise ValueError(f"merge.formats={formats}: choose from {list(FORMATS)}")
    dtype = resolve_dtype(mc.dtype)
    model = OmegaConf.to_container(cfg.model, resolve=True)
    out = Path(cfg.paths.output_dir)
    targets = {"diffusers": out / mc.name, "single_file": out / f"{mc.name}.safetensors"}
    existing = [str(p) for f, p in targets.items() if f in formats and p.exists()]
    if existing:
        raise FileExistsError(f"{existing} already exist; merge into another run dir or set merge.name")

    check_model_path(model["name_or_path"], model.get("config"), model.get("allow_pickle", False))
    family = model_family(model["name_or_path"], model.get("revision"), model.get("config"))
    if "single_file" in formats and not family.single_file_layout:   # from the configs, before any weight loads
        raise ValueError(f"merge.formats={formats}: a {family.name} model is not written as one checkpoint file; "
                         "set merge.formats=[diffusers]")
    pipe = load_pipeline(**{**model, "dtype": "float32"})   # merged in float32, cast when written
    loaded = load_adapters(pipe, family, adapters, [float(s) for s in as_list(mc.lora_scale)], cfg.adapter_variant)
    apply_schedule(pipe, loaded)   # the merged model's scheduler config: the schedule it was trained with
    models = components(pipe, family)
    names = list(pipe.get_active_adapters())
    # What the merge must produce: base + Σ scale·ΔW per adapted layer (set_adapters' scale is in
    # each adapter's scaling, so get_delta_weight already carries it).
    expected: dict[str, dict[str, torch.Tensor]] = {}
    for comp, m in models.items():
        for name in names:
            for layer, delta in model_updates(m, name).items():
                base = m.get_submodule(layer).get_base_layer().weight.detach().double().cpu()
                expected.setdefault(comp, {}).setdefault(layer, base.clone())
                expected[comp][layer] += delta
    untouched = {comp: {k: v.clone() for k, v in m.state_dict().items() if "lora_" not in k and "base_layer" not in k}
                 for comp, m in models.items()}
    pipe.fuse_lora(components=list(models), adapter_names=names)
    pipe.unload_lora_weights()
    worst = 0.0
    for comp, m in models.items():
        got = {layer: m.get_submodule(layer).weight.detach().double().cpu() for layer in expected.get(comp, {})}
        cmp = compare_updates(expected.get(comp, {}), got)
        if not cmp.ok(1e-6):
            raise RuntimeError(f"merge of {comp} is not base + adapters: {cmp.describe()}")
        worst = max(worst, cmp.max_rel_err)
        changed = [k for k, v in untouched[comp].items() if not torch.equal(v, m.state_dict()[k])]
        if changed:
            raise RuntimeError(f"merge changed {len(changed)} non-adapted weights of {comp}, e.g. {changed[:3]}")
    check = f"{sum(len(v) for v in expected.values())} layers, max relative error {worst:.1e}"
    log.info("merged %d adapter(s): %s", len(names), check)

    record = [{"path": str(a.path), "format": a.format, "scale": a.scale, "sha256": a.sha256, "layers": a.layers}
              for a in loaded]
    meta = {"toolkit_base_model": json.dumps(model), "toolkit_adapters": json.dumps(record),
            "toolkit_versions": json.dumps(versions()), "toolkit_merge_check": check}
    pipe.to(dtype)
    written = {}
    if "diffusers" in formats:
        pipe.save_pretrained(targets["diffusers"], safe_serialization=True)
        (targets["diffusers"] / "README.md").write_text(model_card(model, record, str(mc.dtype), check))
        written["diffusers"] = str(targets["diffusers"])
    if "single_file" in formats:
        pipeline_to_single_file(pipe, targets["single_file"], dtype=dtype, metadata=meta)
        written["single_file"] = str(targets["single_file"])
    for f, p in written.items():
        log.info("merged model (%s): %s", f, p)
    return {**written, "layers_merged": sum(len(v) for v in expected.values()), "max_rel_err": worst,
            "adapters": record}
