"""One notion of rank and world under every launcher (run.world), resume through the command a
Lightning-launched DDP run prints, the local launcher's devices per cell, the job's signal owner,
and jobs sharing a cache folder. SLURM itself: tests/test_slurm.py; torchrun: tests/test_multinode.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import ROOT, cluster_job_args, run_entry
from tests.test_fault_tolerance import ADAPTER, same_tensors, start
from tests.test_multinode import launched
from toolkit.data.encoded_cache import ArrayStore, fill
from toolkit.run import signals
from toolkit.run.cells import device_slots
from toolkit.run.world import LaunchError, adopt_srun_layout, job_world

SRUN = {"SLURM_NTASKS": "4", "SLURM_JOB_ID": "9", "SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_NODEID": "1",
        "SLURM_NTASKS_PER_NODE": "2", "SLURM_NNODES": "2", "SLURM_STEP_ID": "0", "SLURM_JOB_NAME": "train"}
TORCHRUN = {"TORCHELASTIC_RUN_ID": "j", "RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
            "GROUP_RANK": "1"}
LIGHTNING_CHILD = {"LOCAL_RANK": "1", "NODE_RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                   "MASTER_PORT": "1"}


@pytest.mark.parametrize("env", [SRUN, TORCHRUN, LIGHTNING_CHILD, {}], ids=["srun", "torchrun", "lightning", "alone"])
def test_the_world_is_lightnings_cluster_environment(env, monkeypatch):
    """run.world reads, without importing Lightning, what Lightning's cluster environment reads."""
    from lightning.fabric.plugins.environments import LightningEnvironment

    from toolkit.run.world import cluster_environment

    launched(monkeypatch, env)
    w, lit = job_world(), cluster_environment()
    assert (w.local_rank, w.node_rank) == (lit.local_rank(), lit.node_rank())
    if isinstance(lit, LightningEnvironment):   # its launcher gives its ranks the size and their place
        assert (w.rank, w.size) == ((lit.local_rank(), int(env["WORLD_SIZE"])) if env else (0, 1))
    else:
        assert (w.rank, w.size) == (lit.global_rank(), lit.world_size())
    assert w.launcher == {"SLURM_NTASKS": "slurm", "TORCHELASTIC_RUN_ID": "torchrun",
                          "LOCAL_RANK": "lightning"}.get(next(iter(env), ""))
    if env is SRUN:
        assert lit.auto_requeue is False   # the toolkit owns the signals (run.signals)


def test_srun_task_layouts_are_adopted_or_refused_before_any_work(monkeypatch):
    srun_n = {**SRUN, "SLURM_NTASKS": "2", "SLURM_PROCID": "1", "SLURM_LOCALID": "1", "SLURM_NODEID": "0",
              "SLURM_NNODES": "1", "SLURM_TASKS_PER_NODE": "2"}
    del srun_n["SLURM_NTASKS_PER_NODE"]
    launched(monkeypatch, srun_n)   # srun -n 2: no SLURM_NTASKS_PER_NODE, which Lightning requires
    monkeypatch.delenv("SLURM_TASKS_PER_NODE", raising=False)
    monkeypatch.setenv("SLURM_TASKS_PER_NODE", "2")
    adopt_srun_layout()
    assert os.environ["SLURM_NTASKS_PER_NODE"] == "2" and job_world().local_size == 2
    monkeypatch.delenv("SLURM_NTASKS_PER_NODE")
    monkeypatch.setenv("SLURM_NTASKS", "3")
    monkeypatch.setenv("SLURM_TASKS_PER_NODE", "2,1")   # srun -n 3 on 2 nodes
    with pytest.raises(LaunchError, match="unevenly.*2,1.*--ntasks-per-node"):
        adopt_srun_layout()
    monkeypatch.setenv("SLURM_TASKS_PER_NODE", "2(x2)")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    adopt_srun_layout()
    assert os.environ["SLURM_NTASKS_PER_NODE"] == "2"
    monkeypatch.delenv("SLURM_STEP_ID")   # the batch script itself, not a task srun started
    with pytest.raises(LaunchError, match="not under srun.*srun python run.py"):
        adopt_srun_layout()


