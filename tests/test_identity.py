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


def test_a_loaded_models_fingerprint_is_its_weights_and_config_not_where_it_was_read(tmp_path, monkeypatch):
    """``module_fingerprint`` (the key of reference features, shipped ones included, and of the text and
    latent caches): the same CLIP read from another folder, by a relative path or by another library
    release keeps it (a shipped key must hold in any checkout); one changed weight or setting does not."""
    import shutil

    from transformers import CLIPModel

    from toolkit.config import data_dir
    from toolkit.hashing import module_fingerprint

    here = Path(data_dir()) / "miniature" / "clip"
    first = module_fingerprint(CLIPModel.from_pretrained(str(here)))
    moved = shutil.copytree(here, tmp_path / "elsewhere" / "clip")
    monkeypatch.chdir(tmp_path)
    model = CLIPModel.from_pretrained("elsewhere/clip")
    model.config.transformers_version = "0.0.1"
    assert module_fingerprint(model) == first
    with __import__("torch").no_grad():
        next(model.parameters()).view(-1)[0] += 1
    assert module_fingerprint(model) != first
    model = CLIPModel.from_pretrained(moved)
    model.config.logit_scale_init_value += 1
    assert module_fingerprint(model) != first


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


# every key NOT_IDENTITY lists that a train-and-evaluate run reads, changed at once (paths, logs, progress,
# checkpoints, exports, grids, caches, loader workers, evaluation bookkeeping)
DENIED = ["logger=none", "trainer.enable_progress_bar=true", "trainer.enable_model_summary=true",
          "trainer.log_every_n_steps=3", "trainer.plugins=[]", "callbacks.model_checkpoint.every_n_train_steps=1",
          "callbacks.model_checkpoint.filename='ckpt-{step}'", "max_requeues=0",
          "callbacks.progress.every_n_steps=1", "callbacks.progress.mode=lines", "callbacks.throughput.window_size=2",
          "callbacks.lr_monitor.logging_interval=epoch", "callbacks.adapter_export.formats=[diffusers]",
          "callbacks.sample_grid.every_n_steps=1", "callbacks.sample_grid.steps=3", "callbacks.sample_grid.seeds=[9]",
          "callbacks.sample_grid.prompts=[a cat]", "callbacks.encoded_cache.from_prepared=false",
          "module.speed.compile_check=null", "data.num_workers=1", "data.pin_memory=true",
          "data.policy.scan_workers=1", "eval.save_images=false", "eval.force=true", "eval.shard_size=4",
          "metrics.cache_reference=false", "memory.mode=cpu", "memory.device_gib=20"]


def finetune_eval_args(model: str, clip: str, data: Path, evaldata: Path, out: Path, cache: Path) -> list[str]:
    return ["task=finetune_eval", f"model.name_or_path={model}", f"data.path={data}", "data.resolution=16",
            "data.global_batch_size=4", "data.val_fraction=0.25", "logger=csv", "trainer.max_steps=4",
            "trainer.val_check_interval=2", "trainer.limit_val_batches=1", "trainer.enable_progress_bar=false",
            "callbacks.model_checkpoint.every_n_train_steps=2", "callbacks.sample_grid.every_n_steps=0",
            "callbacks.sample_grid.steps=2", "module.optimizer.lr=1e-2", "module.lora.dropout=0.1",
            "data.random_flip=true", f"metrics.clip_model={clip}", f"eval.dataset={evaldata}", "eval.num_images=8",
            "eval.num_ref=null", "eval.steps=2", "eval.batch_size=4", "fabric.accelerator=cpu",
            f"hydra.run.dir={out}", f"paths.cache_dir={cache}"]


