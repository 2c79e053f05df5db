"""Shared fixtures: a tiny random SD pipeline saved with save_pretrained, tiny captioned datasets
in the three supported layouts, and a helper that composes the real Hydra config."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOOLKIT_CACHE", tempfile.mkdtemp(prefix="toolkit-test-cache-"))
os.environ.setdefault("WANDB_SILENT", "true")

from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.core.global_hydra import GlobalHydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import open_dict  # noqa: E402

from miniature.tokenizer import load_clip_tokenizer  # noqa: E402
from miniature.world import generate  # noqa: E402
from tests.tiny import (  # noqa: E402
    build_tiny_flux_pipeline,
    build_tiny_pipeline,
    build_tiny_sd3_pipeline,
    build_tiny_sdxl_pipeline,
)
from toolkit.config import CONFIG_DIR, ROOT, register_resolvers, renamed_overrides  # noqa: E402
from toolkit.model_defaults import model_overrides  # noqa: E402

register_resolvers()


ORACLES = ["lpips==0.1.4", "torch-fidelity==0.4.0", "torchvision==0.28.0"]   # torchvision 0.28 pairs with torch 2.13


@pytest.fixture(scope="session")
def oracles(tmp_path_factory) -> Path:
    """The independent packages ``tests/oracles.py`` runs, installed with --no-deps into a folder of
    their own (into the environment, torchvision's wheel would break transformers' image processors)."""
    target = tmp_path_factory.mktemp("oracles")
    res = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target),
                          *ORACLES], capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, f"installing the oracles {ORACLES} from the package registry failed:\n" \
                                f"{res.stderr[-3000:]}"
    return target


def run_oracle(oracles: Path, *args) -> None:
    """``python tests/oracles.py ARGS`` with the oracle packages on the path."""
    res = subprocess.run([sys.executable, str(Path(__file__).with_name("oracles.py")), *map(str, args)],
                         capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PYTHONPATH": str(oracles)})
    assert res.returncode == 0, res.stderr[-3000:]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    return str(build_tiny_pipeline(tmp_path_factory.mktemp("models") / "tiny-sd", seed=0))


@pytest.fixture(scope="session")
def tiny_model_v(tmp_path_factory) -> str:
    return str(build_tiny_pipeline(tmp_path_factory.mktemp("models") / "tiny-sd-v", seed=1,
                                   prediction_type="v_prediction"))


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory) -> str:
    """A random SDXL-architecture pipeline (two text encoders, text_time UNet), save_pretrained."""
    return str(build_tiny_sdxl_pipeline(tmp_path_factory.mktemp("models") / "tiny-sdxl", seed=0))


@pytest.fixture(scope="session")
def tiny_sd3(tmp_path_factory) -> str:
    """A random SD3.5-architecture pipeline (MMDiT, two CLIPs, T5 with an offline tokenizer), save_pretrained."""
    return str(build_tiny_sd3_pipeline(tmp_path_factory.mktemp("models") / "tiny-sd3", seed=0))


@pytest.fixture(scope="session")
def tiny_flux(tmp_path_factory) -> str:
    """A random FLUX.1-dev-architecture pipeline (CLIP + T5, guidance-embedded transformer), save_pretrained."""
    return str(build_tiny_flux_pipeline(tmp_path_factory.mktemp("models") / "tiny-flux", seed=0))


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> str:
    """A random CLIPModel (+ the shipped tokenizer) saved with save_pretrained."""
    import torch
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    tok = load_clip_tokenizer()
    cfg = CLIPConfig(
        text_config={"vocab_size": len(tok), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "max_position_embeddings": 77,
                     "eos_token_id": tok.eos_token_id, "bos_token_id": tok.bos_token_id,
                     "pad_token_id": tok.pad_token_id},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                       "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
        projection_dim=16)
    out = tmp_path_factory.mktemp("models") / "tiny-clip"
    CLIPModel(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="session")
def imagefolder_data(tmp_path_factory) -> Path:
    """16 captioned 32px images, imagefolder layout with metadata.jsonl."""
    return generate(tmp_path_factory.mktemp("data") / "imagefolder", n=16, seed=0, size=32)


@pytest.fixture(scope="session")
def csv_data(imagefolder_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data") / "csv"
    shutil.copytree(imagefolder_data, out, dirs_exist_ok=True)
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    (out / "metadata.jsonl").unlink()
    (out / "metadata.csv").write_text("file_name,text\n" + "".join(
        f'{r["file_name"]},"{r["text"]}"\n' for r in rows))
    return out


@pytest.fixture(scope="session")
def sidecar_data(imagefolder_data, tmp_path_factory) -> Path:
    """kohya layout: image.png + image.txt."""
    out = tmp_path_factory.mktemp("data") / "sidecar"
    out.mkdir(exist_ok=True)
    for line in (imagefolder_data / "metadata.jsonl").read_text().splitlines():
        r = json.loads(line)
        shutil.copy(imagefolder_data / r["file_name"], out / r["file_name"])
        (out / r["file_name"]).with_suffix(".txt").write_text(r["text"])
    return out


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """One SLURM cluster for every test that needs one (tests/slurm.py: munged, slurmctld, slurmd as
    root, this host as the one node). Where it cannot start (not root, no slurm-wlm/munge) the tests
    are skipped with the reason; CI sets CI_REQUIRE_SLURM=1, which makes that a failure."""
    from tests.slurm import Unavailable, start_cluster

    try:
        cluster = start_cluster(tmp_path_factory.mktemp("slurm"))
    except Unavailable as err:
        if os.environ.get("CI_REQUIRE_SLURM") == "1":
            pytest.fail(f"CI_REQUIRE_SLURM=1, but SLURM cannot start here: {err}")
        pytest.skip(f"SLURM cannot start here: {err}")
    yield cluster
    cluster.stop()


def tiny_overrides(model: str, data: Path, out: Path) -> list[str]:
    """Shrink the real config to a seconds-long CPU run."""
    return [
        # module=lora_miniature: the tests' tiny models are miniature-sized (SD's preset is tested by itself)
        "task=train", f"model.name_or_path={model}", f"data.path={data}", "data.resolution=16", "module=lora_miniature",
        "data.global_batch_size=4", "data.val_fraction=0.25", "logger=csv",
        "trainer.max_steps=4", "trainer.val_check_interval=2", "trainer.limit_val_batches=1",
        "trainer.log_every_n_steps=1", "callbacks.model_checkpoint.every_n_train_steps=2",
        "trainer.enable_progress_bar=false", "callbacks.sample_grid.steps=2",
        "callbacks.sample_grid.every_n_steps=2", f"hydra.run.dir={out}",
    ]


def cluster_job_args(model: str, data: Path) -> list[str]:
    """What a cluster training job passes besides its task and sizes: 8 steps over 3-batch epochs with
    every random input on (tests/test_fault_tolerance.py), the encoded cache, and no periodic
    checkpoint, so a stop's checkpoint is the only one (a resume from it is what is tested)."""
    from tests.test_fault_tolerance import resume_overrides

    base = [a for a in resume_overrides(model, data, Path("unused")) if not a.startswith(("hydra.run.dir=", "task="))]
    return [*base, "data.center_crop=true", "trainer.accelerator=cpu",
            "callbacks.model_checkpoint.every_n_train_steps=100"]