def test_requeues_stop_at_max_requeues_and_only_the_time_limit_warning_requeues(monkeypatch):
    calls = []
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: calls.append(cmd) or subprocess.CompletedProcess(cmd, 0))
    launched(monkeypatch, {**SRUN, "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0"})
    signals.install(max_requeues=2)
    try:
        monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
        assert signals.requeue(signals.Stop("SIGUSR1")) == "requeued job 9 (2 of at most 2 requeues: max_requeues)"
        assert calls == [["scontrol", "requeue", "9"]]
        monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
        assert signals.requeue(signals.Stop("SIGUSR2")) == (
            "job 9 not requeued: it was requeued 2 times already (max_requeues=2); submit it again, or raise "
            "max_requeues")
        assert signals.requeue(signals.Stop("SIGTERM")) == ""   # preemption / scancel: SLURM decides
        launched(monkeypatch, SRUN)                             # rank 3: rank 0 requeues
        assert signals.requeue(signals.Stop("SIGUSR1")) == "" and len(calls) == 1
        # a task of an array job (a submitit sweep): its own id may be the array's, which names every task
        launched(monkeypatch, {**SRUN, "SLURM_PROCID": "0", "SLURM_JOB_ID": "7", "SLURM_ARRAY_JOB_ID": "7",
                               "SLURM_ARRAY_TASK_ID": "2"})
        monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
        assert signals.requeue(signals.Stop("SIGUSR2")).startswith("requeued job 7_2 ")
        assert calls[-1] == ["scontrol", "requeue", "7_2"]
    finally:
        signals.install(max_requeues=signals.DEFAULT_MAX_REQUEUES)


