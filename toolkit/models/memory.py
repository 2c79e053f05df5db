"""The memory a model phase needs, found before any weight is loaded: the phase is run on fake
tensors (shapes and dtypes, no data) and every tensor storage alive is counted.

    skeleton (meta device) ──to_empty under FakeTensorMode──> fake module
    run the phase on fake inputs with ``LiveBytes`` counting:  peak = max over the run of Σ live storage bytes

The count sees what the real kernels allocate (their outputs, what autograd saves, what gradient
checkpointing recomputes, the optimizer's state), picked by the same dispatch as a real run. So
attention costs what the kernel that runs costs: PyTorch 2.13's CPU SDPA is a flash kernel (its
output and log-sum-exp; measured +6 MB at 8192 tokens where the n×n matrix is 256 MB), as CUDA's
flash / memory-efficient kernels are, and ``module.speed.attention=default`` materialises the
matrix on both, which the trace then counts. A convolution's scratch (oneDNN's reorder buffer) is
added while it runs (``_SCRATCH``); other kernels' private scratch and allocator slack are not seen.

A CUDA tensor cannot be faked on a CPU-only PyTorch (its device guard aborts the process), so the
GPU mode traces CPU kernels under an emulation of CUDA autocast's cast lists (``CudaAutocast``):
which activations are bf16 and which stay float32 is what sets their bytes, and the lists differ
between the two devices (CUDA keeps GroupNorm/LayerNorm outputs in float32, CPU does not).

Traces take seconds for an SDXL UNet (one fake op costs ~0.1 ms, whatever the tensor size), so
each result is kept on disk (``cache_dir``) under a key of everything it depends on.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

log = logging.getLogger(__name__)
GiB = 2**30


@dataclass(frozen=True)
class Footprint:
    """Bytes a phase holds beyond its resident weights: ``fixed + per_item · batch``."""

    fixed: int
    per_item: int

    def at(self, batch: int) -> int:
        return self.fixed + self.per_item * batch

    @staticmethod
    def from_two(peak_1: int, peak_2: int) -> Footprint:
        """From the traced peaks at batch 1 and 2 (activations are linear in the batch)."""
        per = max(peak_2 - peak_1, 0)
        return Footprint(max(peak_1 - per, 0), per)


def _nbytes(t: Any) -> int:
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


# A convolution's scratch while it runs, which no tensor shows: oneDNN (PyTorch's CPU convolution)
# holds one more buffer the size of the larger of its input and output (a reorder to or from its
# blocked layout). Measured, one Conv2d in float32 without gradients in a fresh process (the entry's
# allocator policy): 128→128 channels at 512² peak 263 MiB for a 128 MiB output; 512→128 at 256²,
# 162 MiB for a 128 MiB input and a 32 MiB output; 128→512 at 256², 263 MiB; 128→3 at 1024², 583 MiB
# for a 512 MiB input. It is what the VAE decoder's peak (its full-resolution convolutions) was
# missing: −17 % at SDXL's 1024 px before it was counted (bench/README §18). A channels-last input
# needs no reorder (oneDNN's brgemm kernel reads it as it is): diffusers' VAE decoder turns
# channels-last after its attention at batch ≥ 2, where this over-counts by one buffer (+20 % on a
# quarter-width decode at batch 2); counted anyway, as the layout is the kernels' choice, and the
# toolkit decodes one image at a time (VAE slicing), where it is exact. The backward convolution's
# scratch is not counted (a UNet's convolutions are small beside what a step holds). Measured for
# float32, which VAEs run in (``force_upcast``): in bfloat16 oneDNN holds about two output-sized
# buffers (a review measured SD-1.5's decode in bf16 at −12 % of its peak), and a build without
# oneDNN falls back to im2col (~9× the input). On a GPU cuDNN's workspace takes its place; the same
# transient is counted there (unmeasured).
_SCRATCH = {torch.ops.aten.convolution.default: lambda args, out: max(_nbytes(args[0]), _nbytes(out))}


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of every tensor storage an op returns until the storage is freed; ``peak``
    is the largest total. The storages of ``existing`` tensors (the weights: a view of a weight,
    as ``linear`` makes of it, is no new memory) are not counted. An op in ``_SCRATCH`` also holds
    its scratch while it runs (counted at that moment, on top of what is live with its output)."""

    def __init__(self, existing: Iterable[torch.Tensor] = ()) -> None:
        super().__init__()
        self.live = self.peak = 0
        self.refs: dict[int, weakref.ref] = {}
        self.known = {t.untyped_storage()._cdata for t in existing}

    def _track(self, t: torch.Tensor) -> None:
        st = t.untyped_storage()
        key = st._cdata   # the storage itself (a view shares it), not its Python wrapper
        ref = self.refs.get(key)
        if key in self.known or (ref is not None and ref() is not None):
            return
        n = st.nbytes()
        self.live += n
        self.peak = max(self.peak, self.live)

        def freed(_ref: Any, n: int = n, key: int = key) -> None:
            self.live -= n
            self.refs.pop(key, None)

        self.refs[key] = weakref.ref(st, freed)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._track(t)
        scratch = _SCRATCH.get(func)
        if scratch is not None:
            self.peak = max(self.peak, self.live + scratch(args, out))
        return out


