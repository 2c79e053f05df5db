"""Gradient accumulation is exact across interruptions: a signal in the middle of an accumulation
window checkpoints at its end, a kill there resumes from the last optimizer-step checkpoint, and
the EMA moves on optimizer steps only — each ends bit-identical to the uninterrupted run."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import torch

from tests.conftest import run_entry
from tests.test_fault_tolerance import ADAPTER, resume_overrides, same_tensors, start

EMA = Path("adapter") / "ema" / "pytorch_lora_weights.safetensors"


def accum_overrides(model: str, data: Path, out: Path, ema: bool) -> list[str]:
    """8 optimizer steps of 2 accumulated batches (6 batches an epoch: windows never straddle one)."""
    return resume_overrides(model, data, out) + ["trainer.accumulate_grad_batches=2"] + (
        ["callbacks.ema.decay=0.8"] if ema else [])


@pytest.fixture(scope="module", params=[False, True], ids=["plain", "ema"])
def reference(request, tiny_model, imagefolder_data, tmp_path_factory) -> tuple[bool, Path]:
    out = tmp_path_factory.mktemp("accum")
    res = run_entry(accum_overrides(tiny_model, imagefolder_data, out, request.param))
    assert res.returncode == 0, res.stderr[-3000:]
    return request.param, out


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGKILL"])
def test_interrupt_mid_window_resumes_bit_identical(sig, reference, tiny_model, imagefolder_data, tmp_path):
    ema, ref = reference
    marker = tmp_path / "signalled"
    # after optimizer step 3, at the start of the first batch of the next window
    args = accum_overrides(tiny_model, imagefolder_data, tmp_path / "run", ema) + [
        "+callbacks.signal_at._target_=tests.helpers.SignalAt", "+callbacks.signal_at.step=3",
        f"+callbacks.signal_at.signal={sig}", f"+callbacks.signal_at.marker={marker}"]
    proc = start(args)
    code = proc.wait(timeout=600)
    assert marker.is_file(), proc.stderr.read()[-3000:]
    last = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    if sig == "SIGTERM":   # the signal came mid-window: the checkpoint waited for the window's optimizer step
        assert code == 143, proc.stderr.read()[-3000:]
        assert last["global_step"] == 4   # not 3: the window of step 4 had begun
    else:                  # killed: the last checkpoint is the periodic one, at an optimizer step
        assert code == -signal.SIGKILL and last["global_step"] == 2
    res = run_entry([a for a in args if not a.startswith("+")] + ["ckpt_path=last"])   # the run's own overrides
    assert res.returncode == 0, res.stderr[-3000:]
    assert same_tensors(tmp_path / "run" / ADAPTER, ref / ADAPTER)
    if ema:
        assert same_tensors(tmp_path / "run" / EMA, ref / EMA)
        assert not same_tensors(ref / EMA, ref / ADAPTER)   # the average is not the weights


def test_ema_moves_on_optimizer_steps_only(tiny_model, imagefolder_data, tmp_path):
    """With 2 batches a step, the EMA counts 8 updates for 8 optimizer steps, none before the first."""
    from tests.conftest import compose_cfg
    from toolkit.tasks import train

    cfg = compose_cfg(accum_overrides(tiny_model, imagefolder_data, tmp_path, True) + [
        "+callbacks.record._target_=tests.helpers.RecordLoRA"], tmp_path)
    train.run(cfg)
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    ema_state = next(v for k, v in ckpt["callbacks"].items() if k.startswith("AdapterEMA"))
    assert ema_state["optimization_step"] == 8