def test_what_the_deny_list_names_changes_no_number(tiny_model, tiny_clip, imagefolder_data, tmp_path):
    """The same run twice, the second with every listed key it reads changed (and other output and
    cache folders): the adapter bit for bit, every training and evaluation figure, the identities."""
    from miniature.world import generate
    from tests.conftest import run_entry
    from tests.test_fault_tolerance import ADAPTER, same_tensors
    from toolkit.results import read_rows

    evaldata = generate(tmp_path / "evaldata", n=8, seed=5, striped=True, size=32)
    a, b = tmp_path / "a", tmp_path / "b"
    res = run_entry(finetune_eval_args(tiny_model, tiny_clip, imagefolder_data, evaldata, a, tmp_path / "ca"))
    assert res.returncode == 0, res.stderr[-3000:]
    res = run_entry([*finetune_eval_args(tiny_model, tiny_clip, imagefolder_data, evaldata, b, tmp_path / "cb"),
                     *DENIED, f"trainer.default_root_dir={tmp_path / 'root'}", f"data.report_dir={tmp_path / 'rep'}",
                     f"data.scan_cache_dir={tmp_path / 'scans'}", f"data.local={tmp_path / 'local'}",
                     f"callbacks.encoded_cache.dirpath={tmp_path / 'enc'}", f"callbacks.prior.dirpath={tmp_path / 'p'}",
                     f"module.speed.compile_cache={tmp_path / 'cc'}", f"eval.results_file={tmp_path / 'rows.jsonl'}",
                     f"metrics.cache_dir={tmp_path / 'refs'}"])
    assert res.returncode == 0, res.stderr[-3000:]
    assert same_tensors(a / ADAPTER, b / ADAPTER)
    ta, tb = (json.loads((r / "train_metrics.json").read_text()) for r in (a, b))
    assert {k: v for k, v in ta.items() if k != "adapter"} == {k: v for k, v in tb.items() if k != "adapter"}
    rows_a, rows_b = read_rows(a / "results.jsonl"), read_rows(tmp_path / "rows.jsonl")
    assert [r["key"] for r in rows_a] == [r["key"] for r in rows_b] and len(rows_a) == 2
    for x, y in zip(rows_a, rows_b):
        figures = [k for k in x["metrics"] if not k.startswith("seconds_") and k != "images_per_second"]
        assert {k: x["metrics"][k] for k in figures} == {k: y["metrics"][k] for k in figures}
    ids = [json.loads((r / "identity.json").read_text()) for r in (a, b)]
    assert ids[0]["keys"] == ids[1]["keys"] and ids[0]["digest"] == ids[1]["digest"]


def test_a_folder_is_reused_or_resumed_only_by_its_own_cell(tmp_path, caplog):
    """A finished cell folder: reused by the same identity, refused (naming the keys) for another, and
    refused when it was made before identities were recorded; an explicit resume of such a run
    continues with a warning. Rows without an identity are never matched."""
    from toolkit.results import without_identity
    from toolkit.run.identity import Identity, write_record
    from toolkit.run.lifecycle import RunDirError, check_identity, reuse_or_resume

    cfg = OmegaConf.create({"ckpt_path": None})
    cell = tmp_path / "0"
    (cell / "adapter").mkdir(parents=True)
    (cell / "train_metrics.json").write_text('{"global_step": 4}')
    mine = Identity({"seed": 0, "trainer.max_steps": 4})
    with pytest.raises(RunDirError, match="made before identities were recorded"):
        reuse_or_resume(cfg, cell, mine)
    check_identity(cell, mine, what="resume")   # an explicit resume of an old run: continues, saying so
    assert "cannot be compared" in caplog.text
    write_record(cell, mine)
    assert reuse_or_resume(cfg, cell, mine)[1] == {"global_step": 4}
    with pytest.raises(RunDirError, match=r"seed: recorded 0, now 7\n.*same values in the same order"):
        reuse_or_resume(cfg, cell, Identity({"seed": 7, "trainer.max_steps": 4}))
    # an interrupted cell resumes with a longer max_steps (RESUMABLE); a finished one is another result
    (cell / "train_metrics.json").unlink()
    (cell / "checkpoints").mkdir()
    (cell / "checkpoints" / "last.ckpt").write_bytes(b"")
    longer = Identity({"seed": 0, "trainer.max_steps": 8})
    resumed, done = reuse_or_resume(cfg, cell, longer)
    assert done is None and resumed.ckpt_path == "last" and cfg.ckpt_path is None
    assert without_identity([{"key": "a"}, {"key": "b", "identity": "x"}, {"train": {"identity": "y"}}]) == \
        [{"key": "a"}]
