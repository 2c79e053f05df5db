"""A quantized frozen base (``model.quantize``): the denoiser's Linear weights (and the text
encoders' when they are trained, so run every step instead of once into the text cache) stored
in 8 or 4 bits, quantized while loading by the library that owns the format; the adapter's layers
stay in the training precision on top (peft's torchao / bitsandbytes LoRA layers).

    null   full precision (model.dtype)
    int8   torchao Int8WeightOnlyConfig: int8 weights, one scale per output row; CPU and GPU
    fp8    torchao Float8WeightOnlyConfig: float8 e4m3 weights, one scale per row; GPUs with fp8
           tensor cores (compute capability ≥ 8.9: L4, RTX 4090, H100, ...)
    nf4    bitsandbytes 4-bit NormalFloat, one absmax per 64 weights; CUDA, and the CPU where the
           installed bitsandbytes runs 4-bit there (0.50.2 does; tried once, refused otherwise)

Which library: both are what diffusers and peft integrate (diffusers' ``TorchAoConfig`` /
``BitsAndBytesConfig`` quantize each Linear as its weight is read; peft puts a float LoRA layer
over ``TorchaoLoraLinear`` / ``Linear4bit``). pip's resolver, asked for them on top of this
project's pins (``pip install --dry-run torchao bitsandbytes``, 2026-12-06), adds torchao 0.18.0
and bitsandbytes 0.50.2 and keeps torch 2.13.0: neither pins torch (torchao ships abi3 wheels for
any torch ≥ 2.x, its CUDA-only kernels simply fail to load on CPU). optimum-quanto, the third
diffusers backend, is deprecated there. So: torchao for int8/fp8 (CPU and GPU), bitsandbytes for
NF4, both in the ``quantize`` extra (``pip install "toolkit[quantize]"``), which ``dev`` includes.

Weights in a diffusers folder (or hub id) only: a single-file checkpoint is read and then checked
tensor by tensor against the file (``single_file``), which a quantized copy cannot pass.
"""

from __future__ import annotations

import functools
import importlib.metadata
from typing import Any

import torch
from packaging.version import Version

METHODS = (None, "int8", "fp8", "nf4")
NF4_BLOCK = 64   # bitsandbytes' default 4-bit block size: one float32 absmax per 64 weights


def check(method: str | None, device_type: str | None, single_file: bool = False) -> None:
    """Refuse a method that cannot run here, saying why and what to set instead (``device_type``:
    the run's, or None where it is not known yet: the library and the source are checked)."""
    if method not in METHODS:
        raise ValueError(f"model.quantize={method!r}: expected null, int8, fp8 or nf4")
    if method is None:
        return
    if single_file:
        raise ValueError(f"model.quantize={method} needs a diffusers folder or hub id: a single-file checkpoint is "
                         "verified against its file tensor by tensor, which a quantized copy cannot pass. Save it as "
                         "a folder once (diffusers' from_single_file(...).save_pretrained(dir)) and name that folder.")
    lib = "bitsandbytes" if method == "nf4" else "torchao"
    try:
        version = Version(importlib.metadata.version(lib))
    except importlib.metadata.PackageNotFoundError:
        raise ImportError(f"model.quantize={method} needs {lib}: pip install 'toolkit[quantize]'") from None
    if device_type is None:
        return
    if method == "fp8":
        ok = device_type == "cuda" and torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)
        if not ok:
            raise ValueError(f"model.quantize=fp8 needs a GPU with fp8 tensor cores (compute capability ≥ 8.9: L4, "
                             f"RTX 4090, H100, ...); this run is on {device_type}. Use model.quantize=int8 (CPU and "
                             "any GPU) or nf4.")
    if method == "nf4" and device_type != "cuda" and not nf4_runs_on_cpu():
        raise ValueError(f"model.quantize=nf4 on {device_type}: bitsandbytes {version} could not quantize a 4-bit "
                         "layer on the CPU here (older releases run 4-bit on CUDA only); upgrade bitsandbytes, run "
                         "on a GPU, or use model.quantize=int8")


@functools.cache
def nf4_runs_on_cpu() -> bool:
    """Whether the installed bitsandbytes quantizes and runs a 4-bit layer on the CPU (tried once)."""
    try:
        import bitsandbytes as bnb

        layer = bnb.nn.Linear4bit(64, 8, compute_dtype=torch.float32, quant_type="nf4")
        layer.weight = bnb.nn.Params4bit(torch.ones(8, 64), requires_grad=False, quant_type="nf4")
        out = layer.to("cpu")(torch.ones(1, 64))
        return layer.weight.dtype == torch.uint8 and bool(torch.isfinite(out).all())
    except Exception:   # noqa: BLE001 - any failure means "not here"; the caller says what to do
        return False


def diffusers_config(method: str, compute_dtype: torch.dtype) -> Any:
    """The quantization config diffusers' ``from_pretrained`` applies while it reads the weights."""
    if method == "nf4":
        from diffusers import BitsAndBytesConfig

        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype)
    from diffusers import TorchAoConfig

    return TorchAoConfig(_torchao_config(method))


def transformers_config(method: str, compute_dtype: torch.dtype) -> Any:
    """The same for a transformers text encoder."""
    if method == "nf4":
        from transformers import BitsAndBytesConfig

        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype)
    from transformers import TorchAoConfig

    return TorchAoConfig(_torchao_config(method))


def _torchao_config(method: str) -> Any:
    from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig

    return {"int8": Int8WeightOnlyConfig, "fp8": Float8WeightOnlyConfig}[method]()


def linear_weight_bytes(out_features: int, in_features: int, method: str | None, dtype: torch.dtype) -> int:
    """Bytes a Linear weight of that shape takes: full precision, or quantized data plus scales."""
    n = out_features * in_features
    if method is None:
        return n * dtype.itemsize
    if method in ("int8", "fp8"):   # one byte a weight + one scale per output row (in the compute dtype)
        return n + out_features * dtype.itemsize
    return n // 2 + -(-n // NF4_BLOCK) * 4   # nf4: two weights a byte + a float32 absmax per block


def quantized_bytes(module: torch.nn.Module, method: str | None, dtype: torch.dtype) -> int:
    """Bytes of a module's parameters and buffers with its Linear weights quantized by ``method``
    (what the diffusers / transformers quantizers convert: every ``nn.Linear`` weight)."""
    total, seen = 0, set()
    linear = {id(m.weight): m for m in module.modules() if isinstance(m, torch.nn.Linear)}
    for t in [*module.parameters(), *module.buffers()]:
        if id(t) in seen:
            continue
        seen.add(id(t))
        m = linear.get(id(t))
        if m is not None and method is not None:
            total += linear_weight_bytes(m.out_features, m.in_features, method, dtype)
        else:
            total += t.numel() * (dtype.itemsize if t.is_floating_point() else t.element_size())
    return total
