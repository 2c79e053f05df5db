"""The entry point's start-up: the cyclic garbage collector is off while the libraries import and
the imported objects are frozen before the task runs (``toolkit.cli.entry``)."""

from __future__ import annotations

import gc
import json
import os
import sys

import pytest

from tests.conftest import ROOT, run_entry

PROBE = '''
import gc, json, os

def run(cfg):
    json.dump({"gc_enabled": gc.isenabled(), "frozen": gc.get_freeze_count()}, open(os.environ["PROBE_OUT"], "w"))
    return {}
'''


def test_the_task_runs_with_the_collector_on_and_the_imports_frozen(tmp_path):
    (tmp_path / "gc_probe.py").write_text(PROBE)
    out = tmp_path / "probe.json"
    res = run_entry(["task=report", f"report.dir={tmp_path}", "+task_module=gc_probe"], timeout=300,
                    env={"PYTHONPATH": os.pathsep.join([str(ROOT), str(tmp_path)]), "PROBE_OUT": str(out)})
    assert res.returncode == 0, res.stderr[-3000:]
    state = json.loads(out.read_text())
    # the run's own objects are collected as usual; the imported modules' (~270 k for task=report,
    # ~600 k once diffusers and Lightning are in) sit in the permanent generation that collections skip
    assert state["gc_enabled"] is True and state["frozen"] > 100_000, state


def test_a_refusal_before_the_task_leaves_the_collector_as_it_was(monkeypatch):
    from toolkit.cli import entry

    assert gc.isenabled()
    monkeypatch.setattr(sys, "argv", ["run.py", "task=report", "report.dir=x", "module.snr_gamma=5"])
    with pytest.raises(SystemExit, match="config error"):
        entry()
    assert gc.isenabled()
    gc.disable()   # a caller that keeps it off itself gets it back off
    try:
        with pytest.raises(SystemExit):
            entry()
        assert not gc.isenabled()
    finally:
        gc.enable()
