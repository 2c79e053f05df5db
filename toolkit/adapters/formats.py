"""Adapter files: write and read LoRA / DoRA / LoHa / LoKr adapters in the formats people load.

Both formats are written from the same in-memory factors (``AdapterLayer`` per layer):

* **diffusers** (``pytorch_lora_weights.safetensors``): peft keys under the pipeline component,
  ``unet.<module>.lora_A.weight`` / ``lora_B.weight`` (+ ``lora_magnitude_vector.weight`` for
  DoRA), one key style for every layer (diffusers picks its reader from the first key, so a file
  mixing styles loads partly), and the peft config of each component in ``lora_adapter_metadata``
  (rank, α and exact target modules; per-layer rank/α as ``rank_pattern``/``alpha_pattern``).
  Written by diffusers' own ``save_lora_weights``; read by ``load_lora_weights``. LoRA and DoRA
  only: diffusers has no LoHa reader and reads LoKr for the UNet only, with its own scale rules,
  so those adapters are refused in this format rather than written lossily (use kohya/LyCORIS).
* **kohya / LyCORIS** (A1111, ComfyUI, SD.Next, InvokeAI, Forge): ``lora_unet_<module>`` /
  ``lora_te_`` (SD) or ``lora_te1_``/``lora_te2_`` (SDXL; SD3 adds ``lora_te3_`` for T5) keys, module
  names with '_' for '.', SDXL UNet modules in sgm spelling, SD3 transformer modules in the original
  MMDiT spelling (sd-scripts' ``networks/lora_sd3.py``: q, k and v stacked into one ``attn.qkv``
  layer, exactly, by ``layers.stack_rows``; the ranks of the parts in ``toolkit_kohya_fused`` so
  they read back as they were), per layer ``.alpha`` and ``.lora_down/.lora_up.weight``
  (LoRA), ``.dora_scale`` (DoRA), ``.hada_w1_a`` ... (LoHa), ``.lokr_w1`` ... (LoKr), and the
  ``ss_*`` metadata those tools display. Hand-written: diffusers' ``convert_state_dict_to_kohya``
  sets every α to the rank (wrong whenever α ≠ r) and names SD-1.x text-encoder keys without the
  ``text_model`` level; the LoHa/LoKr layouts are LyCORIS', checked with the ``lycoris-lora``
  package in the tests.

Reading accepts diffusers/peft files (any of diffusers' LoRA key styles), kohya/A1111 files and
LyCORIS files (LoCon, LoHa, LoKr, DoRA). kohya names are mapped back to modules through the base
model's own module list; layers that match no module are collected in ``AdapterFile.unmatched``
and refused by ``require_matched`` — never dropped silently.
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
from safetensors.torch import save, save_file

from toolkit.adapters.layers import FACTORS, AdapterLayer, lora, split_rows, stack_rows, swap_halves_rows
from toolkit.atomic import atomic_open, current_umask
from toolkit.hashing import file_sha256
from toolkit.models.families import ModelFamily

DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"
KOHYA_FILE = "lora_kohya.safetensors"
FORMATS = ("diffusers", "kohya")
Layers = dict[str, dict[str, AdapterLayer]]   # component -> module name -> layer
# kohya/LyCORIS key part of each factor, per kind
KOHYA_PARTS = {"lora": {"down": "lora_down.weight", "up": "lora_up.weight"},
               "loha": {k: f"hada_{k}" for k in FACTORS["loha"]},
               "lokr": {k: f"lokr_{k}" for k in FACTORS["lokr"]}}


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

    def kinds(self) -> set[str]:
        return {("dora" if w.dora else w.kind) for lay in self.layers.values() for w in lay.values()}

    def updates(self, component: str) -> dict[str, torch.Tensor]:
        return {n: w.delta() for n, w in self.layers.get(component, {}).items()}

    def magnitudes(self, component: str) -> dict[str, torch.Tensor]:
        return {n: w.magnitude.double().flatten() for n, w in self.layers.get(component, {}).items() if w.dora}

    def require_matched(self) -> AdapterFile:
        if self.unmatched:
            total = sum(self.counts().values()) + len(self.unmatched)
            raise AdapterFormatError(
                f"{self.path}: {len(self.unmatched)} of {total} adapted layers in this {self.format} file match no "
                f"layer of the base model, e.g. {self.unmatched[:3]}. Was it trained for another base model family "
                "(SD-1.x vs SD-2.x vs SDXL) or another architecture? Nothing was loaded.")
        if not any(self.layers.values()):
            raise AdapterFormatError(f"{self.path}: no adapter layers found in this file")
        return self


def formats_for(kind: str, requested: Iterable[str] | str = "auto", family: type[ModelFamily] | None = None
                ) -> tuple[str, ...]:
    """The export formats for an adapter kind (of ``family``'s models): ``auto`` = every format
    that carries it whole; an explicit format that cannot is refused (a lossy file is never
    written), and so is a kind no format of the family carries."""
    kinds = family.format_kinds if family is not None else {"diffusers": ("lora", "dora"),
                                                             "kohya": ("lora", "dora", "loha", "lokr")}
    carries = tuple(f for f in FORMATS if kind in kinds[f])
    if not carries:
        raise ValueError(f"a {kind} adapter of a {family.name if family else ''} model cannot be written in any "
                         f"format without loss: {family.name if family else ''} files carry "
                         f"{ {f: list(k) for f, k in kinds.items()} } (use module=lora or module=dora)")
    if requested == "auto":
        return carries
    requested = tuple(requested)
    unknown = set(requested) - set(FORMATS)
    if unknown or not requested:
        raise ValueError(f"adapter formats {list(requested)}: choose from {list(FORMATS)} (or auto)")
    refused = [f for f in requested if f not in carries]
    if refused:
        raise ValueError(f"a {kind} adapter cannot be written in the {refused} format without loss (diffusers has "
                         f"no LoHa reader and its own LoKr scaling); use formats={list(carries)} or auto")
    return requested


def layer_kind(layers: Layers) -> str:
    """The one kind of a whole adapter (mixing kinds in one file is refused by the writers)."""
    kinds = {w.kind for lay in layers.values() for w in lay.values()}
    if len(kinds) != 1:
        raise AdapterFormatError(f"an adapter mixes layer kinds {sorted(kinds)}")
    return kinds.pop()


# ------------------------------------------------------------------------------------------ writing
def peft_config(layers: Mapping[str, AdapterLayer], **extra: Any) -> Any:
    """A peft config that reproduces exactly these layers: the most common rank and α, per-layer
    exceptions as patterns, and the exact module names as targets."""
    from peft import LoHaConfig, LoKrConfig, LoraConfig

    kind = layer_kind({"": dict(layers)})
    # A LoKr layer with both factors full has no rank: peft builds full factors when r is at least
    # the larger factor dimension, and α = r gives it the scale 1 such a layer has.
    ra = {n: (w.rank, w.alpha) if w.rank is not None else (max(w.factors["w2"].shape[:2]),) * 2
          for n, w in layers.items()}
    r = Counter(x for x, _ in ra.values()).most_common(1)[0][0]
    alpha = Counter(a for _, a in ra.values()).most_common(1)[0][0]
    common = {"r": r, "target_modules": sorted(layers),
              "rank_pattern": {n: x for n, (x, _) in ra.items() if x != r},
              "alpha_pattern": {n: a for n, (_, a) in ra.items() if a != alpha}}
    if kind == "lora":
        return LoraConfig(**common, lora_alpha=alpha, use_dora=any(w.dora for w in layers.values()), **extra)
    cls = LoHaConfig if kind == "loha" else LoKrConfig
    shape = lokr_shape(layers) if kind == "lokr" else {}
    return cls(**common, alpha=alpha, **shape, **{k: v for k, v in extra.items() if k != "lora_dropout"},
               **({"rank_dropout": extra["lora_dropout"]} if "lora_dropout" in extra else {}))


def lokr_shape(layers: Mapping[str, AdapterLayer]) -> dict[str, Any]:
    """peft's ``decompose_factor`` / ``decompose_both`` that rebuild these LoKr layers' factor shapes.

    peft has one factor for all layers and splits each dimension with its ``factorization``; the
    file holds the split (w1 is (out_m, in_m)), so the factor is the candidate that gives every
    layer's w1 — a file trained with another factor would otherwise not fit the layers peft builds."""
    from peft.tuners.lokr.layer import factorization

    dims = []
    for w in layers.values():
        f = w.factors
        w1 = tuple(f["w1"].shape) if "w1" in f else (f["w1_a"].shape[0], f["w1_b"].shape[1])
        w2 = tuple(f["w2"].shape[:2]) if "w2" in f else (f["w2_a"].shape[0], f["w2_b"].shape[1])
        out_in = tuple(w.shape[:2]) if w.shape is not None else (w1[0] * w2[0], w1[1] * w2[1])   # conv: needs shape
        dims.append((w1[0], w1[1], *out_in))
    both = any("w1_a" in w.factors for w in layers.values())
    for factor in [-1, *sorted({d for a, b, _, _ in dims for d in (a, b)})]:
        if all(factorization(o, factor)[0] == a and factorization(i, factor)[0] == b for a, b, o, i in dims):
            return {"decompose_factor": factor, "decompose_both": both}
    raise AdapterFormatError("these LoKr layers split their dimensions in ways no single peft decompose_factor "
                             "reproduces (the file mixes factors); refusing to load it approximately")


def peft_state_dict(lay: Mapping[str, AdapterLayer]) -> dict[str, torch.Tensor]:
    """The layers under peft's key names (what ``set_peft_model_state_dict`` and diffusers read)."""
    out = {}
    for n, w in lay.items():
        if w.kind == "lora":
            out[f"{n}.lora_A.weight"], out[f"{n}.lora_B.weight"] = w.factors["down"], w.factors["up"]
            if w.dora:   # peft's layout: (out,) for linear layers, (1, out, 1, 1) for conv
                conv = w.factors["down"].ndim == 4
                out[f"{n}.lora_magnitude_vector.weight"] = w.magnitude.reshape((1, -1, 1, 1) if conv else (-1,))
        else:
            prefix = "hada" if w.kind == "loha" else "lokr"
            out.update({f"{n}.{prefix}_{k}": v for k, v in w.factors.items()})
    return {k: v.contiguous() for k, v in out.items()}


def save_diffusers(layers: Layers, out_dir: str | Path, family: type[ModelFamily],
                   metadata: Mapping[str, str] | None = None) -> Path:
    """``out_dir/pytorch_lora_weights.safetensors`` via diffusers' own writer, atomically, with
    ``metadata`` (``toolkit_*`` entries) added beside diffusers' own ``lora_adapter_metadata``."""
    kind = layer_kind(layers)
    if kind != "lora":
        raise AdapterFormatError(f"no diffusers-format {kind} file: diffusers cannot load it whole (no LoHa reader; "
                                 "LoKr for the UNet only, scaled its own way). Write the kohya/LyCORIS file, which "
                                 "A1111, ComfyUI and this toolkit load: callbacks.adapter_export.formats=[kohya]")
    unsupported = [c for c, lay in layers.items() if lay and c not in family.lora_components()]
    if unsupported:
        raise AdapterFormatError(f"{family.pipeline_class.__name__}.load_lora_weights reads no LoRA for "
                                 f"{unsupported}; a diffusers file cannot carry them")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    kwargs: dict[str, Any] = {}
    for comp, lay in layers.items():
        if lay:
            kwargs[f"{comp}_lora_layers"] = peft_state_dict(lay)
            # peft keeps target_modules as a set: listed in hash order, the same adapter would get other bytes (and
            # another SHA-256) in every process; sorted, a file's hash is its content's
            kwargs[f"{comp}_lora_adapter_metadata"] = {k: sorted(v) if isinstance(v, set) else v
                                                       for k, v in peft_config(lay).to_dict().items()}
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".tmp-") as tmp:
        family.pipeline_class.save_lora_weights(tmp, **kwargs)
        written = Path(tmp) / DIFFUSERS_FILE
        if metadata:   # diffusers' writer takes no metadata of ours: add it to the file it wrote
            with safe_open(str(written), framework="pt", device="cpu") as f:
                meta = {**(f.metadata() or {}), **metadata}
                sd = {k: f.get_tensor(k) for k in f.keys()}   # noqa: SIM118 - safe_open is not a Mapping
            save_file(sd, str(written), metadata=meta)
        written.write_bytes(sorted_metadata(written.read_bytes()))
        # safetensors' writer (under diffusers') creates the file 0600: the user's umask decides instead
        os.chmod(Path(tmp) / DIFFUSERS_FILE, 0o666 & ~current_umask())
        os.replace(Path(tmp) / DIFFUSERS_FILE, out_dir / DIFFUSERS_FILE)
    return out_dir / DIFFUSERS_FILE


