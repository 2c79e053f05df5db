"""A result's identity is the whole config but a named deny-list: change any key of the composed
configs and the identity changes, unless the key is listed (with its reason) in
``toolkit/run/identity.py``; the content of the model's files is part of it."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
from omegaconf import OmegaConf

from tests.conftest import compose_cfg
from toolkit.run.fingerprint import file_digest, fingerprint, hub_commit
from toolkit.run.identity import NOT_IDENTITY, RECORDED, RESUMABLE, VIEW_IGNORES, identity, in_identity

# folded into derived.micro_batches_per_step: each alone changes it
FOLDED = ("trainer.devices", "trainer.num_nodes", "trainer.accumulate_grad_batches")


def changed(value: Any) -> Any:
    """Another value of the same kind."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value * 2 + 1
    if isinstance(value, list):
        return [*value, "x"]
    if isinstance(value, dict):
        return {**value, "x": 1}
    return "x" if value is None else f"{value}x"


def leaves(node: Any, prefix: str = "") -> list[str]:
    if isinstance(node, dict) and node:
        return [k for key, v in node.items() for k in leaves(v, f"{prefix}{key}.")]
    return [prefix[:-1]]


@pytest.mark.parametrize(("task", "view"), [("train", "run"), ("finetune_eval", "cell"), ("finetune_eval", "run"),
                                            ("eval", "evaluation")])
def test_every_key_changes_the_identity_unless_it_is_listed(task, view, tmp_path):
    """Each leaf of the composed config, changed alone (interpolations resolved first, so a key
    is changed by itself), changes the identity exactly when it is not listed."""
    cfg = OmegaConf.create(OmegaConf.to_container(compose_cfg([f"task={task}"], tmp_path), resolve=True))
    base = identity(cfg, view, with_contents=False).digest
    missed, listed_but_counted = [], []
    keys = leaves(OmegaConf.to_container(cfg))
    assert len(keys) > 150
    for key in keys:
        before = OmegaConf.select(cfg, key)
        OmegaConf.update(cfg, key, changed(before), force_add=True)
        now = identity(cfg, view, with_contents=False).digest
        OmegaConf.update(cfg, key, before, force_add=True)
        counts = in_identity(key, view) or (view != "evaluation" and key in FOLDED)
        if counts and now == base:
            missed.append(key)
        elif not counts and now != base:
            listed_but_counted.append(key)
    assert identity(cfg, view, with_contents=False).digest == base
    assert not missed, f"keys outside the identity without a reason listed: {missed}"
    assert not listed_but_counted, f"listed keys that still change it: {listed_but_counted}"


def test_every_listed_key_says_why():
    lists = [NOT_IDENTITY, RECORDED, RESUMABLE, *VIEW_IGNORES.values()]
    assert all(isinstance(why, str) and len(why) > 8 for d in lists for why in d.values())
    assert set(RESUMABLE) == {"trainer.max_steps", "trainer.max_time"}


def test_the_model_is_identified_by_its_content(tiny_model, tmp_path):
    """New weights at the same path give a new identity; the same weights elsewhere keep the content
    key (the path is a key of its own); a hub id is its cached commit."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    cfg = compose_cfg(["task=train", f"model.name_or_path={model}", "data.resolution=16", "module=lora",
                       f"paths.cache_dir={tmp_path / 'cache'}"], tmp_path / "run")
    first = identity(cfg).keys["content.model.name_or_path"]
    weights = next(model.glob("unet/*.safetensors"))
    blob = bytearray(weights.read_bytes())
    blob[-1] ^= 1   # one bit of the last weight
    weights.write_bytes(bytes(blob))
    assert identity(cfg).keys["content.model.name_or_path"] != first
    hashed = json.loads(next((tmp_path / "cache" / "content_hashes").glob("*.json")).read_text())
    assert set(hashed) == {"path", "size", "mtime_ns", "sha256"}
    assert fingerprint(str(model), tmp_path / "cache") == fingerprint(str(model), None)   # cache = a fresh hash


def test_a_file_is_hashed_once_until_it_changes(tmp_path, monkeypatch):
    import toolkit.run.fingerprint as fp

    f = tmp_path / "weights.bin"
    f.write_bytes(os.urandom(1 << 20))
    calls = []
    real = fp._sha256
    monkeypatch.setattr(fp, "_sha256", lambda p: calls.append(p) or real(p))
    a = file_digest(f, tmp_path / "c")
    assert file_digest(f, tmp_path / "c") == a and len(calls) == 1          # cached: a stat, no read
    f.write_bytes(os.urandom(1 << 20))
    os.utime(f, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert file_digest(f, tmp_path / "c") != a and len(calls) == 2          # changed: hashed again


def test_a_hub_id_is_its_commit_from_the_offline_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    refs = tmp_path / "models--org--name" / "refs"
    refs.mkdir(parents=True)
    (refs / "main").write_text("a" * 40)
    assert hub_commit("org/name", None) == "a" * 40 and hub_commit("org/name", "b" * 40) == "b" * 40
    assert fingerprint("org/name", None) == f"hub:org/name@{'a' * 40}"
    (refs / "main").write_text("c" * 40)   # main moved
    assert fingerprint("org/name", None) == f"hub:org/name@{'c' * 40}"
    assert fingerprint("org/other", None).startswith("unresolved:")   # offline, not cached: the loader says why
    assert Path(tmp_path).is_dir()