@pytest.fixture(scope="session")
def lightning_ddp(tiny_model, imagefolder_data, tmp_path_factory) -> Path:
    """The adapter of Lightning's own 2-process run (trainer=ddp trainer.devices=2) of ``cluster_job_args``,
    uninterrupted: what srun, sbatch, submitit and a resume must train, bit for bit. One thread per
    process, as Lightning gives each of 2 processes on 2 cores and the sbatch script sets
    (OMP_NUM_THREADS: bit-equality needs equal threads)."""
    out = tmp_path_factory.mktemp("lightning_ddp")
    res = run_entry(["task=train", *cluster_job_args(tiny_model, imagefolder_data), "trainer=ddp", "trainer.devices=2",
                     f"hydra.run.dir={out}", f"paths.cache_dir={out / 'cache'}"], env={"OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    return out / "adapter" / "pytorch_lora_weights.safetensors"


def compose_cfg(overrides: list[str], output_dir: Path | None = None):
    """Compose conf/config.yaml as run.py would, with the Hydra runtime set for interpolations."""
    overrides = model_overrides(renamed_overrides(overrides)[0])   # as run.py does: renamed keys, and open
    # settings follow the model
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("config", overrides=overrides, return_hydra_config=True)
    if output_dir is not None:
        with open_dict(cfg):
            cfg.hydra.runtime.output_dir = str(output_dir)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]  # as in a real run: the task sees no hydra node
    return cfg


def run_entry(args: list[str], timeout: int = 600, env: dict | None = None):
    """Run ``python run.py ARGS`` in a subprocess (the real entry point)."""
    import subprocess

    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, str(ROOT / "run.py"), *args], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


# Variants whose path another default-suite variant already takes (each interrupt kind is tested with
# and without EMA once): in the slow suite only, to keep the default suite within its time.
SLOW_VARIANTS = ("test_accumulation.py::test_interrupt_mid_window_resumes_bit_identical[plain-SIGTERM]",
                 "test_accumulation.py::test_interrupt_mid_window_resumes_bit_identical[ema-SIGKILL]")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.nodeid.endswith(SLOW_VARIANTS):
            item.add_marker(pytest.mark.slow)
