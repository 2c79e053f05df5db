"""One adapted layer as adapter files store it, the weight update it makes, and comparisons.

    LoRA   ΔW = s · U D                         U (d_out × r), D (r × d_in); conv: U 1×1 after D k×k
    DoRA   W' = m · (W + ΔW) / ‖W + ΔW‖_row     the LoRA update plus a magnitude m per output row
    LoHa   ΔW = s · (A₁B₁) ⊙ (A₂B₂)             Hadamard product of two rank-r products
    LoKr   ΔW = s · W₁ ⊗ W₂                     Kronecker product; each factor full or a rank-r product

``s = α / r`` with kohya's/LyCORIS' meaning of α; a LoKr layer whose two factors are both full has
``s = 1`` (α is ignored there, as LyCORIS, ComfyUI and A1111 read such files). A peft layer's
``scaling`` is s (α/r, or α/√r with rsLoRA), so ``α = scaling · r`` carries either exactly; a
full-factor LoKr layer's peft scaling is folded into W₂.

Everything that writes an adapter in one place and reads it in another is checked with these
functions: per layer, the update read back equals the one trained (relative error), DoRA
magnitudes are equal, and the set of adapted layers is the same (none dropped, none extra).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

KINDS = ("lora", "loha", "lokr")
FACTORS = {"lora": ("down", "up"), "loha": ("w1_a", "w1_b", "w2_a", "w2_b"),
           "lokr": ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b")}


@dataclass
class AdapterLayer:
    """The factors of one adapted layer (as stored), α, and, for DoRA, the magnitude vector."""

    kind: str
    factors: dict[str, torch.Tensor]
    alpha: float
    magnitude: torch.Tensor | None = None            # DoRA: one entry per output row
    shape: tuple[int, ...] | None = field(default=None, compare=False)   # the adapted weight's shape

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"adapter layer kind {self.kind!r}: expected one of {KINDS}")
        unknown = set(self.factors) - set(FACTORS[self.kind])
        if unknown:
            raise ValueError(f"{self.kind} layer with unknown factors {sorted(unknown)}")

    @property
    def rank(self) -> int | None:
        f = self.factors
        if self.kind == "lora":
            return int(f["down"].shape[0])
        if self.kind == "loha":
            return int(f["w1_b"].shape[0])
        decomposed = [f[k] for k in ("w1_b", "w2_b") if k in f]
        return int(decomposed[0].shape[0]) if decomposed else None   # both LoKr factors full: no rank

    @property
    def scale(self) -> float:
        return 1.0 if self.rank is None else self.alpha / self.rank

    @property
    def dora(self) -> bool:
        return self.magnitude is not None

    def delta(self) -> torch.Tensor:
        """ΔW in float64 (comparisons then see the stored values, not float32 matmul noise)."""
        f = {k: v.double() for k, v in self.factors.items()}
        if self.kind == "lora":
            d, u = f["down"], f["up"]
            if d.ndim == 2:
                out = u @ d
            elif u.shape[2:] == (1, 1):
                out = torch.einsum("or,rikl->oikl", u.flatten(1), d)
            else:
                raise ValueError(f"conv LoRA with a {tuple(u.shape[2:])} up kernel is not a LoRA layout")
        elif self.kind == "loha":
            out = (f["w1_a"] @ f["w1_b"]) * (f["w2_a"] @ f["w2_b"])
        else:
            w1 = f["w1"] if "w1" in f else f["w1_a"] @ f["w1_b"]
            w2 = f["w2"] if "w2" in f else f["w2_a"] @ f["w2_b"].flatten(1)
            if self.shape is not None and len(self.shape) == 4 and w2.ndim == 2 and "w2" not in f:
                w2 = w2.reshape(w2.shape[0], -1, *self.shape[2:])
            for _ in range(w2.ndim - w1.ndim):
                w1 = w1.unsqueeze(-1)
            out = torch.kron(w1, w2)
        out = self.scale * out
        return out.reshape(self.shape) if self.shape is not None and out.numel() == _numel(self.shape) else out


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def lora(down: torch.Tensor, up: torch.Tensor, alpha: float, magnitude: torch.Tensor | None = None,
         shape: tuple[int, ...] | None = None) -> AdapterLayer:
    return AdapterLayer("lora", {"down": down, "up": up}, alpha, magnitude, shape)


def stack_rows(parts: list[AdapterLayer | None], rows: Sequence[int] | None = None
               ) -> tuple[AdapterLayer, list[int]]:
    """One LoRA layer whose update is the parts' updates stacked along the rows (a fused projection:
    SD3's qkv, Flux's single-block linear1 = q, k, v, MLP-in), exactly; None parts are zero rows.
    ``rows``: each part's output rows (None: all equal, as many as a present part's). Returns the
    layer and each part's rank (0 for None), which :func:`split_rows` takes back.

        ΔW = [s₁U₁D₁; s₂U₂D₂; s₃U₃D₃] = s · U D,   D = [D₁; D₂; D₃],   U = blockdiag(s_j U_j) / s

    with s the parts' common scale (α = s·Σr), or 1 when they differ (the scales go into U)."""
    present = [w for w in parts if w is not None]
    if not present or any(w.kind != "lora" for w in present):
        kinds = sorted({w.kind for w in present})
        raise ValueError(f"only LoRA/DoRA layers stack into one fused projection (got {kinds}): a Hadamard (LoHa) "
                         "or Kronecker (LoKr) product of stacked rows is not one of stacked factors")
    dora = {w.dora for w in present}
    if rows is None:
        sizes = {w.factors["up"].shape[0] for w in present}
        if len(sizes) != 1:
            raise ValueError("fused parts of unequal output sizes need their row counts")
        rows = [sizes.pop()] * len(parts)
    if len(rows) != len(parts) or any(w is not None and w.factors["up"].shape[0] != r for w, r in zip(parts, rows)):
        raise ValueError(f"fused parts' output sizes differ from the layout's {list(rows)}")
    if len(dora) != 1 or (dora == {True} and len(present) != len(parts)):
        raise ValueError("DoRA needs every part of a fused projection (its magnitude of an unadapted part is the "
                         "base weight's, which an adapter file does not hold)")
    scales = {w.scale for w in present}
    s = scales.pop() if len(scales) == 1 else 1.0
    down = torch.cat([w.factors["down"] for w in present])
    up = torch.zeros(sum(rows), down.shape[0], dtype=down.dtype)
    col, row, ranks = 0, 0, []
    for w, r in zip(parts, rows):
        ranks.append(0 if w is None else int(w.rank))
        if w is not None:
            up[row:row + r, col:col + w.rank] = w.factors["up"] * (w.scale / s)
            col += w.rank
        row += r
    magnitude = torch.cat([w.magnitude for w in present]) if dora == {True} else None
    return lora(down, up, s * down.shape[0], magnitude), ranks