# CUDA autocast's cast lists (aten/src/ATen/autocast_mode.cpp, the CUDA section), for the
# functions the models here call: the first run in the autocast dtype, the second in float32.
_LOWER = (F.conv1d, F.conv2d, F.conv3d, F.conv_transpose2d, F.linear, torch.matmul, torch.mm, torch.bmm, torch.baddbmm,
          torch.addmm, torch.einsum, F.scaled_dot_product_attention, torch.Tensor.matmul, torch.Tensor.__matmul__,
          torch.Tensor.bmm, torch.Tensor.mm)
_FP32 = (F.group_norm, F.layer_norm, F.softmax, F.log_softmax, torch.softmax, torch.Tensor.softmax, F.mse_loss,
         torch.exp, torch.Tensor.exp, torch.pow, torch.Tensor.pow, torch.rsqrt, torch.Tensor.rsqrt, F.softplus)


class CudaAutocast(TorchFunctionMode):
    """CUDA autocast's dtype choices, at the Python API (above autograd, where autocast casts, so
    autograd saves the cast tensors as it does on the GPU): ``_LOWER`` functions get ``dtype``
    inputs, ``_FP32`` ones float32 inputs, everything else runs in the dtypes it is given."""

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.dtype, self.lower, self.fp32 = dtype, set(_LOWER), set(_FP32)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        to = self.dtype if func in self.lower else torch.float32 if func in self.fp32 else None
        if to is not None:
            cast = lambda x: x.to(to) if isinstance(x, torch.Tensor) and x.is_floating_point() and x.dtype != to else x
            args, kwargs = tree_map(cast, args), tree_map(cast, kwargs)
        return func(*args, **kwargs)


def autocast(mode: str, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Mixed precision as a run on ``mode`` (cpu | gpu) does it; ``dtype`` None: none."""
    if dtype is None:
        return contextlib.nullcontext()
    return CudaAutocast(dtype) if mode == "gpu" else torch.autocast("cpu", dtype=dtype)


def checkpointing(mode: str, dtype: torch.dtype | None) -> Callable[..., Any] | None:
    """The gradient-checkpointing function of a traced step: torch restores torch.autocast when it
    recomputes a block in backward, but not a Python mode, so the emulation is handed in as the
    recomputation's context (None: torch's default is right)."""
    if mode != "gpu" or dtype is None:
        return None
    import functools

    from torch.utils.checkpoint import checkpoint

    return functools.partial(checkpoint, use_reentrant=False,
                             context_fn=lambda: (contextlib.nullcontext(), CudaAutocast(dtype)))


@contextlib.contextmanager
def fake_tensors() -> Iterator[Any]:
    """A FakeTensorMode in which meta skeletons become fake CPU modules (``materialise``)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    prev = torch.__future__.get_overwrite_module_params_on_conversion()
    # fake parameters cannot be swapped in place (the mode holds weak references to them)
    torch.__future__.set_overwrite_module_params_on_conversion(True)
    try:
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            yield mode
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(prev)


def meta_copy(module: torch.nn.Module, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """A copy of a meta skeleton, its floating weights in ``dtype``: made outside ``fake_tensors``
    (a fake mode can neither copy meta tensors nor convert fake parameters, which it holds weakly)."""
    module = copy.deepcopy(module)
    return module.to(dtype) if dtype is not None else module


def materialise(module: torch.nn.Module) -> torch.nn.Module:
    """A meta skeleton (``meta_copy``) as a fake CPU module, inside ``fake_tensors``."""
    return module.to_empty(device="cpu")


def traced_peak(run: Callable[[], Any], *modules: torch.nn.Module) -> int:
    """The peak of live tensor bytes while ``run()`` runs (inside ``fake_tensors``), the weights of
    ``modules`` not counted."""
    with LiveBytes(t for m in modules for t in (*m.parameters(), *m.buffers())) as live:
        out = run()
        del out
    return live.peak


def trace_key(spec: dict[str, Any]) -> str:
    import diffusers
    import transformers

    full = {**spec, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "tracer": 3}
    return hashlib.sha256(json.dumps(full, sort_keys=True, default=str).encode()).hexdigest()[:24]


def cached(cache_dir: str | Path | None, spec: dict[str, Any], compute: Callable[[], dict[str, Any]]
           ) -> dict[str, Any]:
    """``compute()`` (a JSON-able dict of byte counts and shapes), kept on disk under the hash of
    ``spec`` plus the library versions that decide what the kernels allocate. A file that does not
    read back as a dict is computed again."""
    if cache_dir is None:
        return compute()
    path = Path(cache_dir) / f"{trace_key(spec)}.json"
    if path.is_file():
        with contextlib.suppress(ValueError, OSError):
            got = json.loads(path.read_text())
            if isinstance(got, dict) and got:
                return got
    out = compute()
    from toolkit.atomic import atomic_open

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path, "w") as f:
        json.dump(out, f)
    return out