def kohya_key(family: type[ModelFamily], component: str, module: str, denoiser_config: Mapping[str, Any]) -> str:
    return family.kohya_prefixes[component] + family.kohya_module_name(component, module,
                                                                       denoiser_config).replace(".", "_")


def kohya_layers(layers: Layers, family: type[ModelFamily], denoiser_config: Mapping[str, Any]
                 ) -> tuple[dict[str, AdapterLayer], dict[str, list[list[Any]]]]:
    """The layers as the original layout names them: per kohya key, one layer (the family's fused
    projections stacked, rows stored swapped where the layout swaps them), and per fused key its
    parts and their ranks (the ``toolkit_kohya_fused`` metadata)."""
    fused = {m: (name, parts) for name, parts in family.kohya_fused(denoiser_config).items() for m in parts if m}
    key_module: dict[str, str] = {}   # kohya key of a fused layer -> its original module name
    out: dict[str, AdapterLayer] = {}
    stacks: dict[str, dict[str, AdapterLayer]] = {}
    for comp, lay in layers.items():
        for name, w in lay.items():
            key = kohya_key(family, comp, name, denoiser_config)
            if comp == family.denoiser and name in fused:
                stacks.setdefault(key, {})[name] = w
                key_module[key] = fused[name][0]
                continue
            if key in out:
                raise AdapterFormatError(f"two modules map to the kohya key {key!r}; cannot write a kohya file")
            swap = comp == family.denoiser and family.kohya_row_order(name, denoiser_config) == "swap"
            try:
                out[key] = swap_halves_rows(w) if swap else w
            except ValueError as err:
                raise AdapterFormatError(f"{comp}.{name}: {err}") from err
    meta: dict[str, list[list[Any]]] = {}
    for key, members in stacks.items():
        parts = fused[next(iter(members))][1]
        try:
            out[key], ranks = stack_rows([members.get(p) if p else None for p in parts],
                                         family.kohya_fused_rows(key_module[key], denoiser_config))
        except ValueError as err:
            raise AdapterFormatError(f"{key} ({', '.join(p for p in parts if p)}): {err}") from err
        meta[key] = [[p, r] for p, r in zip(parts, ranks)]
    return out, meta


