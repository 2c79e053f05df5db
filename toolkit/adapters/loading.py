"""Load adapters into a pipeline through the stock diffusers loader, and prove they arrived whole.

Every adapter sampling, evaluation and merging use goes through ``load_adapters``:

1. the file is read by this package's reader (any supported format) and every layer is matched
   to a module of the base model — a file with unmatched layers is refused, naming how many;
2. the layers are written as a diffusers-format file (one key style, exact per-layer rank and α)
   and loaded with the stock ``pipe.load_lora_weights``, while every warning diffusers, peft and
   transformers emit is captured: one that says keys were unexpected, missing or not injected is
   an error (``AdapterLoadError``), since it means the model is not the one trained;
3. the update each layer of the loaded pipeline applies (peft's ``get_delta_weight``) is compared
   with the file's, and the count of adapted layers with the file's count.

The same checks back the export tests, so "the file loads" always means "the file loads whole".
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import tempfile
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from toolkit.adapters.formats import (
    DIFFUSERS_FILE,
    KOHYA_FILE,
    AdapterFile,
    peft_config,
    read_adapter,
    save_diffusers,
)
from toolkit.adapters.layers import AdapterLayer, compare_updates, model_magnitudes, model_updates
from toolkit.models.families import ModelFamily

log = logging.getLogger(__name__)

# Messages of diffusers / peft / transformers that mean part of an adapter did not arrive. ("No LoRA
# keys associated to <component>" is not one: a file without text-encoder layers says it for the
# text encoder; a component that should have had layers is caught by the per-layer check.)
DROPPED = re.compile(r"unexpected key|missing key|additional target modules|not correctly renamed|"
                     r"were not used|not found in the model|could not be found|inconsistency", re.IGNORECASE)
PEFT_INTERNALS = {"base_layer", "lora_A", "lora_B", "lora_dropout", "lora_embedding_A", "lora_embedding_B",
                  "lora_magnitude_vector", "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "lokr_w1",
                  "lokr_w2", "lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b", "lokr_t2"}


class AdapterLoadError(RuntimeError):
    """An adapter did not load whole (dropped or unexpected layers, or updates that differ)."""


def tolerance(dtype: torch.dtype) -> float:
    """Relative error allowed between a file's updates and the loaded model's: float32 loads the
    file's values (rounding only), half precision rounds each factor to ~3 significant digits."""
    return 1e-6 if dtype in (torch.float32, torch.float64) else 1e-2


def resolve_adapter(path: str | Path, variant: str = "raw") -> Path:
    """A training run dir (its ``adapter/``), an adapter dir, or a ``.safetensors`` file; ``variant=ema``
    picks the EMA weights exported beside the raw ones (``adapter/ema/``)."""
    p = Path(str(path)).expanduser()
    if variant not in ("raw", "ema"):
        raise ValueError(f"adapter_variant={variant!r}: expected raw or ema")
    if p.is_file():
        if variant == "ema":
            raise ValueError(f"adapter_variant=ema needs a run or adapter dir, not the file {p}")
        return p
    sub = ("ema",) if variant == "ema" else ()
    dirs = [p.joinpath(*sub), p.joinpath("adapter", *sub)]
    for cand in (d / f for d in dirs for f in (DIFFUSERS_FILE, KOHYA_FILE)):
        if cand.is_file():
            return cand
    hint = " (was the run trained with callbacks.ema.decay set?)" if variant == "ema" else ""
    raise FileNotFoundError(f"adapter {str(path)!r} ({variant}): not a .safetensors file, and no {DIFFUSERS_FILE} or "
                            f"{KOHYA_FILE} in {[str(d) for d in dirs]}{hint}")