def weight_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's parameters and buffers as they are (any device, meta included)."""
    seen, total = set(), 0
    for t in [*module.parameters(), *module.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def fmt(n: float) -> str:
    """Bytes as GiB (MiB below 1 GiB)."""
    return f"{n / GiB:.2f} GiB" if abs(n) >= GiB else f"{n / 2**20:.0f} MiB"


class OutOfBudget(ValueError):
    """A phase cannot fit the memory it is given, even at batch 1: the message names the knob."""


@dataclass(frozen=True)
class Memory:
    """The ``memory`` config: the budget of the phases that run frozen models over many images, and
    the plan (``toolkit.memory.plan``).

    Args:
        budget_gib: what one such phase (encoding, sample grid, class images, generation, features)
            may hold on the device, its resident weights included: each takes the largest batch (up
            to the batch size it is given) whose traced peak fits. Declared, never the device's free
            memory: every node and process takes the same batch, so the node-local caches stay
            bit-identical and evaluation shards hold whole batches at any process count.
        device_gib: the device memory the plan checks each phase against; None: what the device
            has (CUDA: free memory at start; CPU: available RAM plus this process).
        mode: ``cpu`` | ``gpu`` | ``auto`` (the trainer's / the evaluation's accelerator).
        plan: ``print`` (at start, then run), ``only`` (print it and stop: ``--plan``) or ``off``.
        traces: where traced footprints are kept (None: traced again each time).
    """

    budget_gib: float = 16.0
    device_gib: float | None = None
    mode: str = "auto"
    plan: str = "print"
    traces: str | None = None

    def __post_init__(self) -> None:
        if self.mode not in ("auto", "cpu", "gpu"):
            raise ValueError(f"memory.mode={self.mode!r}: expected auto, cpu or gpu")
        if self.plan not in ("print", "only", "off"):
            raise ValueError(f"memory.plan={self.plan!r}: expected print, only or off")
        if not self.budget_gib > 0:
            raise ValueError(f"memory.budget_gib={self.budget_gib}: expected a positive number of GiB")

    @property
    def budget(self) -> float:
        return self.budget_gib * GiB

    def batch(self, cost: Any, resident: int, cap: int, what: str, knobs: str) -> int:
        """The largest batch ≤ ``cap`` whose ``resident + cost.at(batch)`` fits the budget; fails
        (naming ``knobs``) when not even one item does."""
        n = largest_batch(cost, self.budget - resident, cap)
        if n < 1:
            raise OutOfBudget(f"{what}: one item needs {fmt(resident + cost.at(1))} ({fmt(resident)} of weights on "
                              f"the device + {fmt(cost.at(1))}), more than memory.budget_gib={self.budget_gib:g}. "
                              f"{knobs}")
        return n


def largest_batch(cost: Any, room: float, cap: int) -> int:
    """The largest n in [1, cap] with ``cost.at(n) ≤ room`` (``at`` grows with n); 0: none."""
    lo, hi = 0, max(int(cap), 0)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if cost.at(mid) <= room:
            lo = mid
        else:
            hi = mid - 1
    return lo


@dataclass(frozen=True)
class MaxOf:
    """A phase made of steps that run one after another: its peak is the largest step's."""

    parts: tuple[Any, ...]

    def at(self, batch: int) -> int:
        return max(p.at(batch) for p in self.parts)


@dataclass(frozen=True)
class Scaled:
    """A step that sees ``factor`` items per item of the phase (classifier-free guidance: 2; flips: 2)."""

    part: Any
    factor: int = 1
    fixed_items: int | None = None   # a step that always runs this many (VAE slicing: 1)

    def at(self, batch: int) -> int:
        return self.part.at(self.fixed_items if self.fixed_items is not None else self.factor * batch)
