"""A quantized frozen base (``model.quantize``): the denoiser's Linear weights (and the text
encoders' when they are trained, so run every step instead of once into the text cache) stored
in 8 or 4 bits, quantized while loading by the library that owns the format; the adapter's layers
stay in the training precision on top (peft's torchao / bitsandbytes LoRA layers).

    null   full precision (model.dtype)
    int8   torchao Int8WeightOnlyConfig: int8 weights, one scale per output row; CPU and GPU
    fp8    torchao Float8WeightOnlyConfig: float8 e4m3 weights, one scale per row; GPUs with fp8
           tensor cores (compute capability ≥ 8.9: L4, RTX 4090, H100, ...)
    nf4    bitsandbytes 4-bit NormalFloat, one absmax per 64 weights; CUDA only: bitsandbytes 0.50.2
           runs 4-bit layers on the CPU, but diffusers' loader refuses to quantize without a GPU

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
    if method == "nf4" and device_type != "cuda":
        # bitsandbytes itself runs 4-bit layers on the CPU (0.50.2 does: tests/test_quantize.py), but the
        # diffusers loader that quantizes while reading refuses without a GPU ("No GPU found")
        raise ValueError(f"model.quantize=nf4 needs a CUDA GPU: diffusers' bitsandbytes loader (diffusers "
                         f"{importlib.metadata.version('diffusers')}) quantizes only on a GPU, although bitsandbytes "
                         f"{version} runs 4-bit layers on the CPU. Use model.quantize=int8 on {device_type}.")


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
    if method == "int8":   # torchao Int8Tensor: int8 data, a scale (compute dtype) and an int8 zero point per row
        return n + out_features * (dtype.itemsize + 1)
    if method == "fp8":    # torchao Float8Tensor: float8 data and a float32 scale per row
        return n + out_features * 4
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


def tensor_bytes(t: torch.Tensor) -> int:
    """The bytes a tensor holds, through tensor subclasses (torchao's quantized weights are
    wrappers around their data, scales and zero points)."""
    if hasattr(t, "__tensor_flatten__") and type(t) not in (torch.Tensor, torch.nn.Parameter):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n)) for n in names)
    quant_state = getattr(t, "quant_state", None)   # bitsandbytes Params4bit: packed data + its absmax
    extra = tensor_bytes(quant_state.absmax) if quant_state is not None else 0
    return t.numel() * t.element_size() + extra
