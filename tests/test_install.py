"""The toolkit as users install it: a wheel built from the project, installed (not editable) in a fresh
virtual environment, runs a task from any folder with its packaged configs; a user's own config
folder joins through Hydra's search path; the pretrain tasks never write over the shipped model."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from miniature import SEARCHPATH
from tests.conftest import ROOT, compose_cfg


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    """A venv with the project's wheel. Its dependencies come from this environment's site-packages
    (``--system-site-packages``: the same torch, diffusers, ... without a download); the toolkit
    itself is the wheel's copy in the venv, which the test checks."""
    tmp = tmp_path_factory.mktemp("install")
    wheels = tmp / "wheels"
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                          "-w", str(wheels), str(ROOT)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    env_dir = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(env_dir)], check=True, timeout=300)
    py = env_dir / "bin" / "python"
    res = subprocess.run([str(py), "-m", "pip", "install", "--no-deps", "-q", str(next(wheels.glob("*.whl")))],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return env_dir


def run_installed(venv: Path, args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TOOLKIT_DATA")}
    return subprocess.run([str(venv / "bin" / "toolkit"), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env={**clean, **env})


def test_the_installed_package_runs_a_task_from_anywhere(venv, tmp_path):
    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import toolkit; print(toolkit.__file__)"],
                           cwd=tmp_path, capture_output=True, text=True, env={k: v for k, v in os.environ.items()
                                                                               if k != "PYTHONPATH"})
    assert Path(where.stdout.strip()).is_relative_to(venv), where.stdout + where.stderr   # the wheel's copy
    out = tmp_path / "sample"
    res = run_installed(venv, ["task=sample", "sample.steps=2", "sample.seeds=[0,1]", f"hydra.run.dir={out}"],
                        tmp_path, TOOLKIT_DATA=str(ROOT / "data"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert len(list((out / "samples").glob("*.png"))) == 2 and (out / "grid.png").is_file()
    # without the miniature located, a task that needs it says what to set, before anything runs
    res = run_installed(venv, ["task=sample", f"hydra.run.dir={tmp_path / 'no'}"], tmp_path)
    assert res.returncode != 0 and "TOOLKIT_DATA" in res.stderr and not (tmp_path / "no").exists()


def test_a_users_config_folder_joins_through_the_search_path(venv, tmp_path):
    mine = tmp_path / "my_conf" / "experiment"
    mine.mkdir(parents=True)
    (mine / "my_style.yaml").write_text("# @package _global_\ndefaults:\n  - override /task: sample\n"
                                        "sample:\n  steps: 2\n  seeds: [7]\n")
    out = tmp_path / "run"
    res = run_installed(venv, [f"hydra.searchpath=[file://{tmp_path / 'my_conf'}]", "experiment=my_style",
                               f"hydra.run.dir={out}"], tmp_path, TOOLKIT_DATA=str(ROOT / "data"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert [p.name for p in (out / "samples").glob("*.png")] == ["00000.png"]
    assert '"seed": 7' in (out / "samples" / "00000.json").read_text()


@pytest.mark.parametrize("task", ["pretrain_autoencoder", "pretrain_clip", "pretrain_unet"])
def test_pretrain_tasks_write_a_new_folder(task, tmp_path):
    cfg = compose_cfg([SEARCHPATH, f"task={task}", f"hydra.run.dir={tmp_path}"], tmp_path)
    assert Path(cfg.pretrain.miniature_dir) == tmp_path / "miniature"
    assert not Path(cfg.pretrain.miniature_dir).is_relative_to(ROOT / "data")