def kohya_state_dict(layers: Layers, family: type[ModelFamily], denoiser_config: Mapping[str, Any]
                     ) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, w in kohya_layers(layers, family, denoiser_config)[0].items():
        for factor, tensor in w.factors.items():
            out[f"{key}.{KOHYA_PARTS[w.kind][factor]}"] = tensor.contiguous()
        out[f"{key}.alpha"] = torch.tensor(float(w.alpha if w.rank is not None else 1.0), dtype=torch.float32)
        if w.dora:   # LyCORIS' weight-decompose layout: one magnitude per output row, shaped (out, 1, ...)
            conv = w.factors["down"].ndim == 4
            out[f"{key}.dora_scale"] = w.magnitude.reshape((-1, 1, 1, 1) if conv else (-1, 1)).contiguous()
    return out


def save_kohya(layers: Layers, path: str | Path, family: type[ModelFamily], denoiser_config: Mapping[str, Any],
               metadata: Mapping[str, Any] | None = None) -> Path:
    """One kohya/LyCORIS ``.safetensors`` file with ``ss_*`` metadata, written atomically.

    ``sshs_model_hash`` is the SHA-256 of the tensor data (kohya's "addnet" hash, which the
    A1111 UI shows and uses to identify a LoRA)."""
    kind = layer_kind(layers)
    sd = kohya_state_dict(layers, family, denoiser_config)
    fused = kohya_layers(layers, family, denoiser_config)[1]
    blob = save(sd)
    header = int.from_bytes(blob[:8], "little")
    every = [w for lay in layers.values() for w in lay.values()]
    ranks = Counter(w.rank for w in every)
    alphas = Counter(w.alpha for w in every)
    convs = [w for w in layers.get(family.denoiser, {}).values() if w.shape is not None and len(w.shape) == 4]
    algo = {"lora": "lora", "loha": "loha", "lokr": "lokr"}[kind]
    args: dict[str, str] = {}
    if kind != "lora" or convs:
        args = {"algo": "locon" if kind == "lora" else algo}
        if convs:
            args.update(conv_dim=str(convs[0].rank), conv_alpha=str(convs[0].alpha))
    if any(w.dora for w in every):
        args["dora_wd"] = "True"
    meta = {"ss_network_module": "networks.lora" if kind == "lora" and not any(w.dora for w in every)
            else "lycoris.kohya", "ss_base_model_version": family.base_model_version,
            "ss_network_dim": str(ranks.most_common(1)[0][0]), "ss_network_alpha": str(alphas.most_common(1)[0][0]),
            "ss_network_args": json.dumps(args), "ss_v2": str(family.base_model_version == "sd_v2"),
            "sshs_model_hash": hashlib.sha256(blob[8 + header:]).hexdigest(),
            "toolkit_layers": json.dumps({c: len(v) for c, v in layers.items() if v}),
            **({"toolkit_kohya_fused": json.dumps(fused)} if fused else {})}
    meta.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()})
    with atomic_open(path) as f:
        f.write(sorted_metadata(save(sd, metadata=meta)))
    return Path(path)


