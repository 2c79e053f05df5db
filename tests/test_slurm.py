"""The cluster paths through a real SLURM scheduler (the session fixture ``slurm``: a one-host cluster,
tests/slurm.py): the shipped sbatch script stopped by the signal before its time limit and requeued
by itself, one evaluation over srun's tasks resumed from its shards after a signal, srun's ways of
asking for tasks, ``hydra/launcher=slurm`` sweeps, and a job that outlives its time limit unattended.

One host is one node: every job here has one node and 2 tasks of one CPU (no GPUs); the two-node
paths are tested with two torchrun agents (tests/test_multinode.py).
"""

from __future__ import annotations

import json
import re
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import ROOT, cluster_job_args, run_entry
from tests.test_fault_tolerance import ADAPTER, same_tensors
from tests.test_multinode import eval_job
from toolkit.results import read_rows
from toolkit.run.history import history

SBATCH = ROOT / "examples" / "slurm" / "train.sbatch"
# The shipped script's sizes, for this host: 1 node x 2 tasks of one CPU, no GPU (all else as shipped)
SIZES = ("--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1", "--time=15")


def job_env(tmp_path: Path) -> dict[str, str]:
    return {"PYTHONPATH": str(ROOT), "TOOLKIT_CACHE": str(tmp_path / "cache")}


def signal_at(step: int, signal: str, marker: Path) -> list[str]:
    """A test callback: rank 0 has SLURM send ``signal`` to the job's tasks at ``step`` (once)."""
    return ["+callbacks.limit._target_=tests.helpers.ScancelAt", f"+callbacks.limit.step={step}",
            f"+callbacks.limit.signal={signal}", f"+callbacks.limit.marker={marker}"]


def test_the_shipped_sbatch_script_warned_of_its_limit_requeues_itself_and_ends_identical(
        slurm, lightning_ddp, tiny_model, imagefolder_data, tmp_path):
    """``sbatch examples/slurm/train.sbatch`` with only the sizes changed, sent USR1 mid-epoch (what
    ``--signal=USR1@120`` sends before the limit): a checkpoint at step 4 on both tasks, the job
    requeues itself, and the requeued job (same id) continues the run to the adapter of Lightning's
    own uninterrupted 2-process run, bit for bit. Before issue 44 all its tensors differed: the stop
    let ModelCheckpoint write last.ckpt over the signal's with the epoch marked complete."""
    args = [*cluster_job_args(tiny_model, imagefolder_data), *signal_at(3, "USR1", tmp_path / "signalled")]
    job = slurm.sbatch(SBATCH, *args, options=SIZES, cwd=tmp_path, env=job_env(tmp_path))
    info = slurm.wait(job, timeout=900)
    log = (tmp_path / f"slurm-{job}.out").read_text()   # --open-mode=append: both attempts
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", log[-5000:]
    run = tmp_path / "outputs" / "train" / f"slurm-{job}"     # relative to where it was submitted
    assert same_tensors(run / ADAPTER, lightning_ddp)
    assert re.search(rf"stopped by SIGUSR1 at step 4; checkpoint {run}/checkpoints/last.ckpt", log), log[-5000:]
    assert f"requeued job {job} (1 of at most 3 requeues: max_requeues)" in log
    assert f"job slurm-{job} started again: continuing its run from the last checkpoint" in log
    assert f"starting from checkpoint {run}/checkpoints/last.ckpt" in log
    # the job's lines once per attempt, not once per task (two attempts)
    assert log.count("data scan (train):") == 2 and log.count(f"run dir {run} ") == 2, log[-5000:]
    assert [(h["event"], h["job"]) for h in history(run)] == [("start", f"slurm-{job}"), ("resume", f"slurm-{job}")]