def test_resuming_a_lightning_launched_ddp_run_through_the_printed_command(lightning_ddp, tiny_model,
                                                                          imagefolder_data, tmp_path):
    """trainer=ddp trainer.devices=2 (Lightning's own launcher), SIGTERM mid-epoch with no checkpoint
    before it: a checkpoint at step 4 on both ranks, exit 143; the printed resume command (its
    rank 1, which Lightning starts again with the parent's command line, used to refuse its own
    repeated overrides) ends with the adapter of the uninterrupted run, bit for bit."""
    run, log, marker = tmp_path / "run", tmp_path / "log.txt", tmp_path / "signalled"
    args = ["task=train", *cluster_job_args(tiny_model, imagefolder_data), "trainer=ddp", "trainer.devices=2",
            f"hydra.run.dir={run}", f"paths.cache_dir={tmp_path / 'cache'}",
            "+callbacks.sig._target_=tests.helpers.SignalAt", "+callbacks.sig.step=3", "+callbacks.sig.signal=SIGTERM",
            f"+callbacks.sig.marker={marker}"]
    env = {"OMP_NUM_THREADS": "1"}
    proc = start(args, log, env=env)
    assert proc.wait(timeout=900) == 143, log.read_text()[-4000:]
    text = log.read_text()
    assert "stopped by SIGTERM at step 4" in text or "stopped by a signal on another rank at step 4" in text, text
    printed = text.split("Resume with:\n")[1].splitlines()[0].strip()
    assert printed == f"python run.py hydra.run.dir={run} ckpt_path=last"
    sh_env = {**os.environ, **env, "PYTHONPATH": str(ROOT),
              "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    res = subprocess.run(printed, shell=True, cwd=ROOT, env=sh_env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-4000:]
    assert same_tensors(run / ADAPTER, lightning_ddp)


def cells(sweep: Path) -> list[dict]:
    return sorted((json.loads(p.read_text()) for p in sweep.glob("*/cell_env.json")), key=lambda c: c["start"])


def test_local_launcher_gives_each_running_cell_its_own_devices(tmp_path):
    """hydra/launcher=local with one GPU per cell and two GPUs to share (named: no GPU is needed to
    see what each cell's environment receives): two cells at a time, on different devices, the
    third when one is free; CPU cells see no GPU (slots without devices); a cell asking for GPUs
    where none is visible, or for several tasks, is refused before any cell starts."""
    base = ["-m", "hydra/launcher=local", "+task_module=tests.cell_env", "logger=none"]
    gpu = tmp_path / "gpu"
    res = run_entry([*base, f"hydra.sweep.dir={gpu}", "hydra.launcher.gpus_per_node=1",
                     "hydra.launcher.visible_gpus=[0,1]", "+hold_s=5", "seed=0,1,2"], timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    seen = cells(gpu)
    assert len(seen) == 3 and {c["cuda_visible_devices"] for c in seen} == {"0", "1"}
    first, second, third = seen
    assert first["cuda_visible_devices"] != second["cuda_visible_devices"] and second["start"] < first["end"]
    assert third["start"] >= min(first["end"], second["end"]) - 0.5   # waited for a free device
    assert device_slots(0, ["0", "1"], 3) == [[], [], []]   # CPU cells: no GPU, 3 at once
    assert device_slots(2, ["4", "GPU-ab", "6", "7", "8"], 1) == [["4", "GPU-ab"], ["6", "7"]]
    for extra, message in ((["hydra.launcher.gpus_per_node=1", "hydra.launcher.visible_gpus=[]"],
                            "hydra.launcher.gpus_per_node=1, but this machine shows no GPU"),
                           (["hydra.launcher.tasks_per_node=2"], "hydra.launcher.tasks_per_node=2: hydra/launcher=")):
        res = run_entry([*base, f"hydra.sweep.dir={tmp_path / 'refused'}", *extra, "seed=0,1"], timeout=300)
        assert res.returncode != 0 and message in res.stderr, res.stderr[-3000:]
    assert not list((tmp_path / "refused").glob("*/cell_env.json"))


def test_ranks_split_one_to_do_list_while_another_job_fills_the_same_cache(tmp_path):
    """Two ranks (threads) fill a store while another job's rows land between their reads of it:
    the list rank 0 read is the one both split (``agree``), so no item is left to nobody."""
    keys, done = [str(i) for i in range(12)], []
    enc = lambda xs: (done.extend(xs), np.stack([np.full(2, x, np.float32) for x in xs]))[1]
    stores = [ArrayStore(tmp_path) for _ in range(2)]
    other = ArrayStore(tmp_path)
    barrier, lists = threading.Barrier(2), [None]

    def refresh_late(store=stores[1], original=stores[1].refresh):
        other.write(keys[:6], np.zeros((6, 2), np.float32))   # the other job writes between the two reads
        original()

    stores[1].refresh = refresh_late

    def agree(todo):   # a broadcast from rank 0
        if threading.current_thread().name.endswith("_0"):
            lists[0] = todo
        barrier.wait()
        return lists[0]

    with ThreadPoolExecutor(2, thread_name_prefix="rank") as pool:
        list(pool.map(lambda r: fill(stores[r], keys, list(range(12)), enc, 2, rank=r, world_size=2,
                                     barrier=barrier.wait, agree=agree), (0, 1)))
    assert sorted(done) == list(range(12)) and all(len(s) == 12 for s in stores)


@pytest.mark.slow
def test_two_jobs_fill_one_cache_at_once(tiny_model, imagefolder_data, tmp_path):
    """Two 2-process jobs (Lightning's launcher) start together on one cache folder, with prior
    preservation: both finish, the cache and the class images complete (no "items still missing")."""
    cache = tmp_path / "cache"
    base = ["task=train", *cluster_job_args(tiny_model, imagefolder_data), "trainer=ddp", "trainer.devices=2",
            "trainer.max_steps=2", f"paths.cache_dir={cache}", "callbacks.prior.class_prompt=a photo of a shape",
            "callbacks.prior.num_images=8", "callbacks.prior.steps=2", "callbacks.prior.batch_size=2"]
    procs = [start([*base, f"hydra.run.dir={tmp_path / f'job{i}'}"], tmp_path / f"job{i}.log",
                   env={"OMP_NUM_THREADS": "1"}) for i in range(2)]
    for i, p in enumerate(procs):
        assert p.wait(timeout=900) == 0, (tmp_path / f"job{i}.log").read_text()[-3000:]
    for i in range(2):
        assert (tmp_path / f"job{i}" / ADAPTER).is_file()
    assert len(list(cache.glob("class_images/*/0000*.png"))) == 8


@pytest.mark.slow
def test_a_ddp_cell_of_the_local_launcher_trains_what_lightnings_two_processes_train(lightning_ddp, tiny_model,
                                                                                   imagefolder_data, tmp_path):
    """A ``trainer=ddp trainer.devices=2`` cell of ``hydra/launcher=local``: Lightning's launcher
    starts the cell's second rank with the toolkit's entry (not submitit's module, which the cell's
    process runs as), and the cell trains the uninterrupted 2-process adapter, bit for bit."""
    sweep = tmp_path / "sweep"
    res = run_entry(["-m", "hydra/launcher=local", f"hydra.sweep.dir={sweep}", "task=train",
                     *cluster_job_args(tiny_model, imagefolder_data), "trainer=ddp", "trainer.devices=2",
                     f"paths.cache_dir={tmp_path / 'cache'}", "seed=0"], timeout=1500, env={"OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-4000:]
    assert same_tensors(sweep / "0" / ADAPTER, lightning_ddp)


def test_a_resume_repeating_the_runs_own_deletions_composes_once():
    """A requeued job, a restarted torchrun group or the rank Lightning's launcher starts repeat the
    run's overrides, deletions (~key) included: each setting is applied once (a second ~key made Hydra
    refuse: 'Could not delete from config'), and a deletion stays part of what the resume compares."""
    from toolkit.run.resume import _compose, _plain, merge_overrides

    saved = ["task=train", "trainer.max_steps=4", "~callbacks.sample_grid", "+callbacks.keys.dirpath=x"]
    again = merge_overrides(saved, [*saved, "hydra.run.dir=r", "ckpt_path=last", "trainer.max_steps=8"])
    assert again == ["task=train", "trainer.max_steps=8", "~callbacks.sample_grid", "+callbacks.keys.dirpath=x",
                     "hydra.run.dir=r", "ckpt_path=last"]
    assert "~callbacks.sample_grid" in _plain(again)
    cfg = _compose([a for a in _plain(again) if not a.startswith("+callbacks.keys")])
    assert "sample_grid" not in cfg.callbacks and cfg.trainer.max_steps == 8
