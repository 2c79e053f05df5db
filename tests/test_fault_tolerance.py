"""Never lose a run: exact resume after SIGKILL/SIGTERM/Ctrl-C (with the command the run prints),
one last.ckpt, atomic checkpoints, NaN stops, config errors that say what to change, no silent
fallbacks for missing paths, and checkpoint loading that cannot run foreign code."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import ROOT, compose_cfg, run_entry, tiny_overrides
from toolkit.callbacks.preemption import AtomicCheckpointIO, PreemptionCheckpoint
from toolkit.config import check_overrides
from toolkit.evaluation.protocol import read_prompts
from toolkit.run import signals
from toolkit.run.history import history
from toolkit.tasks import train

ADAPTER = Path("adapter") / "pytorch_lora_weights.safetensors"


def resume_overrides(model: str, data: Path, out: Path) -> list[str]:
    """8 steps over 3-batch epochs (mid-epoch and cross-epoch resumes), with every random
    input on: flips, random crops, caption dropout, LoRA dropout, deterministic CPU kernels."""
    return tiny_overrides(model, data, out) + [
        "trainer.max_steps=8", "trainer.deterministic=true", "data.random_flip=true",
        "data.center_crop=false", "module.objective.caption_dropout=0.3", "module.lora.dropout=0.1",
        "callbacks.sample_grid.every_n_steps=100"]


def start(args: list[str], log: Path | None = None, env: dict | None = None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    out = open(log, "w") if log else subprocess.DEVNULL   # noqa: SIM115 - the child holds it
    return subprocess.Popen([sys.executable, str(ROOT / "run.py"), *args], cwd=ROOT, env=env,
                            stdout=out, stderr=subprocess.STDOUT if log else subprocess.PIPE, text=True)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    end = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, f"training ended before {path.name}: {proc.stderr and proc.stderr.read()[-3000:]}"
        assert time.time() < end, f"no {path} after {timeout} s"
        time.sleep(0.05)


def same_tensors(a: Path, b: Path) -> bool:
    x, y = load_file(a), load_file(b)
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


@pytest.fixture(scope="module")
def uninterrupted(tiny_model, imagefolder_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted")
    res = run_entry(resume_overrides(tiny_model, imagefolder_data, out))
    assert res.returncode == 0, res.stderr[-3000:]
    return out / ADAPTER


def test_sigkill_then_resume_is_bit_identical(tiny_model, imagefolder_data, uninterrupted, tmp_path):
    args = resume_overrides(tiny_model, imagefolder_data, tmp_path)
    proc = start(args)
    wait_for(tmp_path / "checkpoints" / "step=4.ckpt", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / ADAPTER).exists()
    step = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    assert 2 <= step < 8   # killed mid-run (last.ckpt may still be at step 2: it is written second)
    res = run_entry(args + ["ckpt_path=last"])
    assert res.returncode == 0, res.stderr[-3000:]
    assert same_tensors(tmp_path / ADAPTER, uninterrupted)


def test_sigterm_checkpoints_exits_143_and_resumes_identically(tiny_model, imagefolder_data, uninterrupted,
                                                                tmp_path):
    args = resume_overrides(tiny_model, imagefolder_data, tmp_path)
    proc = start(args)
    wait_for(tmp_path / "checkpoints" / "step=2.ckpt", proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=300) == 143, proc.stderr.read()[-3000:]
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert 2 <= ckpt["global_step"] < 8 and not (tmp_path / ADAPTER).exists()
    saved = (tmp_path / ".hydra" / "overrides.yaml").read_text()
    res = run_entry(args + ["ckpt_path=last"])   # repeating the run's own overrides is fine
    assert res.returncode == 0, res.stderr[-3000:]
    assert same_tensors(tmp_path / ADAPTER, uninterrupted)
    # one last.ckpt, the newest state; the first run's .hydra/ as it was; both attempts in the history
    ckpts = tmp_path / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("last*")) == ["last.ckpt"]
    assert torch.load(ckpts / "last.ckpt", weights_only=True)["global_step"] == 8
    assert (tmp_path / ".hydra" / "overrides.yaml").read_text() == saved
    assert (tmp_path / ".hydra" / "resume-1" / "overrides.yaml").is_file()
    assert [(h["event"], h["hydra_dir"]) for h in history(tmp_path)] == [("start", ".hydra"),
                                                                         ("resume", ".hydra/resume-1")]
    # what this attempt added: the run's own overrides, repeated, add nothing (toolkit.run.resume.merge_overrides)
    assert history(tmp_path)[1]["overrides"] == ["ckpt_path=last"]


def test_ctrl_c_checkpoints_exits_130_and_the_printed_command_resumes_identically(
        tiny_model, imagefolder_data, uninterrupted, tmp_path):
    run, log = tmp_path / "run", tmp_path / "log.txt"
    proc = start(resume_overrides(tiny_model, imagefolder_data, run), log)
    wait_for(run / "checkpoints" / "step=2.ckpt", proc)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=300) == 130, log.read_text()[-3000:]
    assert 2 <= torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] < 8
    assert not (run / ADAPTER).exists()
    printed = log.read_text().split("Resume with:\n")[1].splitlines()[0].strip()
    assert printed == f"python run.py hydra.run.dir={run} ckpt_path=last"
    # exactly the printed command, through a shell: the run's own data, max_steps and everything else
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    res = subprocess.run(printed, shell=True, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"images from {imagefolder_data}," in res.stdout
    assert f"starting from checkpoint {run / 'checkpoints' / 'last.ckpt'}" in res.stdout
    assert same_tensors(run / ADAPTER, uninterrupted)
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 8


def test_second_ctrl_c_stops_at_once_and_stop_signals_wait_for_the_step_only_in_training():
    cb = PreemptionCheckpoint("unused")
    previous = signal.getsignal(signal.SIGINT)
    try:
        cb._int_handler(signal.SIGINT, None)              # first: checkpoint at the end of the step
        assert cb.ctrl_c == 1
        with pytest.raises(KeyboardInterrupt):            # second: now, without a checkpoint
            cb._int_handler(signal.SIGINT, None)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, previous)
    # the job's SIGTERM / SIGUSR1 / SIGUSR2 (toolkit/run/signals.py): outside training they stop the
    # process at once (what was written stays), in training they wait for the end of the step
    before = signals.install()
    try:
        with pytest.raises(signals.Stop) as stop:
            os.kill(os.getpid(), signal.SIGUSR1)
            time.sleep(5)
        assert stop.value.name == "SIGUSR1" and stop.value.exit_code == 143
        signals.restore(signals.install())   # a fresh job
        signals.training(True)
        os.kill(os.getpid(), signal.SIGUSR2)
        os.kill(os.getpid(), signal.SIGTERM)              # repeated: still one request, the first signal's
        time.sleep(0.1)
        assert signals.requested() == "SIGUSR2"
        signals.training(False)
        with pytest.raises(signals.Stop, match="SIGUSR2"):   # the next phase does not start
            signals.check()
    finally:
        signals.restore(before)
    assert signal.getsignal(signal.SIGTERM) == before[signal.SIGTERM]


def test_crash_during_checkpoint_write_keeps_the_previous_file(tmp_path, monkeypatch):
    io, path = AtomicCheckpointIO(), tmp_path / "last.ckpt"
    io.save_checkpoint({"w": torch.ones(3)}, path)

    def dying_save(obj, f, *a, **kw):   # half a file, then the process "dies"
        f.write(b"\x80\x02partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"w": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]   # no temp file left behind


def nan_overrides(model: str, data: Path, out: Path) -> list[str]:
    return tiny_overrides(model, data, out) + [
        "module._target_=tests.helpers.NaNLoRA", "+module.nan_at_step=3", "trainer.max_steps=6"]


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny_model, imagefolder_data, tmp_path):
    with pytest.raises(FloatingPointError, match=r"non-finite training loss .* step 3 .*last\.ckpt"):
        train.run(compose_cfg(nan_overrides(tiny_model, imagefolder_data, tmp_path), tmp_path))
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 2
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())


def test_nan_loss_skip_policy_skips_batches_and_counts_them(tiny_model, imagefolder_data, tmp_path):
    cfg = compose_cfg(nan_overrides(tiny_model, imagefolder_data, tmp_path) + ["module.nonfinite=skip"], tmp_path)
    train.run(cfg)   # every batch from step 3 on is NaN: skipped, no update
    ck = {s: torch.load(tmp_path / "checkpoints" / f"step={s}.ckpt", weights_only=True) for s in (2, 4, 6)}
    assert ck[6]["skipped_steps"] >= 2 and ck[2]["skipped_steps"] == 0
    assert all(torch.isfinite(v).all() for v in ck[6]["state_dict"].values())
    assert all(torch.equal(v, ck[4]["state_dict"][k]) for k, v in ck[6]["state_dict"].items())   # frozen since
    assert any(not torch.equal(v, ck[2]["state_dict"][k]) for k, v in ck[4]["state_dict"].items())
    with pytest.raises(FloatingPointError, match="non-finite"):   # over the allowance: stop
        train.run(compose_cfg(nan_overrides(tiny_model, imagefolder_data, tmp_path / "b") + [
            "module.nonfinite=skip", "module.max_skipped_steps=1"], tmp_path / "b"))


def test_misspelt_key_fails_at_start_naming_the_nearest_key():
    res = run_entry(["trainer.max_stpes=5", "task=train"], timeout=120)
    assert res.returncode != 0 and "did you mean 'trainer.max_steps'" in res.stderr
    assert "'data.policy'" in check_overrides(["data.polcy.on_error=error"])
    assert "'module'" in check_overrides(["modle=lora"]) and check_overrides(["trainer.max_steps=3"]) is None


@pytest.mark.parametrize("override,message", [
    ("data.global_batch_size=5", r"global_batch_size=5 is not divisible .* use a multiple of 2"),
    ("data.resolution=15", r"resolution=15 is not divisible by 2, the VAE's downsampling factor 2 .* use 14 or 16"),
    ("model.name_or_path=/no/such/model", r"no local file or folder .*/no/such/model\), and it cannot be a hub"),
    ("model.name_or_path=my_model", r"no local file or folder .*my_model\); and offline mode is on \(HF_HUB_OFFLINE"),
    ("data.caption_column=prompt", r"data.caption_column='prompt' is not a column .* columns are"),
])
def test_inconsistent_settings_fail_before_training(override, message, tiny_model, imagefolder_data, tmp_path,
                                                    monkeypatch):
    loaded = []
    monkeypatch.setattr("toolkit.training.module.load_components", lambda **kw: loaded.append(kw))
    extra = ["trainer.accumulate_grad_batches=2", override] if "global_batch" in override else [override]
    with pytest.raises((ValueError, KeyError, FileNotFoundError), match=message):
        train.run(compose_cfg(tiny_overrides(tiny_model, imagefolder_data, tmp_path) + extra, tmp_path))
    assert not loaded


class Foreign:   # stands for any class a foreign pickle might instantiate on load
    pass


def test_foreign_pickle_checkpoint_is_refused(tiny_model, imagefolder_data, tmp_path):
    evil = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {}, "payload": Foreign()}, evil)
    out = tmp_path / "run"
    with pytest.raises(ValueError, match="refused to load checkpoint .* can execute arbitrary code"):
        train.run(compose_cfg(tiny_overrides(tiny_model, imagefolder_data, out) + [f"ckpt_path={evil}"], out))


def test_interrupted_result_append_loses_only_the_partial_row(tmp_path):
    from toolkit.results import append_row, read_rows

    path = tmp_path / "results.jsonl"
    append_row(path, {"cell": 1})
    with open(path, "a") as f:
        f.write('{"cell": 2, "metr')          # the process died mid-append
    append_row(path, {"cell": 3})
    assert [r["cell"] for r in read_rows(path)] == [1, 3]


def test_prompts_that_look_like_a_missing_file_fail_fast(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    t = time.monotonic()
    for value in ("prompts.txt", "./my prompts.txt", "~/no/such/prompts", "lists/styles"):
        with pytest.raises(FileNotFoundError, match=r"looks like a file name, but there is no such file \(resolved to"):
            read_prompts(value)
    assert time.monotonic() - t < 2
    assert read_prompts("a cat w/ a hat") == ["a cat w/ a hat"]          # a prompt, not a path
    assert read_prompts(["prompts.txt"] * 2) == ["prompts.txt"] * 2      # a list is prompts
    (tmp_path / "prompts.txt").write_text("a red circle\n\na blue square\n")
    assert read_prompts("prompts.txt") == ["a red circle", "a blue square"]
    (tmp_path / "p.jsonl").write_text('{"prompt": "x"}\n')
    with pytest.raises(ValueError, match="is a .jsonl file"):
        read_prompts("p.jsonl")