def split_rows(layer: AdapterLayer, n: int, ranks: list[int] | None = None, rows: Sequence[int] | None = None
               ) -> list[AdapterLayer | None]:
    """The inverse of :func:`stack_rows`: ``n`` layers, one per block of output rows (``rows``: their
    sizes; None: equal). With ``ranks`` (as :func:`stack_rows` returned them) each part keeps its
    own columns; without (a fused layer trained as one, as kohya's sd-scripts does) each part has
    the whole down factor."""
    if layer.kind != "lora":
        raise ValueError(f"a fused {layer.kind} layer cannot be split into its parts")
    up, down = layer.factors["up"], layer.factors["down"]
    if rows is None:
        if up.shape[0] % n:
            raise ValueError(f"a fused layer of {up.shape[0]} rows does not split into {n} equal parts")
        rows = [up.shape[0] // n] * n
    if len(rows) != n or sum(rows) != up.shape[0]:
        raise ValueError(f"a fused layer of {up.shape[0]} rows does not split into parts of {list(rows)} rows")
    total = down.shape[0]
    dense = ranks is None
    ranks = [total] * n if dense else ranks
    if len(ranks) != n or not dense and sum(ranks) != total:
        raise ValueError(f"fused ranks {ranks} do not fit a rank-{total} layer")
    parts: list[AdapterLayer | None] = []
    col, row = 0, 0
    for r, size in zip(ranks, rows):
        out = slice(row, row + size)
        row += size
        if r == 0:
            parts.append(None)
            continue
        cols = slice(0, total) if dense else slice(col, col + r)
        col += 0 if dense else r
        mag = layer.magnitude[out] if layer.dora else None
        parts.append(lora(down[cols].contiguous(), up[out, cols].contiguous(), layer.scale * r, mag))
    return parts


def swap_halves_rows(layer: AdapterLayer) -> AdapterLayer:
    """The layer whose update has its two halves of output rows swapped (SD3's scale/shift order)."""
    if layer.kind != "lora":
        raise ValueError(f"a {layer.kind} layer on a scale/shift projection cannot be written in the original "
                         "layout (its rows are stored swapped)")
    a, b = layer.factors["up"].chunk(2)
    mag = None if layer.magnitude is None else torch.cat(layer.magnitude.chunk(2)[::-1])
    return lora(layer.factors["down"], torch.cat([b, a]).contiguous(), layer.alpha, mag, layer.shape)


def relative_error(expected: torch.Tensor, actual: torch.Tensor) -> float:
    """‖a − e‖ / ‖e‖ (absolute error when ‖e‖ = 0)."""
    e, a = expected.double(), actual.double().reshape(expected.shape)
    den = e.norm().item()
    diff = (a - e).norm().item()
    return diff / den if den > 0 else diff


@dataclass
class UpdateComparison:
    """How one set of per-layer updates matches another (e.g. trained vs read back from a file)."""

    compared: int = 0
    missing: list[str] = field(default_factory=list)     # in the expected set, not in the actual one
    extra: list[str] = field(default_factory=list)       # in the actual set only
    max_rel_err: float = 0.0
    worst: str | None = None

    def ok(self, tol: float) -> bool:
        return not self.missing and not self.extra and self.max_rel_err <= tol

    def describe(self) -> str:
        parts = [f"{self.compared} layers compared, max relative error {self.max_rel_err:.2e}"
                 + (f" ({self.worst})" if self.worst else "")]
        if self.missing:
            parts.append(f"{len(self.missing)} missing, e.g. {self.missing[:3]}")
        if self.extra:
            parts.append(f"{len(self.extra)} unexpected, e.g. {self.extra[:3]}")
        return "; ".join(parts)


def compare_updates(expected: dict[str, torch.Tensor], actual: dict[str, torch.Tensor]) -> UpdateComparison:
    out = UpdateComparison(missing=sorted(set(expected) - set(actual)), extra=sorted(set(actual) - set(expected)))
    for name in sorted(set(expected) & set(actual)):
        err = relative_error(expected[name], actual[name])
        out.compared += 1
        if out.worst is None or err > out.max_rel_err:
            out.max_rel_err, out.worst = err, name
    return out


def _tuner_layers(model: torch.nn.Module, adapter: str):
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in model.named_modules():
        if isinstance(module, BaseTunerLayer):
            names = set()
            for attr in module.adapter_layer_names:
                names |= set(getattr(module, attr, {}).keys())
            if adapter in names:
                yield name, module


def model_updates(model: torch.nn.Module, adapter: str) -> dict[str, torch.Tensor]:
    """ΔW per adapted layer as peft applies it (``get_delta_weight``: includes the scale). For DoRA
    layers this is the low-rank part; the magnitudes are compared by :func:`model_magnitudes`."""
    return {n: m.get_delta_weight(adapter).detach().double().cpu() for n, m in _tuner_layers(model, adapter)}


def model_magnitudes(model: torch.nn.Module, adapter: str) -> dict[str, torch.Tensor]:
    """DoRA magnitude vectors per adapted layer (empty for plain LoRA / LoHa / LoKr)."""
    out = {}
    for name, module in _tuner_layers(model, adapter):
        mags = getattr(module, "lora_magnitude_vector", None)
        if mags is not None and adapter in mags:
            out[name] = mags[adapter].weight.detach().double().cpu().flatten()
    return out


def layers_from_model(model: torch.nn.Module, adapter: str = "default") -> dict[str, AdapterLayer]:
    """The factors of every adapted layer of a peft-injected model (α = scaling · r)."""
    from peft.tuners.loha import LoHaLayer
    from peft.tuners.lokr import LoKrLayer
    from peft.tuners.lora import LoraLayer

    out = {}
    for name, m in _tuner_layers(model, adapter):
        get = lambda p: p[adapter].detach().float().cpu()   # noqa: E731
        shape = tuple(m.get_base_layer().weight.shape)
        if isinstance(m, LoraLayer):
            down, up = m.lora_A[adapter].weight.detach().float().cpu(), m.lora_B[adapter].weight.detach().float().cpu()
            mags = getattr(m, "lora_magnitude_vector", None)
            mag = mags[adapter].weight.detach().float().cpu().flatten() if mags and adapter in mags else None
            out[name] = lora(down, up, float(m.scaling[adapter]) * down.shape[0], mag, shape)
        elif isinstance(m, LoHaLayer):
            f = {k: get(getattr(m, f"hada_{k}")) for k in FACTORS["loha"]}
            out[name] = AdapterLayer("loha", f, float(m.scaling[adapter]) * f["w1_b"].shape[0], shape=shape)
        elif isinstance(m, LoKrLayer):
            f = {k: get(getattr(m, f"lokr_{k}")) for k in FACTORS["lokr"] if adapter in getattr(m, f"lokr_{k}")}
            if getattr(m, "lokr_t2", None) is not None and adapter in m.lokr_t2:
                raise NotImplementedError(f"{name}: Tucker-decomposed LoKr (lokr_t2) is not exported")
            layer = AdapterLayer("lokr", f, 0.0, shape=shape)
            scaling = float(m.scaling[adapter])
            if layer.rank is None:   # both factors full: LyCORIS reads s = 1, so the scale goes into W₂
                f["w2"] = f["w2"] * scaling
            else:
                layer.alpha = scaling * layer.rank
            out[name] = layer
        else:
            raise NotImplementedError(f"{name}: {type(m).__name__} adapters are not exported")
    return out