def test_one_srun_evaluation_over_two_tasks_resumes_from_its_shards_after_a_signal(slurm, tiny_model, tiny_clip,
                                                                                  tmp_path):
    """``srun -N 1 --ntasks-per-node=2 python run.py task=eval ...`` in a batch job: one evaluation
    over both tasks (SLURM sets no WORLD_SIZE: the ranks come from run.world), stopped by USR1 once
    its first shard is written, requeued by itself, continued from the finished shards: one row,
    world_size 2, equal to the one-process row."""
    from miniature.world import generate

    data = generate(tmp_path / "evaldata", n=8, seed=5, striped=True, size=32)
    args = [a for a in eval_job(tiny_model, tiny_clip, data, tmp_path) if not a.startswith("hydra.run.dir")]
    args += ["eval.num_images=16", "eval.steps=8"]   # 8 shards of 2: the signal comes with most to do
    single = tmp_path / "single"
    res = run_entry([*args, f"hydra.run.dir={single}"], env={"OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    one = read_rows(single / "results.jsonl")[0]

    script = tmp_path / "eval.sbatch"
    script.write_text("#!/bin/bash\n#SBATCH --signal=USR1@120 --requeue --open-mode=append\n"
                      "export OMP_NUM_THREADS=$SLURM_CPUS_PER_TASK\n"
                      f"srun -N 1 --ntasks-per-node=2 {sys.executable} {ROOT / 'run.py'} {shlex.join(args)}\n")
    job = slurm.sbatch(script, options=("--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", "--time=15"),
                       cwd=tmp_path, env=job_env(tmp_path))
    run = tmp_path / "outputs" / "eval" / f"slurm-{job}"
    end = time.time() + 600
    while not list(run.glob("eval_shards/*/*.npz")):
        assert time.time() < end and slurm.job(job)["JobState"] in ("PENDING", "RUNNING"), slurm.job(job)
        time.sleep(0.02)
    slurm.run("scancel", "--signal=USR1", job)
    info = slurm.wait(job, timeout=900)
    log = (tmp_path / f"slurm-{job}.out").read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", log[-5000:]
    assert re.search(rf"stopped by SIGUSR1; requeued job {job} \(1 of at most 3", log), log[-5000:]
    two = read_rows(run / "results.jsonl")
    assert len(two) == 1 and two[0]["protocol"]["world_size"] == 2 and two[0]["protocol"]["shards"]["reused"] > 0
    assert re.search(r"\d+ of 8 shards from an earlier attempt", log)
    assert two[0]["key"] == one["key"]
    a, b = (np.load(r / "per_image.npz") for r in (single, run))
    np.testing.assert_allclose(b["features"], a["features"], rtol=1e-10, atol=0)
    for k in ("fid", "kid", "clip_score", "fid_ci_low", "fid_ci_high"):
        assert two[0]["metrics"][k] == pytest.approx(one["metrics"][k], rel=1e-6), k
    assert log.count(f"eval {one['key']}: {{") == 1   # the row's line once (rank 0), not per task
    assert log.count("All distributed processes registered") == 2   # once per attempt


def test_srun_n_is_read_as_tasks_per_node_and_a_batch_script_without_srun_is_refused(slurm, tmp_path):
    """``srun -n 2`` sets no SLURM_NTASKS_PER_NODE (Lightning refuses that deep inside the Trainer):
    the even layout is taken as ``--ntasks-per-node``. A multi-task job's script running python
    without srun: refused before any work."""
    code = ("import json, os; from toolkit.run.world import adopt_srun_layout, job_world; adopt_srun_layout(); "
            "w = job_world(); print(json.dumps([w.rank, w.size, w.local_rank, w.local_size, w.launcher, "
            "os.environ['SLURM_NTASKS_PER_NODE']]))")   # (run.world = Lightning's environment: test_launchers.py)
    res = slurm.run("srun", "-n", "2", "--cpus-per-task=1", sys.executable, "-c", code, cwd=tmp_path,
                    env=job_env(tmp_path), timeout=300)
    seen = sorted(json.loads(line) for line in res.stdout.splitlines())
    assert seen == [[0, 2, 0, 2, "slurm", "2"], [1, 2, 1, 2, "slurm", "2"]], res.stdout + res.stderr
    job = slurm.sbatch(None, options=("--ntasks-per-node=2", "--cpus-per-task=1", "--wrap",
                                              f"{sys.executable} {ROOT / 'run.py'} task=eval"),
                       cwd=tmp_path, env=job_env(tmp_path))
    slurm.wait(job, timeout=300)
    out = (tmp_path / f"slurm-{job}.out").read_text()
    assert "config error: this runs in the batch script of a SLURM job with 2 tasks, but not under srun" in out


def documented_command(config: Path) -> list[str]:
    """The sweep command a launcher config's comments show (``#   python run.py ...``), its arguments."""
    line = next(line for line in config.read_text().splitlines() if line.startswith("#   python run.py"))
    return shlex.split(line[1:])[2:]


def jobs(slurm) -> dict[str, dict[str, str]]:
    """Every job the cluster knows, by array task id (a sweep's cells) or job id."""
    out = {}
    for line in slurm.run("scontrol", "-o", "show", "jobs", check=False).stdout.splitlines():
        info = dict(p.partition("=")[::2] for p in line.split())
        out[info.get("ArrayTaskId") or info.get("JobId", "?")] = info
    return out


@pytest.mark.slow
def test_a_launcher_sweep_of_eval_train_and_finetune_eval_cells_requeues_and_reruns(
        slurm, lightning_ddp, tiny_model, tiny_clip, imagefolder_data, tmp_path):
    """``conf/hydra/launcher/slurm.yaml``'s command, with this host's sizes (2 tasks of one CPU) and
    one cell of each task: the eval cell is one evaluation over its 2 tasks; the finetune_eval cell,
    sent submitit's USR2 mid-training, checkpoints, requeues itself and continues (its evaluation
    finds the eval cell's base row); the train cell is killed outright (SIGKILL, as at a limit
    without warning). The same command again resumes the train cell and computes nothing else.
    Without accounting (sacct) submitit cannot see the killed cell fail, so the first sweep
    command is stopped by the test once every job has ended; a cluster with sacct ends it."""
    from miniature.world import generate

    evaldata = generate(tmp_path / "evaldata", n=8, seed=5, striped=True, size=32)
    sweep = tmp_path / "sweep"
    sized = {"hydra.launcher.partition=gpu": "hydra.launcher.partition=test", "trainer.devices=8": "trainer.devices=2",
             "module.lora.r=8,16,32": "task=eval,finetune_eval,train"}
    args = [*(sized.get(a, a) for a in documented_command(ROOT / "conf" / "hydra" / "launcher" / "slurm.yaml")),
            "hydra.launcher.gpus_per_node=0", "hydra.launcher.tasks_per_node=2", "hydra.launcher.cpus_per_task=1",
            "hydra.launcher.timeout_min=15", f"hydra.sweep.dir={sweep}",
            *cluster_job_args(tiny_model, imagefolder_data), "callbacks.model_checkpoint.every_n_train_steps=2",
            # the evaluation settings, added where a task has none (train): ++
            *(f"++{a}" for a in (f"metrics.clip_model={tiny_clip}", f"eval.dataset={evaldata}",
                                  f"metrics.cache_dir={tmp_path / 'ref'}", "eval.num_images=6", "eval.steps=2",
                                  "eval.batch_size=2", "metrics.interval_groups=6", "eval.num_ref=null",
                                  "fabric.accelerator=cpu", "eval.save_images=false")),
            *signal_at(3, "{train: KILL, finetune_eval: USR2}", Path("${paths.output_dir}/signalled")),
            "+callbacks.limit.task=${task_name}"]
    env = {**job_env(tmp_path), "SLURM_CONF": str(slurm.conf)}
    log = open(tmp_path / "sweep.log", "w")   # noqa: SIM115 - the child holds it
    first = __import__("subprocess").Popen([sys.executable, str(ROOT / "run.py"), *args], cwd=tmp_path,
                                           env={**slurm.env, **env}, stdout=log, stderr=log)
    end = time.time() + 1500
    while not ((sweep / "2" / "signalled").exists() and len(jobs(slurm)) == 3 and all(
            j["JobState"] in ("COMPLETED", "FAILED", "CANCELLED") for j in jobs(slurm).values())):
        assert time.time() < end and first.poll() is None, (tmp_path / "sweep.log").read_text()[-4000:]
        time.sleep(1)
    first.kill()
    first.wait()
    cells = jobs(slurm)
    assert [cells[i]["JobState"] for i in "012"] == ["COMPLETED", "COMPLETED", "FAILED"], cells
    assert cells["1"]["Restarts"] == "1"   # finetune_eval: USR2, checkpoint, requeued by itself
    assert same_tensors(sweep / "1" / ADAPTER, lightning_ddp)
    rows = read_rows(sweep / "results.jsonl")
    assert len(rows) == 2 and sorted(bool(r.get("train")) for r in rows) == [False, True]   # base once, fine-tuned
    assert all(r["protocol"]["world_size"] == 2 for r in rows)
    assert not (sweep / "2" / ADAPTER).exists() and (sweep / "2" / "checkpoints" / "last.ckpt").is_file()

    again = run_entry(args, timeout=1500, env=env)   # the same command: only the killed cell has work left
    assert again.returncode == 0, again.stderr[-4000:]
    assert same_tensors(sweep / "2" / ADAPTER, lightning_ddp)
    assert read_rows(sweep / "results.jsonl") == rows
    assert [h["event"] for h in history(sweep / "2")] == ["start", "rerun", "resume"]
    cell_logs = "\n".join(p.read_text() for p in sweep.glob(".submitit/*/*_log.*"))
    assert re.search(r"requeued job [\d_]+ \(1 of at most 3 requeues: max_requeues\)", cell_logs)
    assert "already in" in cell_logs


@pytest.mark.slow
def test_a_job_shorter_than_its_training_survives_its_limits_unattended(slurm, lightning_ddp, tiny_model,
                                                                         imagefolder_data, tmp_path):
    """``--time=3 --signal=USR1@60`` for a training of ~4 minutes (slowed by a test callback that
    waits after each step; waiting changes no number), submitted once and never touched: before
    each limit the job checkpoints and requeues itself, the requeued job continues, and it ends
    with Lightning's uninterrupted adapter, bit for bit. The task comes from an experiment (no
    task= argument): each requeue finds its run from the composed config."""
    from tests.test_multinode import experiment_args

    args = [*experiment_args(cluster_job_args(tiny_model, imagefolder_data)), "trainer=ddp", "trainer.devices=2",
            "+callbacks.slow._target_=tests.helpers.SlowSteps", "+callbacks.slow.seconds=30", "max_requeues=6"]
    script = tmp_path / "long.sbatch"
    script.write_text("#!/bin/bash\n#SBATCH --time=3 --signal=USR1@60 --requeue --open-mode=append\n"
                      "export OMP_NUM_THREADS=$SLURM_CPUS_PER_TASK\n"
                      f"srun {sys.executable} {ROOT / 'run.py'} {shlex.join(args)}\n")
    job = slurm.sbatch(script, options=("--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1"), cwd=tmp_path,
                       env=job_env(tmp_path))
    info = slurm.wait(job, timeout=3000, release=False)   # unattended: not even SLURM's requeue hold is cut
    log = (tmp_path / f"slurm-{job}.out").read_text()
    assert info["JobState"] == "COMPLETED" and int(info["Restarts"]) >= 2, log[-5000:]
    run = tmp_path / "outputs" / "train" / f"slurm-{job}"
    assert same_tensors(run / ADAPTER, lightning_ddp)
    for k in range(1, int(info["Restarts"]) + 1):
        assert f"requeued job {job} ({k} of at most 6 requeues: max_requeues)" in log
    assert log.count("stopped by SIGUSR1") == int(info["Restarts"])   # (a warning during the last step: done)


# Each command of docs/distributed.md's "On a cluster" and of the launcher configs' comments, and the
# test that runs it here (with this host's sizes: 1 node, 2 tasks or cells, no GPU).
RUN_BY = {
    r"^torchrun --nnodes 2 .*--max-restarts 1 run\.py task=train":
        "tests/test_multinode.py::test_a_worker_killed_under_max_restarts_restarts_the_group_and_ends_identical",
    r"^sbatch examples/slurm/train\.sbatch ":
        "tests/test_slurm.py::test_the_shipped_sbatch_script_warned_of_its_limit_requeues_itself_and_ends_identical",
    r"^srun -N 1 --ntasks-per-node=\d+ python run\.py task=eval ":
        "tests/test_slurm.py::test_one_srun_evaluation_over_two_tasks_resumes_from_its_shards_after_a_signal",
    r"^python run\.py -m hydra/launcher=slurm ":
        "tests/test_slurm.py::test_a_launcher_sweep_of_eval_train_and_finetune_eval_cells_requeues_and_reruns",
    r"^python run\.py -m hydra/launcher=local hydra\.launcher\.gpus_per_node=1 ":
        "tests/test_launchers.py::test_local_launcher_gives_each_running_cell_its_own_devices",
}


def cluster_commands() -> list[str]:
    """The commands of the "On a cluster" section's shell blocks and of the launcher configs' comments."""
    from tests.docs import join_continuations, shell_blocks

    text = (ROOT / "docs" / "distributed.md").read_text()
    section = text[text.index("## On a cluster"):]
    section = section[:section.index("\n## ", 4)] if "\n## " in section[4:] else section
    out = [line.strip() for block in shell_blocks(section) for _, line in join_continuations(block)
           if line.strip() and not line.strip().startswith(("#", "export "))]
    out += [re.sub(r"^\S*sbatch ", "sbatch ", m) for m in re.findall(r"`(sbatch examples/slurm/[^`]+)`", section)]
    for config in sorted((ROOT / "conf" / "hydra" / "launcher").glob("*.yaml")):
        out += [line[1:].strip() for line in config.read_text().splitlines() if line.startswith("#   python run.py")]
    return out


def test_every_cluster_command_is_run_by_a_test_and_the_shown_script_is_the_shipped_one():
    import importlib

    commands = cluster_commands()
    assert len(commands) >= 6, commands
    for command in commands:
        tests = [t for pattern, t in RUN_BY.items() if re.search(pattern, command)]
        assert tests, f"no test runs the documented cluster command: {command}"
        module, name = tests[0].split("::")
        assert hasattr(importlib.import_module(module[:-3].replace("/", ".")), name), tests[0]
    text = (ROOT / "docs" / "distributed.md").read_text()
    assert f"```text\n{SBATCH.read_text()}```" in text   # the docs show the file the test submits
