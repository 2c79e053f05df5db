"""Runs started by torchrun: one run directory from the job's id, the job's size checked, and two
"nodes" (two torchrun agents on 127.0.0.1, gloo) train exactly what one node with two processes
trains with the same global batch."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, tiny_overrides
from tests.test_fault_tolerance import ADAPTER, same_tensors
from toolkit.run.launch import check_world_size, job_run_id, shared_run_dir
from toolkit.run.lifecycle import RunDirError

TORCHRUN = {"WORLD_SIZE": "2", "RANK": "1", "TORCHELASTIC_RUN_ID": "job-7"}


def test_the_run_dir_comes_from_the_jobs_id_never_a_clock():
    want = ["task=train", "hydra.run.dir=outputs/${task_name}/torchrun-job-7"]
    assert shared_run_dir(["task=train"], TORCHRUN) == want
    slurm = {"SLURM_NTASKS": "16", "SLURM_JOB_ID": "4242", "SLURM_PROCID": "3"}
    assert shared_run_dir([], slurm) == ["hydra.run.dir=outputs/${task_name}/slurm-4242"]
    assert shared_run_dir(["hydra.run.dir=/shared/r"], TORCHRUN) == ["hydra.run.dir=/shared/r"]   # given: kept
    assert shared_run_dir(["task=train"], {"WORLD_SIZE": "2", "RANK": "1"}) == ["task=train"]   # Lightning's own ranks
    assert shared_run_dir(["task=train"], {}) == ["task=train"]
    with pytest.raises(RunDirError, match="without a rendezvous id.*--rdzv-id"):
        shared_run_dir(["task=train"], {**TORCHRUN, "TORCHELASTIC_RUN_ID": "none"})
    assert job_run_id({**TORCHRUN, "TORCHELASTIC_RUN_ID": "a/b c"}) == "torchrun-a_b_c"


def test_devices_times_nodes_must_be_the_world_size():
    check_world_size(1, 2, TORCHRUN)
    with pytest.raises(RunDirError, match=r"trainer.devices=2 × trainer.num_nodes=2 ≠ WORLD_SIZE=2"):
        check_world_size(2, 2, TORCHRUN)
    check_world_size(8, 1, {})   # not an external launch: Lightning starts the processes itself


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nnodes: int, nproc: int, args: list[str] | list[list[str]], cwd: Path,
             rdzv_id: str) -> list[subprocess.Popen]:
    """One torchrun agent per "node" (``args``: the same for all, or one list per node)."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    procs = []
    for node in range(nnodes):
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes}", f"--node-rank={node}",
               f"--nproc-per-node={nproc}", "--master-addr=127.0.0.1", f"--master-port={port}",
               f"--rdzv-id={rdzv_id}", str(ROOT / "run.py"), *(args[node] if isinstance(args[0], list) else args)]
        procs.append(subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    return procs


def finish(procs: list[subprocess.Popen]) -> list[str]:
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n\n".join(log[-3000:] for log in logs)
    return logs


def test_two_nodes_train_what_one_node_with_two_processes_trains(tiny_model, imagefolder_data, tmp_path):
    def args(nodes: int, devices: int) -> list[str]:
        base = [a for a in tiny_overrides(tiny_model, imagefolder_data, tmp_path) if not a.startswith("hydra.run.dir")]
        return [*base, "trainer=ddp", f"trainer.devices={devices}", f"trainer.num_nodes={nodes}",
                "trainer.accelerator=cpu", f"paths.cache_dir={tmp_path / 'cache'}"]

    finish(torchrun(2, 1, args(2, 1), tmp_path, "two-nodes"))
    finish(torchrun(1, 2, args(1, 2), tmp_path, "one-node"))
    runs = sorted(p.name for p in (tmp_path / "outputs" / "train").iterdir())
    assert runs == ["torchrun-one-node", "torchrun-two-nodes"]   # one run dir per job, named by its id
    two, one = (tmp_path / "outputs" / "train" / r for r in ("torchrun-two-nodes", "torchrun-one-node"))
    assert same_tensors(two / ADAPTER, one / ADAPTER)
    assert len([line for line in (two / "run_history.jsonl").read_text().splitlines() if line]) == 1   # one writer


def test_a_job_size_mismatch_is_refused_before_training(tiny_model, imagefolder_data, tmp_path):
    base = [a for a in tiny_overrides(tiny_model, imagefolder_data, tmp_path) if not a.startswith("hydra.run.dir")]
    procs = torchrun(1, 2, [*base, "trainer=ddp", "trainer.devices=2", "trainer.num_nodes=2",
                            "trainer.accelerator=cpu"], tmp_path, "mismatch")
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert procs[0].returncode != 0
    assert "trainer.devices=2 × trainer.num_nodes=2 ≠ WORLD_SIZE=2" in logs[0]


def test_a_run_dir_the_nodes_do_not_share_is_refused(tiny_model, imagefolder_data, tmp_path):
    """Each "node" given its own folder (what node-local run dirs look like): refused before any work."""
    base = [a for a in tiny_overrides(tiny_model, imagefolder_data, tmp_path) if not a.startswith("hydra.run.dir")]
    common = [*base, "trainer=ddp", "trainer.devices=1", "trainer.num_nodes=2", "trainer.accelerator=cpu"]
    procs = torchrun(2, 1, [[*common, f"hydra.run.dir={tmp_path / f'node{i}'}"] for i in range(2)], tmp_path, "apart")
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode != 0 for p in procs)
    assert all("is not shared between the nodes" in log for log in logs), logs[0][-2000:]
    assert not list(tmp_path.glob("node*/checkpoints/*.ckpt")) and not list(tmp_path.glob("node*/adapter"))
