"""The entry point's start-up: the cyclic garbage collector is off while the libraries import and
the imported objects are frozen before the task runs (``toolkit.cli.entry``)."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT, run_entry

PROBE = '''
import gc, json, os

def run(cfg):
    with open(os.environ["PROBE_OUT"], "w") as fh:
        json.dump({"gc_enabled": gc.isenabled(), "frozen": gc.get_freeze_count()}, fh)
    return {}
'''

# a program of the user's that keeps the collector off itself and calls the entry point
CALLER = '''
import gc, sys
gc.disable()
sys.argv = ["run.py", *sys.argv[1:]]
from toolkit.cli import entry
entry()
print("after entry: collector", "on" if gc.isenabled() else "off")
'''


def probe_env(tmp_path) -> dict[str, str]:
    (tmp_path / "gc_probe.py").write_text(PROBE)
    return {"PYTHONPATH": os.pathsep.join([str(ROOT), str(tmp_path)]), "PROBE_OUT": str(tmp_path / "probe.json")}


def test_the_task_runs_with_the_collector_on_and_the_imports_frozen(tmp_path):
    res = run_entry(["task=report", f"report.dir={tmp_path}", "+task_module=gc_probe"], timeout=300,
                    env=probe_env(tmp_path))
    assert res.returncode == 0, res.stderr[-3000:]
    state = json.loads((tmp_path / "probe.json").read_text())
    # the run's own objects are collected as usual; the imported modules' (~270 k for task=report,
    # ~600 k once diffusers and Lightning are in) sit in the permanent generation that collections skip
    assert state["gc_enabled"] is True and state["frozen"] > 100_000, state


def test_a_caller_that_keeps_the_collector_off_gets_it_back_off(tmp_path):
    res = subprocess.run([sys.executable, "-c", CALLER, "task=report", f"report.dir={tmp_path}",
                          f"hydra.run.dir={tmp_path / 'run'}", "+task_module=gc_probe"], cwd=ROOT,
                         env={**os.environ, **probe_env(tmp_path)}, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads((tmp_path / "probe.json").read_text())["gc_enabled"] is True   # on for the task
    assert "after entry: collector off" in res.stdout


def test_a_refusal_before_the_task_leaves_the_collector_as_it_was(monkeypatch):
    from toolkit.cli import entry

    assert gc.isenabled()
    monkeypatch.setattr(sys, "argv", ["run.py", "task=report", "report.dir=x", "module.snr_gamma=5"])
    with pytest.raises(SystemExit, match="config error"):
        entry()
    assert gc.isenabled()
    gc.disable()
    try:
        with pytest.raises(SystemExit, match="config error"):
            entry()
        assert not gc.isenabled()
    finally:
        gc.enable()
