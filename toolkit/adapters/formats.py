"""Adapter files: write and read LoRA adapters in the formats people load.

Two formats are written, both from the same in-memory factors (``LoraWeights`` per layer):

* **diffusers** (``pytorch_lora_weights.safetensors``): peft keys under the pipeline component,
  ``unet.<module>.lora_A.weight`` / ``lora_B.weight``, one key style for every layer (diffusers
  picks its reader from the first key, so a file mixing styles loads partly), and the peft
  ``LoraConfig`` of each component in the ``lora_adapter_metadata`` entry (rank, α and exact
  target modules; per-layer rank/α as ``rank_pattern``/``alpha_pattern``). Written by diffusers'
  own ``save_lora_weights``; read by ``load_lora_weights``.
* **kohya** (A1111, ComfyUI, SD.Next, InvokeAI, Forge): ``lora_unet_<module>`` /
  ``lora_te_`` (SD) or ``lora_te1_``/``lora_te2_`` (SDXL) keys with ``.lora_down.weight``,
  ``.lora_up.weight`` and ``.alpha`` per layer, module names with '_' for '.', SDXL UNet modules
  in sgm spelling, and ``ss_*`` metadata those tools display. Hand-written: diffusers'
  ``convert_state_dict_to_kohya`` sets every α to the rank (wrong whenever α ≠ r) and names
  text-encoder keys ``lora_te1_`` without the ``text_model`` level for SD-1.x.

Reading accepts diffusers/peft files (any of diffusers' key styles), kohya/A1111 files and
LyCORIS LoCon files (the kohya layout with conv layers). kohya names are mapped back to modules
through the base model's own module list; keys that match no layer are collected in
``AdapterFile.unmatched`` and refused by ``require_matched`` — never dropped silently.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save

from toolkit.adapters.layers import LoraWeights
from toolkit.atomic import atomic_open
from toolkit.models.families import ModelFamily

DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"
KOHYA_FILE = "lora_kohya.safetensors"
FORMATS = ("diffusers", "kohya")
Layers = dict[str, dict[str, LoraWeights]]   # component -> module name -> factors


class AdapterFormatError(ValueError):
    """An adapter file that cannot mean what it says: unknown keys, unmatched layers, bad shapes."""


@dataclass
class AdapterFile:
    path: Path
    format: str
    layers: Layers
    metadata: dict[str, str] = field(default_factory=dict)
    unmatched: list[str] = field(default_factory=list)    # layer names in the file that match no module
    sha256: str = ""

    def counts(self) -> dict[str, int]:
        return {c: len(v) for c, v in self.layers.items() if v}

    def updates(self, component: str) -> dict[str, torch.Tensor]:
        return {n: w.delta() for n, w in self.layers.get(component, {}).items()}

    def require_matched(self) -> AdapterFile:
        if self.unmatched:
            total = sum(self.counts().values()) + len(self.unmatched)
            raise AdapterFormatError(
                f"{self.path}: {len(self.unmatched)} of {total} adapted layers in this {self.format} file match no "
                f"layer of the base model, e.g. {self.unmatched[:3]}. Was it trained for another base model family "
                "(SD-1.x vs SD-2.x vs SDXL) or another architecture? Nothing was loaded.")
        if not any(self.layers.values()):
            raise AdapterFormatError(f"{self.path}: no LoRA layers found in this file")
        return self


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ------------------------------------------------------------------------------------------ writing
def lora_config(layers: Mapping[str, LoraWeights], **extra: Any) -> Any:
    """A peft ``LoraConfig`` dict that reproduces exactly these layers: the most common rank and
    α, per-layer exceptions as patterns, and the exact module names as targets."""
    from peft import LoraConfig

    ranks = Counter(w.rank for w in layers.values())
    alphas = Counter(w.alpha for w in layers.values())
    r, alpha = ranks.most_common(1)[0][0], alphas.most_common(1)[0][0]
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=sorted(layers),
                     rank_pattern={n: w.rank for n, w in layers.items() if w.rank != r},
                     alpha_pattern={n: w.alpha for n, w in layers.items() if w.alpha != alpha}, **extra)
    return cfg


def save_diffusers(layers: Layers, out_dir: str | Path, family: type[ModelFamily]) -> Path:
    """``out_dir/pytorch_lora_weights.safetensors`` via diffusers' own writer, atomically."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    kwargs: dict[str, Any] = {}
    for comp, lay in layers.items():
        if lay:
            kwargs[f"{comp}_lora_layers"] = {f"{n}.{k}.weight": getattr(w, attr).contiguous()
                                             for n, w in lay.items() for k, attr in (("lora_A", "down"),
                                                                                      ("lora_B", "up"))}
            kwargs[f"{comp}_lora_adapter_metadata"] = lora_config(lay).to_dict()
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".tmp-") as tmp:
        family.pipeline_class.save_lora_weights(tmp, **kwargs)
        os.replace(Path(tmp) / DIFFUSERS_FILE, out_dir / DIFFUSERS_FILE)
    return out_dir / DIFFUSERS_FILE