def sorted_metadata(blob: bytes) -> bytes:
    """A safetensors file's bytes with its ``__metadata__`` entries in sorted order. safetensors
    writes them in the order of a Rust ``HashMap``, seeded anew in every process: the same tensors
    and metadata got other bytes (another SHA-256, which keys evaluation rows) in another run.
    Hand-written (no library offers a canonical writer): the header is re-serialised compactly,
    as safetensors writes it, and padded with spaces to its old length, so every offset stays."""
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8:8 + n])
    if len(header.get("__metadata__") or {}) < 2:
        return blob
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    if len(text) > n:   # never: the same entries, reordered (checked, not assumed)
        raise AdapterFormatError(f"safetensors header grew from {n} to {len(text)} bytes when sorted")
    return blob[:8] + text.ljust(n, b" ") + blob[8 + n:]


# ------------------------------------------------------------------------------------------ reading
def detect_format(keys: Iterable[str]) -> str:
    keys = list(keys)
    if any(k.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_", "lora_te3_")) for k in keys):
        return "kohya"
    if any(".lora_A" in k or ".lora_B" in k or ".lora.down" in k or ".lora.up" in k or "_lora.down" in k
           or "lora_linear_layer" in k for k in keys):
        return "diffusers"
    raise AdapterFormatError(f"not an adapter file: no kohya/LyCORIS (lora_unet_*) or diffusers/peft (*.lora_A.*) "
                             f"keys; first keys: {keys[:3]}")


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
    peft_suffixes = (".lora_A.weight", ".lora_B.weight", ".lora_magnitude_vector.weight", ".alpha")
    for comp, sub in by_comp.items():
        if not all(k.endswith(peft_suffixes) for k in sub):
            # older diffusers key styles (also mixed with peft keys): diffusers' own converters,
            # which leave keys already in peft style as they are
            sub = convert_unet_state_dict_to_peft(sub) if comp == family.denoiser else convert_state_dict_to_peft(sub)
        cfg = {k[len(comp) + 1:]: v for k, v in configs.items() if k.startswith(f"{comp}.")}
        lay: dict[str, AdapterLayer] = {}
        used = set()
        for k in sub:
            if k.endswith(".lora_A.weight"):
                mod = k[: -len(".lora_A.weight")]
                keys = [k, f"{mod}.lora_B.weight", f"{mod}.lora_magnitude_vector.weight", f"{mod}.alpha"]
                if keys[1] not in sub:
                    raise AdapterFormatError(f"{comp}.{k} has no matching lora_B weight")
                down = sub[k]
                alpha = float(sub[keys[3]]) if keys[3] in sub else _alpha_for(cfg, mod, down.shape[0])
                lay[mod] = lora(down, sub[keys[1]], alpha, sub.get(keys[2]))
                used.update(x for x in keys if x in sub)
        leftovers = sorted(set(sub) - used)
        if leftovers:
            raise AdapterFormatError(f"{comp}: {len(leftovers)} keys of a kind this reader does not know (LoKr, "
                                     f"biases?), e.g. {leftovers[:3]}; refusing a partial read")
        layers[comp] = lay
    return layers, unmatched


def _kohya_layer(base: str, parts: dict[str, torch.Tensor]) -> AdapterLayer:
    """One kohya/LyCORIS layer from its key parts (``lora_down.weight``, ``hada_w1_a``, ``alpha``...)."""
    found = [(k, {f: parts[p] for f, p in names.items() if p in parts}) for k, names in KOHYA_PARTS.items()]
    found = [(k, f) for k, f in found if f]
    if len(found) != 1:
        raise AdapterFormatError(f"{base}: parts {sorted(parts)} are not one LoRA / LoHa / LoKr layer")
    kind, factors = found[0]
    known = set(KOHYA_PARTS[kind].values()) | {"alpha", "dora_scale"}
    odd = set(parts) - known
    if odd:
        raise AdapterFormatError(f"{base}: parts {sorted(odd)} are not supported (LyCORIS Tucker factors "
                                 "'lora_mid'/'hada_t1'/'lokr_t2', biases, other algorithms); refusing a partial read")
    layer = AdapterLayer(kind, factors, 0.0, parts.get("dora_scale"))
    if kind == "lora" and set(factors) != {"down", "up"} or kind == "loha" and len(factors) != 4:
        raise AdapterFormatError(f"{base}: incomplete {kind} factors ({sorted(parts)})")
    if layer.dora:
        layer.magnitude = layer.magnitude.flatten()
    layer.alpha = float(parts["alpha"]) if "alpha" in parts and layer.rank else float(layer.rank or 1)
    return layer


def _read_kohya(sd: dict[str, torch.Tensor], family: type[ModelFamily],
                modules: Mapping[str, Mapping[str, tuple[int, ...]]] | None,
                denoiser_config: Mapping[str, Any] | None, meta: Mapping[str, str]) -> tuple[Layers, list[str]]:
    cfg = denoiser_config or {}
    lookup: dict[str, tuple[str, str]] = {}
    for comp, names in (modules or {}).items():
        for name in names:
            try:
                lookup[kohya_key(family, comp, name, cfg)] = (comp, name)
            except ValueError:   # a module the original layout has no name for: no kohya file adapts it
                continue
    fused = {family.kohya_prefixes[family.denoiser] + k.replace(".", "_"): (k, v)
             for k, v in (family.kohya_fused(cfg).items() if modules is not None else ())}
    ranks = json.loads(meta.get("toolkit_kohya_fused") or "{}")
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
        layer = _kohya_layer(base, parts)
        if modules is None:
            layers.setdefault("file", {})[base] = layer
        elif base in fused:   # one original projection, several diffusers modules (SD3's / Flux's qkv)
            original, names = fused[base]
            try:
                split = split_rows(layer, len(names), [r for _, r in ranks[base]] if base in ranks else None,
                                   family.kohya_fused_rows(original, cfg))
            except ValueError as err:
                raise AdapterFormatError(f"{base}: {err}") from err
            for name, part in zip(names, split):
                if part is None:
                    continue
                if not name or name not in modules.get(family.denoiser, {}):
                    unmatched.append(f"{base} ({name})")
                    continue
                part.shape = tuple(modules[family.denoiser][name])
                layers.setdefault(family.denoiser, {})[name] = part
        elif base in lookup:
            comp, name = lookup[base]
            if comp == family.denoiser and family.kohya_row_order(name, cfg) == "swap":
                try:
                    layer = swap_halves_rows(layer)   # an involution: back to diffusers' row order
                except ValueError as err:
                    raise AdapterFormatError(f"{base}: {err}") from err
            layer.shape = tuple(modules[comp][name])
            layers.setdefault(comp, {})[name] = layer
        else:
            unmatched.append(base)
    return layers, unmatched


def read_adapter(path: str | Path, family: type[ModelFamily],
                 modules: Mapping[str, Mapping[str, tuple[int, ...]]] | None = None,
                 denoiser_config: Mapping[str, Any] | None = None) -> AdapterFile:
    """Read any supported adapter file into per-layer factors.

    Args:
        path: the ``.safetensors`` file.
        family: the base model's family (key prefixes, kohya module spelling).
        modules: per component, the base model's adaptable modules and their weight shapes (kohya
            names are mapped back through them; diffusers names are checked against them). None:
            no base model at hand (``task=inspect``): kohya layers stay under their file names.
        denoiser_config: the base denoiser's config (SDXL's sgm names depend on its block layout,
            SD3's MMDiT names on its number of blocks).
    """
    path = Path(path)
    with safe_open(str(path), framework="pt", device="cpu") as f:
        meta = dict(f.metadata() or {})
        sd = {k: f.get_tensor(k) for k in f.keys()}   # noqa: SIM118 - safe_open is not a Mapping
    fmt = detect_format(sd)
    if fmt == "kohya":
        layers, unmatched = _read_kohya(sd, family, modules, denoiser_config, meta)
    else:
        layers, unmatched = _read_diffusers(sd, meta, family)
        if modules is not None:
            for comp, lay in list(layers.items()):
                known = modules.get(comp, {})
                unmatched += [f"{comp}.{n}" for n in lay if n not in known]
                layers[comp] = {n: w for n, w in lay.items() if n in known}
                for n, w in layers[comp].items():
                    w.shape = tuple(known[n])
    for comp, lay in layers.items():
        for name, w in lay.items():
            if w.kind == "lora" and w.factors["up"].shape[1] != w.factors["down"].shape[0]:
                raise AdapterFormatError(f"{comp}.{name}: up {tuple(w.factors['up'].shape)} and down "
                                         f"{tuple(w.factors['down'].shape)} ranks differ")
            if w.shape is not None and w.delta().numel() != torch.Size(w.shape).numel():
                raise AdapterFormatError(f"{comp}.{name}: the update has {w.delta().numel()} values, the layer's "
                                         f"weight {tuple(w.shape)}")
    return AdapterFile(path, fmt, layers, meta, unmatched, file_sha256(path))
