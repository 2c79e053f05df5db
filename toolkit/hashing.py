"""Identity hashes, in one place: of files, settings, frozen models, tokenizers and cache rows.

Every result, cache folder and adapter records what it was made from by these digests, so the
same inputs always give the same key and a changed input always a new one.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

ADAPTER_PARTS = (".lora_", ".hada_", ".lokr_")   # peft's adapter tensors: not part of the base's identity
# what a loaded model's config records about where and with which library version it was read, not what
# it computes: left out of its fingerprint, so a model moved or read by another release keeps its identity
# (and every cache and shipped feature keyed by it) — at any depth (CLIP's vision_config has its own)
CONFIG_NOT_IDENTITY = ("_name_or_path", "_commit_hash", "transformers_version", "_diffusers_version")


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file (adapters, weights, references: recorded with every result)."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def settings_key(settings: dict[str, Any]) -> str:
    """Short hash of a settings dict (key order does not matter)."""
    blob = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def without_location(cfg: Any) -> Any:
    """A model config less ``CONFIG_NOT_IDENTITY``, at any depth."""
    if isinstance(cfg, dict):
        return {k: without_location(v) for k, v in cfg.items() if k not in CONFIG_NOT_IDENTITY}
    return [without_location(v) for v in cfg] if isinstance(cfg, list | tuple) else cfg


def module_fingerprint(model: torch.nn.Module) -> str:
    """Hash of a model's config and every tensor of its state dict, adapters left out: the frozen
    base's identity (an injected adapter renames ``x.weight`` to ``x.base_layer.weight``; undone here)."""
    cfg = getattr(model, "config", {})
    cfg = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    h = hashlib.sha256(json.dumps(without_location(cfg), sort_keys=True, default=str).encode())
    for name, t in sorted((k.replace(".base_layer.", "."), v) for k, v in model.state_dict().items()
                          if not any(p in k for p in ADAPTER_PARTS)):
        h.update(name.encode())
        h.update(t.detach().cpu().flatten().contiguous().view(torch.uint8).numpy().tobytes())   # any memory format
    return h.hexdigest()[:16]


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Hash of what decides a tokenizer's ids: its class, vocabulary, merges / normaliser (the fast
    tokenizer's serialised state), maximum length, padding side, special tokens and chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = {"class": type(tokenizer).__name__, "vocab": sorted(tokenizer.get_vocab().items()),
            "backend": backend.to_str() if backend is not None else None,
            "max_length": tokenizer.model_max_length, "padding_side": tokenizer.padding_side,
            "special": {k: str(v) for k, v in tokenizer.special_tokens_map.items()}}
    if getattr(tokenizer, "chat_template", None):   # an LLM encoder's prompt is templated (FLUX.2 [klein]'s Qwen3)
        spec["chat_template"] = tokenizer.chat_template
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]


def text_key(text: str) -> str:
    """A cache row's key for a caption."""
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def bytes_key(data: bytes) -> str:
    """A cache row's key for an image file's bytes."""
    return digest_key(hashlib.sha256(data).hexdigest())


def digest_key(sha256: str) -> str:
    """The cache row's key of bytes whose SHA-256 (hex) is known (a prepared set records each image's)."""
    return sha256[:24]
