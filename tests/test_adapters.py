"""What is exported is exactly what was trained, in every format, loaded by the tool that format is for.

For each target set (attention; attention + feed-forward + conv; with a text-encoder LoRA), with
α ≠ r so a wrong scale cannot hide: a real ``task=train`` run writes its adapter through the real
export callback; the trained model is the module with the run's last checkpoint loaded (the
LoRA tensors exactly as trained). Then, for the diffusers and the kohya file:

1. weight level: per adapted layer, the update read back equals the trained one (relative error
   ≤ 1e-6), and the layer count equals the count trained;
2. the stock loader (``load_lora_weights`` on the file) consumes every key (its warnings about
   unexpected/missing keys are failures) and its pipeline applies the trained updates;
3. output level: that pipeline's images equal the trained in-memory model's at the same prompts,
   seeds and scheduler (≤ 1 uint8 level).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler
from hydra.utils import instantiate
from safetensors.torch import load_file, save_file

from tests.conftest import compose_cfg, tiny_overrides
from toolkit.adapters.formats import DIFFUSERS_FILE, KOHYA_FILE, AdapterFormatError, read_adapter
from toolkit.adapters.layers import compare_updates, model_updates
from toolkit.adapters.loading import (
    AdapterLoadError,
    check_messages,
    components,
    load_adapters,
    loader_messages,
    module_shapes,
)
from toolkit.tasks import train

TARGETS = {   # (base model fixture, overrides)
    "attention": ("tiny_model", ["module=lora"]),
    "attention_ff_conv": ("tiny_model", ["module=lora_miniature"]),
    "with_text_encoder": ("tiny_model", ["module=lora_full"]),
    "sdxl_attention_ff_conv": ("tiny_sdxl", ["module=lora_miniature"]),
    "sdxl_with_text_encoders": ("tiny_sdxl", ["module=lora_full"]),
}
PROMPTS = ["a red circle", "a blue square on a striped background"]


def train_run(model: str, data: Path, out: Path, extra: list[str]):
    overrides = tiny_overrides(model, data, out) + extra + [
        "module.lora.r=4", "module.lora.alpha=8", "module.optimizer.lr=1e-2", "trainer.max_steps=2",
        "~callbacks.sample_grid"]
    cfg = compose_cfg(overrides, out)
    train.run(cfg)
    return cfg


def trained_module(cfg, run: Path):
    """The module as trained: the run's config, its last checkpoint's LoRA tensors."""
    module = instantiate(cfg.module)
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    missing = set(module.trainable_state_dict()) - set(state)
    assert not missing, missing
    module.load_state_dict(state, strict=False)
    return module.eval()


def images(pipe) -> np.ndarray:
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    gens = [torch.Generator().manual_seed(s) for s in range(len(PROMPTS))]
    out = pipe(PROMPTS, generator=gens, num_inference_steps=4, guidance_scale=5.0, height=16, width=16,
               output_type="np").images
    return np.round(out * 255).astype(np.int16)


def stock_pipeline(module):
    extra = {"safety_checker": None, "requires_safety_checker": False} if module.family.name == "sd" else {}
    return module.family.pipeline_class.from_pretrained(module.pretrained["name_or_path"], **extra)


@pytest.fixture(scope="module", params=sorted(TARGETS))
def run(request, imagefolder_data, tmp_path_factory):
    model_fixture, overrides = TARGETS[request.param]
    out = tmp_path_factory.mktemp(f"adapter-{request.param}")
    cfg = train_run(request.getfixturevalue(model_fixture), imagefolder_data, out, overrides)
    module = trained_module(cfg, out)
    trained = {c: model_updates(m, "default") for c, m in module.models.items()}
    trained = {c: u for c, u in trained.items() if u}
    return request.param, out, module, trained


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_export_round_trips_through_the_stock_loader(run, fmt):
    name, out, module, trained = run
    assert set(trained) == {"unet", *(module.family.text_encoders if "with_text" in name else ())}
    path = out / "adapter" / (DIFFUSERS_FILE if fmt == "diffusers" else KOHYA_FILE)

    # 1. weight level, read back by our own reader against the base model's modules
    models = components(module, module.family)
    af = read_adapter(path, module.family, {c: module_shapes(m) for c, m in models.items()}, module.unet.config)
    assert af.format == fmt and not af.unmatched
    for comp, want in trained.items():
        cmp = compare_updates(want, af.updates(comp))
        assert cmp.ok(1e-6), f"{comp}: {cmp.describe()}"
    assert af.counts() == {c: len(u) for c, u in trained.items()}

    # 2. the stock loader on the file: every key consumed, every update as trained
    pipe = stock_pipeline(module)
    with loader_messages() as messages:
        pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name="x")
    check_messages(messages, str(path))
    for comp, want in trained.items():
        cmp = compare_updates(want, model_updates(getattr(pipe, comp), "x"))
        assert cmp.ok(1e-6), f"{fmt} via stock loader, {comp}: {cmp.describe()}"

    # 3. output level: the stock pipeline draws what the trained model draws
    reference = images(module.family.pipeline(module.pipeline_components, module.noise_scheduler))
    assert np.abs(images(pipe) - reference).max() <= 1


def test_kohya_file_is_what_a1111_reads(run):
    name, out, module, trained = run
    sd = load_file(out / "adapter" / KOHYA_FILE)
    xl = module.family.name == "sdxl"
    te = ("lora_te1_text_model_encoder_layers_", "lora_te2_text_model_encoder_layers_") if xl \
        else ("lora_te_text_model_encoder_layers_",)
    assert all(k.startswith(("lora_unet_", *te)) for k in sd)
    assert {k.split(".")[0].split("text_model")[0] for k in sd if k.startswith("lora_te")} == \
        ({p.split("text_model")[0] for p in te} if "with_text" in name else set())
    unet_keys = {k.split(".")[0] for k in sd if k.startswith("lora_unet_")}
    assert len(unet_keys) == len(trained["unet"])
    # kohya trains SDXL on the sgm UNet: its files name input/middle/output blocks
    assert all(("_input_blocks_" in k or "_middle_block_" in k or "_output_blocks_" in k) == xl for k in unet_keys)
    assert all(float(v) == 8.0 for k, v in sd.items() if k.endswith(".alpha"))   # α = 8 ≠ r = 4 kept
    from safetensors import safe_open

    with safe_open(str(out / "adapter" / KOHYA_FILE), "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_module"] == "networks.lora"
    assert meta["ss_base_model_version"] == ("sdxl_base_v1-0" if xl else "sd_v1")
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "8.0"
    assert meta["ss_resolution"] == "(16, 16)" and meta["ss_steps"] == "2" and meta["ss_num_train_images"] == "12"
    assert len(meta["sshs_model_hash"]) == 64


def test_runtime_loader_verifies_every_format_and_scale(run):
    _, out, module, trained = run
    for fname in (DIFFUSERS_FILE, KOHYA_FILE):
        pipe = stock_pipeline(module)
        [loaded] = load_adapters(pipe, module.family, [out / "adapter" / fname], [0.5])
        assert loaded.layers == {c: len(u) for c, u in trained.items()}
        for comp, want in trained.items():   # the scale reaches every layer
            cmp = compare_updates({n: 0.5 * d for n, d in want.items()}, model_updates(getattr(pipe, comp), "a0"))
            assert cmp.ok(1e-6), cmp.describe()


def test_the_old_mixed_key_file_is_caught_and_still_read_whole(run, tmp_path):
    """The defect this guards against: the old export converted attention keys to diffusers' old
    style and left ff/conv keys in peft style; diffusers picked its reader from the first key and
    dropped the rest with only a warning. Such a file (as users may still have) must be refused
    by the strict stock-loader check, and read whole by the runtime loader."""
    from diffusers.utils import convert_state_dict_to_diffusers

    name, out, module, trained = run
    sd = load_file(out / "adapter" / DIFFUSERS_FILE)
    unet = {k[len("unet."):]: v for k, v in sd.items() if k.startswith("unet.")}
    old = {f"unet.{k}": v for k, v in sorted(convert_state_dict_to_diffusers(unet).items())}
    old.update({k: v for k, v in sd.items() if k.startswith("text_encoder")})
    save_file(old, tmp_path / "old.safetensors")
    mixed = any(".lora_A" in k for k in old)
    assert mixed == (name != "attention")   # attention-only files were uniform (old style)
    pipe = stock_pipeline(module)
    with loader_messages() as messages:
        pipe.load_lora_weights(str(tmp_path), weight_name="old.safetensors", adapter_name="x")
    if mixed:
        with pytest.raises(AdapterLoadError, match="did not load"):
            check_messages(messages, "old.safetensors")
        assert len(model_updates(pipe.unet, "x")) < len(trained["unet"])   # what the warning meant
    [loaded] = load_adapters(stock_pipeline(module), module.family, [tmp_path / "old.safetensors"])
    assert loaded.layers == {c: len(u) for c, u in trained.items()}


def test_unmatched_keys_are_refused_with_a_count(run, tmp_path):
    _, out, module, _ = run
    sd = load_file(out / "adapter" / KOHYA_FILE)
    renamed = {k.replace("_blocks_1_", "_blocks_7_"): v for k, v in sd.items()}
    n_bad = len({k.split(".")[0] for k in renamed if "_blocks_7_" in k})
    assert n_bad
    save_file(renamed, tmp_path / "other_model.safetensors")
    with pytest.raises(AdapterFormatError, match=rf"{n_bad} of \d+ adapted layers .* match no layer"):
        load_adapters(stock_pipeline(module), module.family, [tmp_path / "other_model.safetensors"])


def test_inspect_reports_every_layer(run, tmp_path):
    from toolkit.tasks import inspect

    _, out, module, trained = run
    cfg = compose_cfg(["task=inspect", f"adapter={out / 'adapter' / KOHYA_FILE}", f"hydra.run.dir={tmp_path}",
                       f"model.name_or_path={module.pretrained['name_or_path']}"], tmp_path)
    res = inspect.run(cfg)
    [info] = json.loads(Path(res["details"]).read_text())
    assert info["format"] == "kohya" and info["family_named_by_file"] == module.family.name
    assert info["layers_per_component"] == {c: len(u) for c, u in trained.items()}
    assert info["base_model_match"] == {"matched": sum(len(u) for u in trained.values()), "unmatched": 0,
                                        "unmatched_examples": []}
    assert all(g["ranks"] == [4] and g["alphas"] == [8.0] for g in info["groups"])
    norms = {(r["component"], r["layer"]): r["update_norm"] for r in info["layers"]}
    for comp, updates in trained.items():
        for name, d in updates.items():
            assert norms[(comp, name)] == pytest.approx(float(d.norm()), rel=1e-6)


@pytest.mark.parametrize("run", ["with_text_encoder", "sdxl_with_text_encoders"], indirect=True)
def test_training_continues_from_a_kohya_file(run, imagefolder_data, tmp_path):
    from toolkit.hashing import file_sha256

    _, out, module, trained = run
    init = out / "adapter" / KOHYA_FILE
    overrides = tiny_overrides(module.pretrained["name_or_path"], imagefolder_data, tmp_path) + [
        "module=lora", f"module.init_adapter={init}", "trainer.max_steps=2", "module.optimizer.lr=1e-2"]
    cfg = compose_cfg(overrides, tmp_path)
    start = instantiate(cfg.module)   # rank, α and targets (UNet and text encoder) from the file
    for comp, want in trained.items():
        cmp = compare_updates(want, model_updates(start.models[comp], "default"))
        assert cmp.ok(1e-6), cmp.describe()
    train.run(cfg)
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["init_adapter_sha256"] == file_sha256(init)
    after = read_adapter(tmp_path / "adapter" / KOHYA_FILE, start.family)
    assert after.metadata["toolkit_init_adapter_sha256"] == file_sha256(init)
    resumed = trained_module(cfg, tmp_path)
    for comp, want in trained.items():
        cmp = compare_updates(want, model_updates(resumed.models[comp], "default"))
        assert not cmp.missing and not cmp.extra and cmp.max_rel_err > 1e-3   # same layers, trained further


@pytest.mark.parametrize("run", ["with_text_encoder", "sdxl_with_text_encoders"], indirect=True)
def test_merge_equals_base_plus_adapters_and_single_file_equals_folder(run, tmp_path):
    from toolkit.tasks import merge

    _, out, module, trained = run
    files = [out / "adapter" / DIFFUSERS_FILE, out / "adapter" / KOHYA_FILE]
    cfg = compose_cfg(["task=merge", f"model.name_or_path={module.pretrained['name_or_path']}",
                       f"adapter=[{files[0]},{files[1]}]",
                       "merge.lora_scale=[0.7,0.5]", "merge.dtype=float32", f"hydra.run.dir={tmp_path}"], tmp_path)
    res = merge.run(cfg)
    assert res["layers_merged"] == sum(len(u) for u in trained.values()) and res["max_rel_err"] <= 1e-6
    base = stock_pipeline(module)
    merged = module.family.pipeline_class.from_pretrained(res["diffusers"])
    for comp, updates in trained.items():   # merged = base + (0.7 + 0.5)·ΔW, the rest untouched
        b, m = getattr(base, comp).state_dict(), getattr(merged, comp).state_dict()
        adapted = {f"{n}.weight" for n in updates}
        want = {n: b[f"{n}.weight"].double() + 1.2 * d for n, d in updates.items()}
        cmp = compare_updates(want, {n: m[f"{n}.weight"] for n in updates})
        assert cmp.ok(1e-6), cmp.describe()
        assert all(torch.equal(b[k], m[k]) for k in b if k not in adapted)
    with_adapters = stock_pipeline(module)
    load_adapters(with_adapters, module.family, files, [0.7, 0.5])
    assert np.abs(images(merged) - images(with_adapters)).max() <= 1

    single = module.family.pipeline_class.from_single_file(res["single_file"], config=res["diffusers"],
                                                            local_files_only=True)
    for comp in ("unet", "vae", *module.family.text_encoders):
        a, b = getattr(merged, comp).state_dict(), getattr(single, comp).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), comp
    assert np.abs(images(single) - images(merged)).max() <= 1
    card = (Path(res["diffusers"]) / "README.md").read_text()
    assert all(file_sha(f) in card for f in files) and "0.7" in card and "0.5" in card


def file_sha(path: Path) -> str:
    from toolkit.hashing import file_sha256

    return file_sha256(path)


def test_a_safetensors_files_bytes_do_not_depend_on_the_process():
    """safetensors orders metadata by a per-process hash seed: the same adapter written by two
    processes had two SHA-256s (and so two evaluation row keys) until the header is sorted."""
    import hashlib
    import subprocess
    import sys

    code = ("import sys, torch; from safetensors.torch import save; "
            "from toolkit.adapters.formats import sorted_metadata; "
            "sd = {'b': torch.ones(3, 2), 'a': torch.zeros(4)}; meta = {f'k{i}': 'vé' * i for i in range(8)}; "
            "sys.stdout.buffer.write(sorted_metadata(save(sd, metadata=meta)))")
    blobs = {subprocess.run([sys.executable, "-c", code], capture_output=True, check=True).stdout for _ in range(3)}
    assert len(blobs) == 1
    from safetensors.torch import load

    blob = blobs.pop()
    assert torch.equal(load(blob)["b"], torch.ones(3, 2)) and hashlib.sha256(blob).hexdigest()
