"""The number of processes changes no number: 2 processes × micro-batch b and 1 process × micro-batch
b accumulating 2 train the same adapter bit for bit (every random draw is seeded per sample, the
micro-batches are the same, DDP's average of two gradients is accumulation's sum of two halves),
report the same losses, and a checkpoint of either resumes on the other exactly.

Both sides run with one thread per process (Lightning gives each local CPU process a share of the
cores; a different thread count changes the rounding of a sum, not the training)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import run_entry, tiny_overrides
from tests.test_fault_tolerance import ADAPTER, same_tensors

ONE = ["trainer.devices=1", "trainer.accumulate_grad_batches=2"]   # 1 process × 2 micro-batches
TWO = ["trainer=ddp", "trainer.devices=2", "trainer.accelerator=cpu", "trainer.accumulate_grad_batches=1"]
THREADS = {"OMP_NUM_THREADS": "1"}


def overrides(model: str, data: Path, out: Path, processes: list[str]) -> list[str]:
    """4 steps of 2 micro-batches of 2 images (3 steps an epoch: a resume at step 2 is mid-epoch), every
    random input on: flips, caption dropout, LoRA dropout, noise offset; the whole validation set."""
    return tiny_overrides(model, data, out) + [
        "trainer.max_steps=4", "trainer.limit_val_batches=1.0", "data.random_flip=true",
        "module.objective.caption_dropout=0.3", "module.lora.dropout=0.1", "module.objective.noise_offset=0.1",
        "callbacks.sample_grid.every_n_steps=0", *processes]


@pytest.fixture(scope="module")
def uninterrupted(tiny_model, imagefolder_data, tmp_path_factory) -> dict[str, Path]:
    out = {}
    for name, processes in (("one", ONE), ("two", TWO)):
        run = tmp_path_factory.mktemp(f"processes-{name}")
        res = run_entry(overrides(tiny_model, imagefolder_data, run, processes), env=THREADS)
        assert res.returncode == 0, res.stderr[-3000:]
        out[name] = run
    return out


def test_two_processes_train_what_one_process_accumulating_two_trains(uninterrupted):
    one, two = uninterrupted["one"], uninterrupted["two"]
    assert same_tensors(one / ADAPTER, two / ADAPTER)
    a, b = (json.loads((r / "train_metrics.json").read_text()) for r in (one, two))
    numbers = ("train/loss", "val/loss", "train/grad_norm", "lr", "global_step")
    assert {k: a[k] for k in numbers} == {k: b[k] for k in numbers}
    recorded = [json.loads((r / "identity.json").read_text()) for r in (one, two)]
    assert recorded[0]["digest"] == recorded[1]["digest"]   # one identity, the spread recorded beside it
    assert recorded[1]["recorded"]["config"]["trainer.devices"] == 2


@pytest.mark.parametrize(("before", "after"), [("two", ONE), ("one", TWO)], ids=["2to1", "1to2"])
def test_a_checkpoint_resumes_exactly_on_the_other_number_of_processes(before, after, uninterrupted, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(uninterrupted[before], run)
    shutil.rmtree(run / "adapter")
    (run / "train_metrics.json").unlink()
    ckpts = run / "checkpoints"
    shutil.copy(ckpts / "step=2.ckpt", ckpts / "last.ckpt")   # as if stopped after step 2
    (ckpts / "step=4.ckpt").unlink()
    res = run_entry([f"hydra.run.dir={run}", "ckpt_path=last", *after], env=THREADS)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed on" in res.stdout + res.stderr
    assert same_tensors(run / ADAPTER, uninterrupted["one"] / ADAPTER)