def kohya_key(family: type[ModelFamily], component: str, module: str, unet_config: Mapping[str, Any]) -> str:
    return family.kohya_prefixes[component] + family.kohya_module_name(component, module, unet_config).replace(".", "_")


def kohya_state_dict(layers: Layers, family: type[ModelFamily], unet_config: Mapping[str, Any]
                     ) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for comp, lay in layers.items():
        for name, w in lay.items():
            key = kohya_key(family, comp, name, unet_config)
            if f"{key}.alpha" in out:
                raise AdapterFormatError(f"two modules map to the kohya key {key!r}; cannot write a kohya file")
            out[f"{key}.lora_down.weight"] = w.down.contiguous()
            out[f"{key}.lora_up.weight"] = w.up.contiguous()
            out[f"{key}.alpha"] = torch.tensor(float(w.alpha), dtype=torch.float32)
    return out


def save_kohya(layers: Layers, path: str | Path, family: type[ModelFamily], unet_config: Mapping[str, Any],
               metadata: Mapping[str, Any] | None = None) -> Path:
    """One kohya/A1111 ``.safetensors`` file with ``ss_*`` metadata, written atomically.

    ``sshs_model_hash`` is the SHA-256 of the tensor data (kohya's "addnet" hash, which the
    A1111 UI shows and uses to identify a LoRA)."""
    sd = kohya_state_dict(layers, family, unet_config)
    blob = save(sd)
    header = int.from_bytes(blob[:8], "little")
    unet = layers.get("unet", {})
    ranks = Counter(w.rank for lay in layers.values() for w in lay.values())
    alphas = Counter(w.alpha for lay in layers.values() for w in lay.values())
    convs = [w for w in unet.values() if w.down.ndim == 4]
    meta = {"ss_network_module": "networks.lora", "ss_base_model_version": family.base_model_version,
            "ss_network_dim": str(ranks.most_common(1)[0][0]), "ss_network_alpha": str(alphas.most_common(1)[0][0]),
            "ss_network_args": json.dumps({"conv_dim": str(convs[0].rank), "conv_alpha": str(convs[0].alpha)}
                                          if convs else {}),
            "ss_v2": str(family.base_model_version == "sd_v2"),
            "sshs_model_hash": hashlib.sha256(blob[8 + header:]).hexdigest(),
            "toolkit_layers": json.dumps({c: len(v) for c, v in layers.items() if v})}
    meta.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()})
    with atomic_open(path) as f:
        f.write(save(sd, metadata=meta))
    return Path(path)


