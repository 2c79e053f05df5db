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


def site_dirs() -> list[str]:
    """The running environment's package folders (system Python, a venv, a conda env alike)."""
    import site

    dirs = [*site.getsitepackages(), site.getusersitepackages(), *sys.path]
    return list(dict.fromkeys(d for d in dirs if d.endswith(("site-packages", "dist-packages")) and Path(d).is_dir()))


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    """A fresh venv with the project's wheel. Its dependencies are the running environment's
    packages, whatever that environment is: a ``.pth`` file in the venv adds the running
    interpreter's package folders after the venv's own (``--system-site-packages`` would add the
    *base* Python's, which inside a venv or conda env lack the project's dependencies). The
    toolkit itself is the wheel's copy in the venv, and torch the running environment's (checked)."""
    tmp = tmp_path_factory.mktemp("install")
    wheels = tmp / "wheels"
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                          "-w", str(wheels), str(ROOT)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    env_dir = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(env_dir)], check=True, timeout=300)
    py = env_dir / "bin" / "python"
    purelib = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    # one "import" line per folder: site.addsitedir also runs that folder's own .pth files
    (Path(purelib) / "_running_environment.pth").write_text(
        "".join(f"import site; site.addsitedir({d!r})\n" for d in site_dirs()))
    res = subprocess.run([str(py), "-m", "pip", "install", "--no-deps", "-q", str(next(wheels.glob("*.whl")))],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    import torch

    seen = subprocess.run([str(py), "-c", "import torch, hydra; print(torch.__file__)"], capture_output=True,
                          text=True, cwd=tmp, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert seen.returncode == 0 and seen.stdout.strip() == torch.__file__, seen.stdout + seen.stderr
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
