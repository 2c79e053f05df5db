"""One adapted layer as an adapter file stores it, the weight update it makes, and comparisons.

    ΔW = (α / r) · U D            linear: U (d_out × r), D (r × d_in)
    ΔW = (α / r) · U ⊛ D          conv:   D (r × c_in × kh × kw), U (c_out × r × 1 × 1): the 1×1 conv
                                  after the k×k conv is one k×k conv with weight einsum(U, D)

``α`` is stored with kohya's meaning (the update is scaled by α / r); a peft layer's ``scaling``
is α / r (or α / √r with rsLoRA), so ``alpha = scaling · r`` carries either exactly.

Everything that writes an adapter in one place and reads it in another is checked with these
functions: per layer, the update read back equals the one trained (relative error), and the set
of adapted layers is the same (none dropped, none extra).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class LoraWeights:
    """The factors of one LoRA layer (float32 or the file's dtype) and its α."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    def delta(self) -> torch.Tensor:
        return lora_delta(self.down, self.up, self.alpha)


def lora_delta(down: torch.Tensor, up: torch.Tensor, alpha: float) -> torch.Tensor:
    """ΔW in float64 (so comparisons see the file's values, not float32 matmul noise)."""
    d, u = down.double(), up.double()
    scale = alpha / d.shape[0]
    if d.ndim == 2:
        return scale * (u @ d)
    if u.shape[2:] != (1, 1):
        raise ValueError(f"conv LoRA with a {tuple(u.shape[2:])} up kernel is not a LoRA layout")
    return scale * torch.einsum("or,rikl->oikl", u.flatten(1), d)


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


def _adapter_names(module: torch.nn.Module) -> set[str]:
    names = set()
    for attr in module.adapter_layer_names:
        names |= set(getattr(module, attr, {}).keys())
    return names


def model_updates(model: torch.nn.Module, adapter: str) -> dict[str, torch.Tensor]:
    """ΔW per adapted layer as peft applies it (``get_delta_weight``: includes the scale)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    out = {}
    for name, module in model.named_modules():
        if isinstance(module, BaseTunerLayer) and adapter in _adapter_names(module):
            out[name] = module.get_delta_weight(adapter).detach().double().cpu()
    return out


def lora_from_model(model: torch.nn.Module, adapter: str = "default") -> dict[str, LoraWeights]:
    """The LoRA factors of every adapted layer of a peft-injected model (α = scaling · r)."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and adapter in module.lora_A:
            down = module.lora_A[adapter].weight.detach().float().cpu()
            up = module.lora_B[adapter].weight.detach().float().cpu()
            if getattr(module, "lora_magnitude_vector", None) and adapter in module.lora_magnitude_vector:
                raise NotImplementedError(f"{name}: DoRA layers are not plain LoRA factors")
            out[name] = LoraWeights(down, up, float(module.scaling[adapter]) * down.shape[0])
    return out