# ------------------------------------------------------------------------------------------ reading
def detect_format(keys: Iterable[str]) -> str:
    keys = list(keys)
    if any(k.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")) for k in keys):
        if any(".hada_" in k or ".lokr_" in k for k in keys):
            raise AdapterFormatError("LyCORIS LoHa/LoKr files are not LoRA files (the adapter-types issue adds them)")
        return "kohya"
    if any(".lora_A" in k or ".lora_B" in k or ".lora.down" in k or ".lora.up" in k or "_lora.down" in k
           or "lora_linear_layer" in k for k in keys):
        return "diffusers"
    raise AdapterFormatError(f"not a LoRA file: no kohya (lora_unet_*) or diffusers/peft (*.lora_A.*) keys; "
                             f"first keys: {keys[:3]}")


def _alpha_for(config: Mapping[str, Any] | None, module: str, rank: int) -> float:
    """α of one module from a peft config dict (``alpha_pattern``, rsLoRA), as kohya's α."""
    if not config:
        return float(rank)
    from peft.utils.other import get_pattern_key

    pattern = config.get("alpha_pattern") or {}
    key = get_pattern_key(pattern.keys(), module) if pattern else None
    alpha = float(pattern[key]) if key in pattern else float(config.get("lora_alpha", rank))
    return alpha * rank ** 0.5 if config.get("use_rslora") else alpha


def _read_diffusers(sd: dict[str, torch.Tensor], meta: dict[str, str], family: type[ModelFamily]
                    ) -> tuple[Layers, list[str]]:
    from diffusers.utils import convert_state_dict_to_peft, convert_unet_state_dict_to_peft

    configs = json.loads(meta["lora_adapter_metadata"]) if meta.get("lora_adapter_metadata") else {}
    layers: Layers = {}
    unmatched: list[str] = []
    by_comp: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in sd.items():
        comp = k.split(".", 1)[0]
        if comp in family.components():
            by_comp.setdefault(comp, {})[k[len(comp) + 1:]] = v
        else:
            unmatched.append(k)
    for comp, sub in by_comp.items():
        if not all(k.endswith((".lora_A.weight", ".lora_B.weight", ".alpha")) for k in sub):
            # older diffusers key styles (also mixed with peft keys): diffusers' own converters,
            # which leave keys already in peft style as they are
            sub = convert_unet_state_dict_to_peft(sub) if comp == "unet" else convert_state_dict_to_peft(sub)
        cfg = {k[len(comp) + 1:]: v for k, v in configs.items() if k.startswith(f"{comp}.")}
        lay: dict[str, LoraWeights] = {}
        for k in sub:
            if k.endswith(".lora_A.weight"):
                mod = k[: -len(".lora_A.weight")]
                up = sub.get(f"{mod}.lora_B.weight")
                if up is None:
                    raise AdapterFormatError(f"{comp}.{k} has no matching lora_B weight")
                down = sub[k]
                alpha = float(sub[f"{mod}.alpha"]) if f"{mod}.alpha" in sub else _alpha_for(cfg, mod, down.shape[0])
                lay[mod] = LoraWeights(down, up, alpha)
        leftovers = [k for k in sub if not (k.endswith((".lora_A.weight", ".lora_B.weight", ".alpha")))]
        if leftovers:
            raise AdapterFormatError(f"{comp}: {len(leftovers)} keys of a kind this reader does not know (DoRA "
                                     f"magnitudes, biases?), e.g. {leftovers[:3]}; refusing a partial read")
        layers[comp] = lay
    return layers, unmatched


def _read_kohya(sd: dict[str, torch.Tensor], family: type[ModelFamily], modules: Mapping[str, Iterable[str]] | None,
                unet_config: Mapping[str, Any] | None) -> tuple[Layers, list[str]]:
    lookup = {kohya_key(family, comp, name, unet_config or {}): (comp, name)
              for comp, names in (modules or {}).items() for name in names}
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in sd.items():
        base, _, part = k.partition(".")
        for alias, canonical in family.kohya_aliases.items():   # other spellings of a prefix in the wild
            if base.startswith(alias):
                base = canonical + base[len(alias):]
        groups.setdefault(base, {})[part] = v
    layers: Layers = {}
    unmatched = []
    for base, parts in groups.items():
        odd = set(parts) - {"lora_down.weight", "lora_up.weight", "alpha"}
        if odd:
            raise AdapterFormatError(f"{base}: parts {sorted(odd)} are not plain LoRA (LyCORIS Tucker 'lora_mid', "
                                     "DoRA 'dora_scale' and biases are not supported); refusing a partial read")
        if "lora_down.weight" not in parts or "lora_up.weight" not in parts:
            raise AdapterFormatError(f"{base}: lora_down/lora_up pair incomplete ({sorted(parts)})")
        down, up = parts["lora_down.weight"], parts["lora_up.weight"]
        alpha = float(parts["alpha"]) if "alpha" in parts else float(down.shape[0])
        if modules is None:
            layers.setdefault("file", {})[base] = LoraWeights(down, up, alpha)
        elif base in lookup:
            comp, name = lookup[base]
            layers.setdefault(comp, {})[name] = LoraWeights(down, up, alpha)
        else:
            unmatched.append(base)
    return layers, unmatched


def read_adapter(path: str | Path, family: type[ModelFamily], modules: Mapping[str, Iterable[str]] | None = None,
                 unet_config: Mapping[str, Any] | None = None) -> AdapterFile:
    """Read any supported adapter file into per-layer factors.

    Args:
        path: the ``.safetensors`` file.
        family: the base model's family (key prefixes, kohya module spelling).
        modules: per component, the base model's module names (kohya names are mapped back
            through them; diffusers names are checked against them). None: no base model at hand
            (``task=inspect``): kohya layers stay under their file names.
        unet_config: the base UNet's config (SDXL's sgm names depend on its block layout).
    """
    path = Path(path)
    with safe_open(str(path), framework="pt", device="cpu") as f:
        meta = dict(f.metadata() or {})
        sd = {k: f.get_tensor(k) for k in f.keys()}   # noqa: SIM118 - safe_open is not a Mapping
    fmt = detect_format(sd)
    if fmt == "kohya":
        layers, unmatched = _read_kohya(sd, family, modules, unet_config)
    else:
        layers, unmatched = _read_diffusers(sd, meta, family)
        if modules is not None:
            for comp, lay in list(layers.items()):
                known = set(modules.get(comp, ()))
                unmatched += [f"{comp}.{n}" for n in lay if n not in known]
                layers[comp] = {n: w for n, w in lay.items() if n in known}
    for comp, lay in layers.items():
        for name, w in lay.items():
            if w.up.shape[1] != w.down.shape[0]:
                raise AdapterFormatError(f"{comp}.{name}: up {tuple(w.up.shape)} and down {tuple(w.down.shape)} "
                                         "ranks differ")
    return AdapterFile(path, fmt, layers, meta, unmatched, file_sha256(path))