def module_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """The layers an adapter can adapt (Linear / Conv2d) and their weight shapes, whether or not an
    adapter is already injected (peft's own sub-modules are left out)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    out = {}
    for name, m in model.named_modules():
        if PEFT_INTERNALS & set(name.split(".")):
            continue
        if isinstance(m, BaseTunerLayer):
            out[name] = tuple(m.get_base_layer().weight.shape)
        elif isinstance(m, torch.nn.Linear | torch.nn.Conv2d):
            out[name] = tuple(m.weight.shape)
    return out


def components(pipe_or_module: Any, family: type[ModelFamily]) -> dict[str, torch.nn.Module]:
    return {c: getattr(pipe_or_module, c) for c in family.lora_components() if getattr(pipe_or_module, c, None)
            is not None}


def read_for(path: str | Path, models: Mapping[str, torch.nn.Module], family: type[ModelFamily],
             variant: str = "raw") -> AdapterFile:
    """Read an adapter file against these base-model components; refuse unmatched layers."""
    mods = {c: module_shapes(m) for c, m in models.items() if c in family.lora_components()}
    return read_adapter(resolve_adapter(path, variant), family, mods,
                        models[family.denoiser].config).require_matched()


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def loader_messages() -> Iterator[list[str]]:
    """Collect the warnings diffusers, peft and transformers emit (logging and ``warnings``)."""
    handler = _Collect()
    loggers = [logging.getLogger(n) for n in ("diffusers", "peft", "transformers")]
    for lg in loggers:
        lg.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield handler.messages
        handler.messages.extend(str(w.message) for w in caught)
    finally:
        for lg in loggers:
            lg.removeHandler(handler)


def check_messages(messages: Sequence[str], what: str) -> None:
    bad = [m for m in messages if DROPPED.search(m)]
    for m in messages:
        if m not in bad:
            log.debug("%s: loader said: %s", what, m[:300])
    if bad:
        raise AdapterLoadError(f"{what}: the loader reported that part of the adapter did not load: "
                               + " | ".join(m[:400] for m in bad))


def verify_loaded(models: Mapping[str, torch.nn.Module], adapter: str, expected: AdapterFile,
                  tol: float, scale: float = 1.0) -> dict[str, int]:
    """Every layer of ``expected`` is adapted in ``models`` under ``adapter`` with the same
    update (× ``scale``) and DoRA magnitudes, and no other layer is. Returns the per-component
    layer counts."""
    counts = {}
    for comp, model in models.items():
        want = {n: d * scale for n, d in expected.updates(comp).items()}
        checks = [("update", compare_updates(want, model_updates(model, adapter)))]
        if expected.magnitudes(comp) or model_magnitudes(model, adapter):
            checks.append(("DoRA magnitude", compare_updates(expected.magnitudes(comp),
                                                             model_magnitudes(model, adapter))))
        for what, cmp in checks:
            if not cmp.ok(tol):
                raise AdapterLoadError(f"{expected.path} as loaded into {comp} differs from the file ({what}): "
                                       f"{cmp.describe()} (tolerance {tol:g})")
        counts[comp] = checks[0][1].compared
    return {c: n for c, n in counts.items() if n}


def set_factors(model: torch.nn.Module, adapter: str, layers: Mapping[str, AdapterLayer]) -> None:
    """Copy each layer's factors (and DoRA magnitude) into the peft layers of ``adapter``."""
    with torch.no_grad():
        for name, w in layers.items():
            mod = model.get_submodule(name)
            if w.kind == "lora":
                targets = {"down": mod.lora_A[adapter].weight, "up": mod.lora_B[adapter].weight}
                if w.dora:
                    targets["magnitude"] = mod.lora_magnitude_vector[adapter].weight
            else:
                prefix = "hada" if w.kind == "loha" else "lokr"
                targets = {f: getattr(mod, f"{prefix}_{f}")[adapter] for f in w.factors}
            values = {**w.factors, **({"magnitude": w.magnitude} if w.dora else {})}
            for key, param in targets.items():
                if key not in values or values[key].numel() != param.numel():
                    raise AdapterLoadError(f"{name}: the file's {w.kind} factor {key} "
                                           f"{tuple(values[key].shape) if key in values else None} does not fit the "
                                           f"layer peft built ({tuple(param.shape)})")
                param.copy_(values[key].reshape(param.shape))


def inject(model: torch.nn.Module, adapter: str, layers: Mapping[str, AdapterLayer], **config: Any) -> None:
    """Add peft layers shaped like ``layers`` under ``adapter`` and load their factors (for the
    kinds diffusers' loader does not read whole: LoHa, LoKr)."""
    from peft import inject_adapter_in_model

    cfg = peft_config(layers, **config)
    inject_adapter_in_model(cfg, model, adapter_name=adapter)
    model.peft_config = {**(getattr(model, "peft_config", None) or {}), adapter: cfg}
    model._hf_peft_config_loaded = True   # what diffusers/transformers set: set_adapters then sees it
    set_factors(model, adapter, layers)


@dataclass
class LoadedAdapter:
    name: str
    path: Path
    format: str
    sha256: str
    scale: float
    layers: dict[str, int]
    schedule: dict[str, Any] | None = None   # the noise schedule it was trained with (toolkit_schedule)


def load_adapters(pipe: Any, family: type[ModelFamily], paths: Sequence[str | Path],
                  scales: Sequence[float] = (), variant: str = "raw") -> list[LoadedAdapter]:
    """Load each adapter (any supported format; ``variant`` raw or ema) into ``pipe``, verified,
    and activate them with their scales (one scale for all, or one per adapter)."""
    one = float(scales[0]) if scales else 1.0
    scales = [float(s) for s in scales] if len(scales) > 1 else [one] * len(paths)
    if len(scales) != len(paths):
        raise ValueError(f"{len(paths)} adapters but {len(scales)} LoRA scales")
    models = components(pipe, family)
    dtype = getattr(pipe, family.denoiser).dtype
    loaded = []
    for i, path in enumerate(paths):
        af = read_for(path, models, family, variant)
        name = f"a{i}"
        if af.kinds() <= {"lora", "dora"}:   # the stock loader, as every diffusers user loads a LoRA
            with tempfile.TemporaryDirectory(prefix="toolkit-adapter-") as tmp:
                save_diffusers(af.layers, tmp, family)
                with loader_messages() as messages:
                    pipe.load_lora_weights(tmp, weight_name=DIFFUSERS_FILE, adapter_name=name)
            check_messages(messages, str(af.path))
        else:   # LoHa / LoKr: diffusers has no (whole) reader; peft's own layers, verified the same way
            for comp, lay in af.layers.items():
                if lay:
                    inject(models[comp], name, lay)
        counts = verify_loaded(models, name, af, tolerance(dtype))
        schedule = json.loads(af.metadata["toolkit_schedule"]) if af.metadata.get("toolkit_schedule") else None
        loaded.append(LoadedAdapter(name, af.path, af.format, af.sha256, scales[i], counts, schedule))
        log.info("adapter %s (%s, sha256 %s…): %s layers loaded whole, scale %g", af.path, af.format,
                 af.sha256[:12], counts, scales[i])
    if loaded:
        pipe.set_adapters([a.name for a in loaded], adapter_weights=[a.scale for a in loaded])
    return loaded
