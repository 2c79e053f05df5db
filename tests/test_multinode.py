"""Runs started by torchrun: one run directory from the job's id, the job's size checked, and two
"nodes" (two torchrun agents on 127.0.0.1, gloo) train exactly what one node with two processes
trains with the same global batch."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from miniature.world import generate
from tests.conftest import ROOT, run_entry, tiny_overrides
from tests.helpers import free_port
from tests.test_eval import eval_overrides
from tests.test_fault_tolerance import ADAPTER, resume_overrides, same_tensors, wait_for
from toolkit.results import read_rows
from toolkit.run.launch import check_restartable, check_world_size, elastic_resume, job_run_id, shared_run_dir
from toolkit.run.lifecycle import RunDirError

TORCHRUN = {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "0",
            "TORCHELASTIC_RUN_ID": "job-7"}
LAUNCH_VARS = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "NODE_RANK", "TORCHELASTIC_RUN_ID",
               "SLURM_NTASKS", "SLURM_JOB_ID", "SLURM_PROCID", "SLURM_LOCALID", "SLURM_NODEID", "SLURM_NTASKS_PER_NODE",
               "SLURM_JOB_NAME", "SLURM_STEP_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID",
               "TORCHELASTIC_MAX_RESTARTS", "GROUP_WORLD_SIZE",
               "TORCHELASTIC_USE_AGENT_STORE")


def launched(monkeypatch, env: dict[str, str]) -> None:
    """This process as one the launcher of ``env`` started (and nothing else)."""
    for k in LAUNCH_VARS:
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)


def test_the_run_dir_comes_from_the_jobs_id_never_a_clock(monkeypatch):
    want = ["task=train", "hydra.run.dir=outputs/${task_name}/torchrun-job-7"]
    launched(monkeypatch, TORCHRUN)
    assert shared_run_dir(["task=train"]) == want
    assert shared_run_dir(["hydra.run.dir=/shared/r"]) == ["hydra.run.dir=/shared/r"]   # given: kept
    launched(monkeypatch, {"SLURM_NTASKS": "16", "SLURM_JOB_ID": "4242", "SLURM_PROCID": "3", "SLURM_LOCALID": "3",
                           "SLURM_NODEID": "0", "SLURM_NTASKS_PER_NODE": "8", "SLURM_STEP_ID": "0"})
    assert shared_run_dir([]) == ["hydra.run.dir=outputs/${task_name}/slurm-4242"]
    launched(monkeypatch, {"SLURM_NTASKS": "1", "SLURM_JOB_ID": "77", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
                           "SLURM_NODEID": "0"})   # one task: a requeue keeps the job id, so the run dir too
    assert shared_run_dir([]) == ["hydra.run.dir=outputs/${task_name}/slurm-77"]
    launched(monkeypatch, {"WORLD_SIZE": "2", "LOCAL_RANK": "1"})
    assert shared_run_dir(["task=train"]) == ["task=train"]   # Lightning's own ranks: it passes the dir
    launched(monkeypatch, {})
    assert shared_run_dir(["task=train"]) == ["task=train"]
    launched(monkeypatch, {**TORCHRUN, "TORCHELASTIC_RUN_ID": "none"})
    with pytest.raises(RunDirError, match="without a rendezvous id.*--rdzv-id"):
        shared_run_dir(["task=train"])
    launched(monkeypatch, {**TORCHRUN, "TORCHELASTIC_RUN_ID": "a/b c"})
    assert job_run_id() == "torchrun-a_b_c"


def test_a_restart_continues_the_jobs_own_run_and_needs_an_unshared_store(tmp_path, monkeypatch):
    run = tmp_path / "outputs" / "train" / "torchrun-job-7"
    args = ["task=train", "hydra.run.dir=outputs/${task_name}/torchrun-job-7"]
    launched(monkeypatch, {**TORCHRUN, "TORCHELASTIC_RESTART_COUNT": "0"})   # a healthy node restarts with count 0
    monkeypatch.chdir(tmp_path)
    assert elastic_resume(args) == args   # nothing there: a fresh start
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"x")
    assert elastic_resume(args) == args   # another run's checkpoint: not continued (refused later)
    (run / "run_history.jsonl").write_text(json.dumps({"event": "start", "job": "torchrun-job-7"}) + "\n")
    assert elastic_resume(args) == ["task=train", "hydra.run.dir=outputs/train/torchrun-job-7", "ckpt_path=last"]
    assert elastic_resume([*args, "ckpt_path=null"]) == [*args, "ckpt_path=null"]   # told otherwise
    # the task an experiment sets (sd15_naruto: train; no task= argument, which alone would say the
    # default finetune_eval): the run is found from the composed config
    exp = ["experiment=sd15_naruto", "hydra.run.dir=outputs/${task_name}/torchrun-job-7"]
    assert elastic_resume(exp) == ["experiment=sd15_naruto", "hydra.run.dir=outputs/train/torchrun-job-7",
                                   "ckpt_path=last"]
    shared = {**TORCHRUN, "TORCHELASTIC_MAX_RESTARTS": "1", "GROUP_WORLD_SIZE": "2",
              "TORCHELASTIC_USE_AGENT_STORE": "True"}
    launched(monkeypatch, shared)
    with pytest.raises(RunDirError, match="TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1"):
        check_restartable()
    for ok in ({"TORCHELASTIC_USE_AGENT_STORE": "False"}, {"GROUP_WORLD_SIZE": "1"},   # one node: same counts
               {"TORCHELASTIC_MAX_RESTARTS": "0"}):
        launched(monkeypatch, {**shared, **ok})
        check_restartable()


def test_devices_times_nodes_must_be_the_world_size(monkeypatch):
    launched(monkeypatch, {**TORCHRUN, "LOCAL_WORLD_SIZE": "1"})
    check_world_size(1, 2)
    with pytest.raises(RunDirError, match=r"trainer.devices=2 × trainer.num_nodes=2 ≠ WORLD_SIZE=2"):
        check_world_size(2, 2)
    launched(monkeypatch, {})
    check_world_size(8, 1)   # not an external launch: Lightning starts the processes itself


def torchrun(nnodes: int, nproc: int, args: list[str] | list[list[str]], cwd: Path, rdzv_id: str,
             extra: tuple[str, ...] = ()) -> list[subprocess.Popen]:
    """One torchrun agent per "node" (``args``: the same for all, or one list per node)."""
    port = free_port()
    # TORCH_DISABLE_SHARE_RDZV_TCP_STORE: what docs/distributed.md's torchrun commands set (a restart needs it)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    procs = []
    (cwd / "logs").mkdir(exist_ok=True)
    for node in range(nnodes):
        # the c10d rendezvous (what a cluster uses): a failed worker makes every agent restart its group
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes}", f"--nproc-per-node={nproc}",
               "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id={rdzv_id}", *extra,
               str(ROOT / "run.py"),
               *(args[node] if isinstance(args[0], list) else args)]
        log = cwd / "logs" / f"{rdzv_id}-node{node}.log"
        with open(log, "w") as out:   # a file, not a pipe: a chatty agent never blocks on a full pipe
            proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, text=True,
                                    start_new_session=True)   # its own group: a "node" is killed whole
        proc.log = log
        procs.append(proc)
    return procs


def logs_of(procs: list[subprocess.Popen], timeout: float = 600) -> list[str]:
    end = time.time() + timeout
    try:
        for p in procs:
            p.wait(timeout=max(end - time.time(), 1))
    finally:   # a hung job never outlives its test
        if any(p.poll() is None for p in procs):
            kill_nodes(procs)
    return [p.log.read_text() for p in procs]


def finish(procs: list[subprocess.Popen]) -> list[str]:
    logs = logs_of(procs)
    assert all(p.returncode == 0 for p in procs), "\n\n".join(log[-3000:] for log in logs)
    return logs


def job_args(tiny_model, imagefolder_data, tmp_path, nodes: int, devices: int, caches: list[Path]) -> list[list[str]]:
    """8 steps with every random input on (flips, caption dropout, LoRA dropout), checkpoints every
    2 steps, the encoded cache on; ``caches``: one folder per node (node-local) or one for all."""
    base = [a for a in resume_overrides(tiny_model, imagefolder_data, tmp_path) if not a.startswith("hydra.run.dir")]
    common = [*base, "data.center_crop=true", "trainer=ddp", f"trainer.devices={devices}",
              f"trainer.num_nodes={nodes}", "trainer.accelerator=cpu"]
    return [[*common, f"paths.cache_dir={caches[min(i, len(caches) - 1)]}"] for i in range(nodes)]


def cached_rows(cache: Path) -> int:
    return sum(len(json.loads(f.read_text())) for f in cache.glob("encoded/latents-*/*.keys.json"))


@pytest.fixture(scope="module")
def two_nodes(tiny_model, imagefolder_data, tmp_path_factory) -> tuple[Path, list[str]]:
    """An uninterrupted run on 2 nodes × 1 process, each node with its own (node-local) cache."""
    tmp = tmp_path_factory.mktemp("two_nodes")
    logs = finish(torchrun(2, 1, job_args(tiny_model, imagefolder_data, tmp, 2, 1, [tmp / "n0", tmp / "n1"]),
                           tmp, "two-nodes"))
    return tmp, logs


def test_two_nodes_train_what_one_node_with_two_processes_trains(two_nodes, tiny_model, imagefolder_data, tmp_path):
    tmp, logs = two_nodes
    finish(torchrun(1, 2, job_args(tiny_model, imagefolder_data, tmp_path, 1, 2, [tmp_path / "shared"])[0], tmp_path,
                    "one-node"))
    two, one = tmp / "outputs" / "train" / "torchrun-two-nodes", tmp_path / "outputs" / "train" / "torchrun-one-node"
    assert sorted(p.name for p in (tmp / "outputs" / "train").iterdir()) == ["torchrun-two-nodes"]   # one run dir
    assert same_tensors(two / ADAPTER, one / ADAPTER)
    assert len([line for line in (two / "run_history.jsonl").read_text().splitlines() if line]) == 1   # one writer
    # Node-local caches: each node built a complete copy (node 1 did not stop at "items still missing"),
    # split over its own ranks; the shared cache of the one-node job was built once, split over both.
    assert cached_rows(tmp / "n0") == cached_rows(tmp / "n1") == cached_rows(tmp_path / "shared") > 0
    # (each node's folder holds rows only that node wrote: both encoded). The job's lines once, by rank 0.
    text = "\n".join(logs)   # the rendezvous decides which agent is node 0
    assert text.count("is node-local: each of the 2 nodes builds its own copy over its 1 ranks") == 1
    assert len(re.findall(r"latent cache: \d+ images \([1-9]\d* encoded now by rank 0 of 2, node 0\)", text)) == 2
    assert text.count("data scan (train):") == 1 and "by rank 1 of 2" not in text


def test_sigkill_of_both_nodes_then_resume_on_two_nodes_is_bit_identical(two_nodes, tiny_model, imagefolder_data,
                                                                         tmp_path):
    args = job_args(tiny_model, imagefolder_data, tmp_path, 2, 1, [tmp_path / "n0", tmp_path / "n1"])
    run = tmp_path / "outputs" / "train" / "torchrun-killed"
    procs = torchrun(2, 1, args, tmp_path, "killed")
    wait_for(run / "checkpoints" / "step=4.ckpt", procs[0])
    kill_nodes(procs)   # both nodes die at once: agents and workers
    assert not (run / ADAPTER).exists()
    finish(torchrun(2, 1, [[*a, f"hydra.run.dir={run}", "ckpt_path=last"] for a in args], tmp_path, "resumed"))
    assert same_tensors(run / ADAPTER, two_nodes[0] / "outputs" / "train" / "torchrun-two-nodes" / ADAPTER)


def test_a_worker_killed_under_max_restarts_restarts_the_group_and_ends_identical(two_nodes, tiny_model,
                                                                                imagefolder_data, tmp_path):
    """The job's task comes from an experiment (no task= argument): the restarted group finds its run
    from the composed config (outputs/train/..., not the default task's folder)."""
    caches = [tmp_path / "n0", tmp_path / "n1"]
    args = [experiment_args(a) for a in job_args(tiny_model, imagefolder_data, tmp_path, 2, 1, caches)]
    run = tmp_path / "outputs" / "train" / "torchrun-elastic"
    procs = torchrun(2, 1, args, tmp_path, "elastic", extra=("--max-restarts=1",))
    wait_for(run / "checkpoints" / "step=4.ckpt", procs[1])
    workers = children(procs[1].pid)
    assert len(workers) == 1, workers
    os.kill(workers[0], signal.SIGKILL)   # node 1's worker dies; its agent restarts the whole group
    logs = finish(procs)
    assert "job torchrun-elastic started again: continuing its run from the last checkpoint" in "\n".join(logs)
    assert same_tensors(run / ADAPTER, two_nodes[0] / "outputs" / "train" / "torchrun-two-nodes" / ADAPTER)
    attempts = [json.loads(line) for line in (run / "run_history.jsonl").read_text().splitlines() if line]
    assert [(a["event"], a["ckpt_path"], a["job"]) for a in attempts] == [
        ("start", None, "torchrun-elastic"), ("resume", "last", "torchrun-elastic")]


def experiment_args(args: list[str]) -> list[str]:
    """``args`` with the task set by the test experiment ``train_job`` instead of ``task=train``."""
    return [f"hydra.searchpath=[file://{ROOT / 'tests' / 'conf'}]", "experiment=train_job",
            *(a for a in args if a != "task=train")]


def children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:   # already gone
        return []


def kill_nodes(procs: list[subprocess.Popen]) -> None:
    """SIGKILL each agent and every process under it (torchrun starts each worker in its own session,
    so the agent's process group does not hold them), as a node that loses power."""
    tree = [p.pid for p in procs]
    for pid in tree:
        tree.extend(children(pid))
    for pid in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for p in procs:
        p.wait()
    end = time.time() + 30
    while any(Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text()
              for pid in tree[len(procs):]):
        assert time.time() < end, "workers still alive 30 s after SIGKILL"
        time.sleep(0.05)


def test_a_job_size_mismatch_is_refused_before_training(tiny_model, imagefolder_data, tmp_path):
    base = [a for a in tiny_overrides(tiny_model, imagefolder_data, tmp_path) if not a.startswith("hydra.run.dir")]
    procs = torchrun(1, 2, [*base, "trainer=ddp", "trainer.devices=2", "trainer.num_nodes=2",
                            "trainer.accelerator=cpu"], tmp_path, "mismatch")
    logs = logs_of(procs, 300)
    assert procs[0].returncode != 0
    assert "trainer.devices=2 × trainer.num_nodes=2 ≠ WORLD_SIZE=2" in logs[0]


def test_a_run_dir_the_nodes_do_not_share_is_refused(tiny_model, imagefolder_data, tmp_path):
    """Each "node" given its own folder (what node-local run dirs look like): refused before any work."""
    base = [a for a in tiny_overrides(tiny_model, imagefolder_data, tmp_path) if not a.startswith("hydra.run.dir")]
    common = [*base, "trainer=ddp", "trainer.devices=1", "trainer.num_nodes=2", "trainer.accelerator=cpu"]
    procs = torchrun(2, 1, [[*common, f"hydra.run.dir={tmp_path / f'node{i}'}"] for i in range(2)], tmp_path, "apart")
    logs = logs_of(procs, 300)
    assert all(p.returncode != 0 for p in procs)
    assert all("is not shared between the nodes" in log for log in logs), logs[0][-2000:]
    assert not list(tmp_path.glob("node*/checkpoints/*.ckpt")) and not list(tmp_path.glob("node*/adapter"))


@pytest.fixture(scope="module")
def eval_data(tmp_path_factory) -> Path:
    return generate(tmp_path_factory.mktemp("evaldata"), n=8, seed=5, striped=True, size=32)


def eval_job(tiny_model, tiny_clip, eval_data, tmp_path) -> list[str]:
    """12 images in 6 shards of 2 (3 per node), references cached per test."""
    base = [a for a in eval_overrides(tiny_model, tiny_clip, eval_data, tmp_path / "refcache", tmp_path)
            if not a.startswith("hydra.run.dir")]
    return [*base, "eval.num_images=12", "eval.batch_size=2", "eval.shard_size=2", "eval.steps=4"]


def test_two_node_eval_equals_one_process_and_resumes_from_finished_shards(tiny_model, tiny_clip, eval_data,
                                                                           tmp_path):
    args = eval_job(tiny_model, tiny_clip, eval_data, tmp_path)
    single = tmp_path / "single"
    res = run_entry([*args, f"hydra.run.dir={single}"], env={"OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    one = read_rows(single / "results.jsonl")[0]

    run = tmp_path / "outputs" / "eval" / "torchrun-eval"
    procs = torchrun(2, 1, args, tmp_path, "eval")
    shards = run / "eval_shards"
    end = time.time() + 300
    while not list(shards.glob("*/*.npz")):
        assert all(p.poll() is None for p in procs) and time.time() < end, logs_of(procs, 1)
        time.sleep(0.02)
    kill_nodes(procs)   # both nodes die with the first shard written
    assert not (run / "results.jsonl").exists()
    done_before = {f.name for f in shards.glob("*/*.npz")}
    assert 1 <= len(done_before) < 6

    logs = finish(torchrun(2, 1, args, tmp_path, "eval"))   # the same job again: the finished shards are kept
    assert re.search(rf"{len(done_before)} of 6 shards from an earlier attempt .* {12 - 2 * len(done_before)} images "
                     "generated now", "\n".join(logs)), logs[0][-2000:]
    two = read_rows(run / "results.jsonl")
    assert len(two) == 1 and two[0]["protocol"]["world_size"] == 2 and two[0]["protocol"]["shards"]["reused"] > 0
    assert two[0]["key"] == one["key"]
    a, b = (np.load(r / "per_image.npz") for r in (single, run))
    assert np.array_equal(a["seeds"], b["seeds"])
    np.testing.assert_allclose(b["features"], a["features"], rtol=1e-10, atol=0)   # the statistics' inputs
    np.testing.assert_allclose(b["clip"], a["clip"], rtol=1e-10)
    for k in ("fid", "kid", "clip_score", "fid_ci_low", "fid_ci_high"):
        assert two[0]["metrics"][k] == pytest.approx(one["metrics"][k], rel=1e-6), k
    assert not shards.exists() or not list(shards.glob("*/*.npz"))   # cleaned once the row is written
