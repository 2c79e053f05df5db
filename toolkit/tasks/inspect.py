"""Task ``inspect``: what an adapter file holds, without a Python shell.

    python run.py task=inspect adapter=path/to/lora.safetensors            # any format
    python run.py task=inspect adapter=<run dir> model=sdxl                 # checked against a base model

Prints the format, the base family the file names (kohya metadata / key prefixes), per layer
group (component × layer kind) the number of layers, ranks, α and the norm of the updates
(‖ΔW‖_F, mean and max), how many layers match the configured base model (built on the meta
device from its configs: no weights are loaded), and the file's metadata. Writes
``inspect.json`` with every layer into the run dir.
"""

from __future__ import annotations

import json
import logging
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from toolkit.adapters.formats import AdapterFile, read_adapter
from toolkit.adapters.loading import module_shapes, resolve_adapter
from toolkit.atomic import atomic_open
from toolkit.config import as_list
from toolkit.models.families import FAMILIES, ModelFamily, family_named
from toolkit.models.pretrained import skeletons

log = logging.getLogger(__name__)
KIND = re.compile(r"(to_q|to_k|to_v|to_out[._]0|ff[._]net[._]0[._]proj|ff[._]net[._]2|proj_in|proj_out|conv_shortcut|"
                  r"conv1|conv2|time_emb_proj|downsamplers[._]0[._]conv|upsamplers[._]0[._]conv|conv_in|conv_out|"
                  r"q_proj|k_proj|v_proj|out_proj|fc1|fc2|text_projection|op|in_layers_2|out_layers_3|emb_layers_1|"
                  r"skip_connection|add_q_proj|add_k_proj|add_v_proj|to_add_out|qkv|norm1_context[._]linear|"
                  r"norm1[._]linear|adaLN_modulation[._]1|context_embedder)$")


def named_family(af: AdapterFile) -> str:
    """The family the file itself names (kohya's ss_base_model_version, or its key names), as each
    family piece recognises its own files (``ModelFamily.names_adapter``); SD-1.x/2.x otherwise."""
    keys = [n for lay in af.layers.values() for n in lay] + af.unmatched
    meta = af.metadata.get("ss_base_model_version", "").lower()
    return next((f.name for f in FAMILIES if f.names_adapter(keys, meta)), "sd")


DOTTED = {"to_out_0": "to_out.0", "ff_net_0_proj": "ff.net.0.proj", "ff_net_2": "ff.net.2",
          "downsamplers_0_conv": "downsamplers.0.conv", "upsamplers_0_conv": "upsamplers.0.conv",
          "norm1_context_linear": "norm1_context.linear", "norm1_linear": "norm1.linear",
          "adaLN_modulation_1": "adaLN_modulation.1"}


def layer_kind(name: str) -> str:
    """The layer's role from its name, in diffusers or kohya (underscored) spelling."""
    m = KIND.search(name)
    return DOTTED.get(m.group(1), m.group(1)) if m else "other"


def summarize(af: AdapterFile) -> dict[str, Any]:
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    layers = []
    for comp, lay in af.layers.items():
        for name, w in sorted(lay.items()):
            delta = w.delta()
            row = {"component": comp, "layer": name, "type": "dora" if w.dora else w.kind, "rank": w.rank,
                   "alpha": w.alpha, "update_norm": float(delta.norm()), "conv": delta.ndim == 4}
            layers.append(row)
            groups[(comp, layer_kind(name))].append(row)
    table = [{"component": c, "kind": k, "layers": len(rows), "types": sorted({r["type"] for r in rows}),
              "ranks": sorted({r["rank"] for r in rows}, key=str),
              "alphas": sorted({r["alpha"] for r in rows}),
              "update_norm_mean": sum(r["update_norm"] for r in rows) / len(rows),
              "update_norm_max": max(r["update_norm"] for r in rows)} for (c, k), rows in sorted(groups.items())]
    return {"groups": table, "layers": layers}


def inspect_file(path: Path, family: type[ModelFamily] | None, models: dict[str, Any] | None) -> dict[str, Any]:
    guess = read_adapter(path, family_named("sd"))
    fam = family or family_named(named_family(guess))
    mods = {c: module_shapes(m) for c, m in models.items()} if models else None
    af = read_adapter(path, fam, mods, models[fam.denoiser].config if models else None)
    meta = {k: v for k, v in af.metadata.items() if k != "lora_adapter_metadata"}
    if "lora_adapter_metadata" in af.metadata:
        cfg = json.loads(af.metadata["lora_adapter_metadata"])
        meta["peft_config"] = {k: v for k, v in cfg.items() if k.endswith((".r", ".lora_alpha", ".use_rslora",
                                                                            ".use_dora", ".peft_type"))}
    out = {"file": str(path), "sha256": af.sha256, "format": af.format, "family_named_by_file": named_family(guess),
           "layers_per_component": af.counts(), "metadata": meta, **summarize(af)}
    if models:
        out["base_model_match"] = {"matched": sum(af.counts().values()), "unmatched": len(af.unmatched),
                                   "unmatched_examples": af.unmatched[:5]}
    return out


def render(info: dict[str, Any]) -> str:
    lines = [f"{info['file']}", f"  format {info['format']}, family named by the file: {info['family_named_by_file']}, "
             f"sha256 {info['sha256'][:16]}…", f"  layers: {info['layers_per_component']}"]
    if "base_model_match" in info:
        m = info["base_model_match"]
        lines.append(f"  against the configured base model: {m['matched']} layers match, {m['unmatched']} do not"
                     + (f" (e.g. {m['unmatched_examples']})" if m["unmatched"] else ""))
    lines.append(f"  {'component':<15} {'layer kind':<22} {'layers':>6}  {'type':<7} {'rank':<10} {'alpha':<12} "
                 "‖ΔW‖ mean / max")
    for g in info["groups"]:
        lines.append(f"  {g['component']:<15} {g['kind']:<22} {g['layers']:>6}  {','.join(g['types']):<7} "
                     f"{str(g['ranks']):<10} "
                     f"{str(g['alphas']):<12} {g['update_norm_mean']:.4g} / {g['update_norm_max']:.4g}")
    for k, v in sorted(info["metadata"].items()):
        lines.append(f"  {k}: {str(v)[:150]}")
    return "\n".join(lines)


def run(cfg: DictConfig) -> dict[str, Any]:
    paths = as_list(cfg.adapter)
    if not paths:
        raise ValueError("task=inspect needs adapter=<adapter file, adapter dir or training run dir> (or a list)")
    family, models = skeletons(cfg.model.name_or_path, cfg.model.revision) if cfg.inspect.against_model \
        else (None, None)
    infos = [inspect_file(resolve_adapter(p), family, models) for p in paths]
    for info in infos:
        print(render(info))
    out = Path(cfg.paths.output_dir) / "inspect.json"
    with atomic_open(out, "w") as f:
        json.dump(infos, f, indent=1)
    log.info("per-layer details: %s", out)
    return {"files": len(infos), "layers": [i["layers_per_component"] for i in infos], "details": str(out)}
