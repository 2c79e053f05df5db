"""torch.compile of the UNet: when ``auto`` turns it on, that compiled graphs persist in the
toolkit's cache dir and are found again (and only for the same graph), and that a compiled run
trains what an eager run trains, to float rounding."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest
import torch
from hydra.utils import instantiate
from safetensors.torch import load_file

from tests.conftest import ROOT, compose_cfg, run_entry, tiny_overrides
from toolkit.training.speed import Speed, compile_namespace


def test_auto_compiles_only_runs_long_enough_for_the_device():
    speed = Speed(compile="auto", compile_min_steps={"cpu": 100, "cuda": 10})
    assert not speed.compiles("cpu", 99) and speed.compiles("cpu", 100)
    assert speed.compiles("cuda", 10) and not speed.compiles("mps", 10 ** 6)   # not listed: never by auto
    assert not speed.compiles("cpu", None)   # trainer.max_steps unset: the length is unknown
    assert Speed(compile=True).compiles("cpu", 1) and not Speed(compile=False).compiles("cuda", 10 ** 6)
    with pytest.raises(ValueError, match="true, false or auto"):
        Speed(compile="yes")


@pytest.mark.parametrize("min_steps, compiled", [(2, True), (3, False)])
def test_auto_reads_the_runs_length_and_device_at_fit(tiny_model, imagefolder_data, tmp_path, monkeypatch,
                                                      min_steps, compiled):
    calls = []
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)   # restored after the test
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *a, **k: calls.append(type(self).__name__))
    cfg = compose_cfg(tiny_overrides(tiny_model, imagefolder_data, tmp_path) + [
        "trainer.max_steps=2", "module.speed.compile=auto", f"module.speed.compile_min_steps={{cpu: {min_steps}}}",
        f"module.speed.compile_cache={tmp_path}/cache"], tmp_path)
    dm, module = instantiate(cfg.data), instantiate(cfg.module)
    trainer = instantiate(cfg.trainer, logger=False, enable_checkpointing=False, callbacks=[], limit_val_batches=0)
    trainer.fit(module, datamodule=dm)
    assert module.compiled is compiled and calls == (["UNet2DConditionModel"] if compiled else [])
    assert (os.environ.get("TORCHINDUCTOR_CACHE_DIR") == str(tmp_path / "cache" / compile_namespace())) is compiled


PROBE = """
import copy, json, sys, torch
from torch._dynamo.utils import counters
from toolkit.training.speed import Speed
torch.manual_seed(0)
width = int(sys.argv[2])
class Net(torch.nn.Module):   # a module of its own: dynamo does not trace torch's nn.Sequential.forward
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(8, width), torch.nn.Linear(width, 1)
    def forward(self, x):
        return self.b(torch.nn.functional.silu(self.a(x)))
m = Net()
eager = copy.deepcopy(m)
assert Speed(compile=True, compile_cache=sys.argv[1]).compile_unet(m, "cpu", None)
x = torch.randn(4, 8)
m(x).square().sum().backward()
eager(x).square().sum().backward()
print(json.dumps({"hit": counters["inductor"]["fxgraph_cache_hit"], "miss": counters["inductor"]["fxgraph_cache_miss"],
                  "grad": m.a.weight.grad.flatten().tolist(),
                  "vs_eager": (m.a.weight.grad - eager.a.weight.grad).abs().max().item()}))
"""


def probe(cache, width: int) -> dict:
    res = subprocess.run([sys.executable, "-c", PROBE, str(cache), str(width)], cwd=ROOT, capture_output=True,
                         text=True, timeout=300, env={**{k: v for k, v in os.environ.items()
                                                         if k != "TORCHINDUCTOR_CACHE_DIR"}, "PYTHONPATH": str(ROOT)})
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_compiled_graphs_persist_in_the_cache_dir_and_are_keyed_by_graph(tmp_path):
    cache = tmp_path / "compile"
    first, again, other = probe(cache, 16), probe(cache, 16), probe(cache, 32)
    assert first["miss"] > 0 and first["hit"] == 0
    assert again["hit"] > 0 and again["miss"] == 0     # a new process finds the graphs on disk
    assert again["grad"] == first["grad"]               # the same kernels, bit for bit
    assert max(first["vs_eager"], other["vs_eager"]) < 1e-6   # and the eager module's gradients, to rounding
    assert other["miss"] > 0 and other["hit"] == 0      # another shape is compiled, never served a wrong graph
    assert [p.name for p in cache.iterdir()] == [compile_namespace()]
    assert any((cache / compile_namespace()).rglob("*.py"))   # Inductor's generated code lives there


def losses(run_dir) -> list[float]:
    rows = list(csv.DictReader(next(run_dir.rglob("metrics.csv")).read_text().splitlines()))
    return [float(r["train/loss"]) for r in rows if r.get("train/loss")]


@pytest.mark.slow   # ~150 s: Inductor compiles the tiny UNet's forward and backward from cold
def test_compiled_training_stays_close_to_eager(tiny_model, imagefolder_data, tmp_path):
    """The real loop, compiled and eager, from the same seed: the first step's loss is the same
    forward (LoRA B starts at zero), and compiled runs repeat bit for bit. Not established: that
    the rest is rounding. Measured here, 6 steps at lr 1e-3: losses 3.3e-4 apart (relative), the
    adapter 0.23 % (relative Frobenius), the B factors alone 77 %; an eager run on 1 thread instead
    of 2 (a rounding-size perturbation) moves them by 2e-7 / 1.7e-8 / 1.1e-6. On the miniature
    (module=lora_miniature, in one process) compiled and eager stay within 7e-8 over 6 steps. Cause
    found since: Inductor's gradients on this UNet are wrong on CPU (bench/compile_gradients.py:
    relative difference 1.0 beyond the last up block; aot_eager exact). So ``module.speed.compile``
    stays off by default; these bounds catch a compiled loop drifting further."""
    runs = {}
    for flag in ("false", "true"):
        out = tmp_path / flag
        res = run_entry(tiny_overrides(tiny_model, imagefolder_data, out) + [
            f"module.speed.compile={flag}", f"module.speed.compile_cache={tmp_path}/cache", "trainer.max_steps=6",
            "trainer.limit_val_batches=0", "~callbacks.sample_grid"])
        assert res.returncode == 0, res.stderr[-3000:]
        runs[flag] = (torch.tensor(losses(out)), load_file(out / "adapter" / "pytorch_lora_weights.safetensors"))
    (eager, a), (compiled, b) = runs["false"], runs["true"]
    assert len(eager) == len(compiled) == 6
    assert abs(compiled[0] - eager[0]) <= 1e-6 * eager[0]
    assert torch.allclose(compiled, eager, rtol=1e-3, atol=0), (eager, compiled)
    assert a.keys() == b.keys()
    ups = [k for k in a if "lora_B" in k or "lora.up" in k]
    assert ups and all(a[k].abs().sum() > 0 for k in ups)   # trained (B starts at zero): real updates compared
    norm = lambda d: sum(v.double().square().sum() for v in d.values()).sqrt()
    assert norm({k: a[k] - b[k] for k in a}) <= 0.01 * norm(a)
