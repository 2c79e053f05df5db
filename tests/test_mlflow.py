"""MLflow as a tracker (toolkit/tracking.py, logger=mlflow) against a real ``mlflow server`` (sqlite
backend, a local artifact folder) started on 127.0.0.1 for the session: a train-and-evaluate sweep's
training curves and evaluation rows read back through MLflow's own client, the same sweep run again
logging nothing twice, a resumed run continuing its MLflow run, the UI's run list in Chromium, and
the refusals (an unreachable server, a credential in the config).

    python -m pytest -q tests/test_mlflow.py
    REPORT_ARTIFACT_DIR=/tmp/shots python -m pytest -q tests/test_mlflow.py    # keeps the UI screenshot

The server runs from an environment of its own (a venv over this one's packages, made once and kept
in ~/.cache/toolkit-tests, or $TOOLKIT_TEST_CACHE): the full ``mlflow`` package (server and UI) would
downgrade pyarrow here, the project itself needs only the client (mlflow-skinny). Where the client is
missing or the server cannot be installed (no package registry) the tests skip saying so;
CI_REQUIRE_MLFLOW=1 (CI) turns the skip into a failure.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from miniature.world import generate
from tests.conftest import compose_cfg, run_entry, tiny_overrides
from tests.test_report import browser, screenshot  # noqa: F401 (browser: the fixture)
from toolkit.results import read_rows

# The server and UI (the full package), in an environment of its own; one version, so the UI the test
# drives stays the same (the newest pip resolves beside this project's pins, 2026-12-06).
SERVER_VERSION = "3.17.2"
SERVER_ENV = Path(os.environ.get("TOOLKIT_TEST_CACHE", Path.home() / ".cache" / "toolkit-tests")) / \
    f"mlflow-server-{SERVER_VERSION}"


def unavailable(why: str) -> None:
    if os.environ.get("CI_REQUIRE_MLFLOW") == "1":
        pytest.fail(f"CI_REQUIRE_MLFLOW=1 but {why}")
    pytest.skip(f"{why}; the MLflow tests need it (CI sets CI_REQUIRE_MLFLOW=1)")


def server_python() -> Path:
    """The server environment's python: a venv over this environment's packages with ``mlflow`` added
    (pip installs there what the server needs beyond them, and leaves this environment as it is)."""
    from filelock import FileLock

    py = SERVER_ENV / "bin" / "python"
    SERVER_ENV.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{SERVER_ENV}.lock", timeout=1200):   # other sessions on this machine may build it too
        ok = py.is_file() and subprocess.run([str(py), "-c", "import mlflow.server"], capture_output=True,
                                             timeout=300).returncode == 0
        if not ok:
            shutil.rmtree(SERVER_ENV, ignore_errors=True)
            subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(SERVER_ENV)], check=True)
            spec = f"mlflow=={SERVER_VERSION}"
            res = subprocess.run([str(py), "-m", "pip", "install", "--quiet", spec], capture_output=True, text=True,
                                 timeout=1200)
            if res.returncode:
                shutil.rmtree(SERVER_ENV, ignore_errors=True)
                unavailable(f"installing the MLflow server ({spec}) from the package registry failed:\n"
                            f"{res.stderr[-2000:]}")
    return py


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """``http://127.0.0.1:<port>`` of a running MLflow server (sqlite store, artifacts in a folder)."""
    try:
        import mlflow  # noqa: F401
    except ImportError:
        unavailable("the MLflow client is not installed (pip install -e '.[mlflow]' or '.[dev]')")
    py = server_python()
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"   # no background job workers: a faster start
    log = open(root / "server.log", "w")   # noqa: SIM115 (open for the server's whole life)
    proc = subprocess.Popen([str(py), "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
                             "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1",
                             "--port", str(port), "--workers", "1"], stdout=log, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while True:
        try:
            urllib.request.urlopen(f"{uri}/health", timeout=2).close()
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                os.killpg(proc.pid, signal.SIGKILL)
                pytest.fail(f"the MLflow server did not start:\n{(root / 'server.log').read_text()[-3000:]}")
            time.sleep(0.5)
    yield uri
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    log.close()


def client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


def sweep_args(tiny_model: str, data: Path, evaldata: Path, sweep: Path) -> list[str]:
    """A 2-cell train-and-evaluate sweep of the default job, shrunk to seconds."""
    return ["-m", "task=finetune_eval", f"model.name_or_path={tiny_model}", f"data.path={data}",
            "data.resolution=16", "module=lora_miniature", "data.global_batch_size=4", "data.val_fraction=0.25",
            "logger=mlflow", "trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.limit_val_batches=1",
            "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false",
            "callbacks.model_checkpoint.every_n_train_steps=2", "callbacks.sample_grid.every_n_steps=0",
            "callbacks.sample_grid.steps=2", "metrics.clip_model=null", f"eval.dataset={evaldata}",
            "eval.num_images=8", "eval.steps=2", "eval.batch_size=4", "metrics.interval_groups=4",
            "metrics.compute=[fid,kid,vendi]", f"hydra.sweep.dir={sweep}", "module.lora.r=2,4"]


@pytest.fixture(scope="module")
def sweep(mlflow_server, tiny_model, imagefolder_data, tmp_path_factory):
    """A 2-cell train-and-evaluate sweep logged to the server, run twice: its dir, its experiment's id and
    the number of runs after the first time."""
    root = tmp_path_factory.mktemp("mlflow-sweep")
    evaldata = generate(root / "evaldata", n=8, seed=5, striped=True, size=32)
    sweep = root / f"sweep-{root.name}"
    env = {"MLFLOW_TRACKING_URI": mlflow_server}
    res = run_entry(sweep_args(tiny_model, imagefolder_data, evaldata, sweep), env=env, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    exp = client(mlflow_server).get_experiment_by_name(f"finetune_eval/{sweep.name}")
    first = len(client(mlflow_server).search_runs([exp.experiment_id]))
    res = run_entry(sweep_args(tiny_model, imagefolder_data, evaldata, sweep), env=env, timeout=900)   # all done
    assert res.returncode == 0, res.stderr[-3000:]
    return sweep, exp.experiment_id, first


def test_a_sweep_is_one_experiment_its_rows_runs_logged_once(mlflow_server, sweep):
    sweep, exp_id, first = sweep
    rows = read_rows(sweep / "results.jsonl")
    assert len(rows) == 3   # the base model once, one fine-tuned row per cell
    c = client(mlflow_server)
    runs = c.search_runs([exp_id])
    assert len(runs) == first == 5   # the sweep run again logged nothing twice
    assert sorted(r.data.tags["toolkit.kind"] for r in runs) == ["eval", "eval", "eval", "train", "train"]
    evals = {r.data.tags["toolkit.row_key"]: r for r in runs if r.data.tags["toolkit.kind"] == "eval"}
    assert set(evals) == {r["key"] for r in rows}
    for row in rows:   # metrics with their interval bounds, settings as params, grid and row as artifacts
        run = evals[row["key"]]
        for k in ("fid", "fid_ci_low", "fid_ci_high", "kid", "kid_ci_low", "kid_ci_high", "vendi"):
            assert run.data.metrics[k] == pytest.approx(row["metrics"][k], rel=1e-9), k
        assert run.data.params["num_images"] == "8" and run.data.params["seed"] == "0"
        assert json.loads(run.data.params["metrics.compute"]) == ["fid", "kid", "vendi"]
        names = {a.path for a in c.list_artifacts(run.info.run_id)}
        assert {"grid.png", "row.json"} <= names
        if row["settings"]["adapters"]:   # a cell's fine-tuned row: its training settings, the job's report
            assert run.info.run_name.endswith(": fine-tuned") and "report.html" in names
            assert int(run.data.params["train.module.lora.r"]) == row["settings"]["train"]["module"]["lora"]["r"]
        else:
            assert run.info.run_name == "base (no adapter)"
    trains = {r.info.run_name: r for r in runs if r.data.tags["toolkit.kind"] == "train"}
    assert sorted(trains) == ["0: module.lora.r=2", "1: module.lora.r=4"]
    for i, name in enumerate(sorted(trains)):
        run_id = trains[name].info.run_id
        assert [m.step for m in c.get_metric_history(run_id, "train/loss")] == [0, 1]   # the training curve
        assert json.loads((sweep / str(i) / "mlflow_run.json").read_text())["run_id"] == run_id
        assert trains[name].data.params["module.lora.r"] == str(2 * (i + 1))
        assert "report.html" in {a.path for a in c.list_artifacts(run_id)}


def test_the_mlflow_ui_lists_the_sweeps_cells(mlflow_server, sweep, browser, tmp_path):  # noqa: F811
    _, exp_id, _ = sweep
    page = browser.new_page(viewport={"width": 1366, "height": 800})
    page.goto(f"{mlflow_server}/#/experiments/{exp_id}/runs", wait_until="load")
    names = ("0: module.lora.r=2", "1: module.lora.r=4", "base (no adapter)", "0: module.lora.r=2: fine-tuned",
             "1: module.lora.r=4: fine-tuned")
    page.get_by_text(names[0], exact=True).first.wait_for(timeout=60_000)
    if page.get_by_label("Close", exact=True).count():   # MLflow 3's assistant panel: the run list gets the width
        page.get_by_label("Close", exact=True).first.click()
    for name in names:   # each run, by its full name (the list may cut it short on screen)
        page.get_by_text(name, exact=True).first.wait_for(timeout=30_000)
    screenshot(page, tmp_path, "mlflow-ui-runs")
    page.close()


def test_a_resumed_run_continues_its_mlflow_run(mlflow_server, tiny_model, imagefolder_data, tmp_path):
    out = tmp_path / "run"
    swap = {"logger": "logger=mlflow", "trainer.max_steps": "trainer.max_steps=2",
            "callbacks.sample_grid.every_n_steps": "callbacks.sample_grid.every_n_steps=0"}
    args = [swap.get(a.split("=")[0], a) for a in tiny_overrides(tiny_model, imagefolder_data, out)]
    env = {"MLFLOW_TRACKING_URI": mlflow_server}
    res = run_entry(args, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    run_id = json.loads((out / "mlflow_run.json").read_text())["run_id"]
    res = run_entry([f"hydra.run.dir={out}", "ckpt_path=last", "trainer.max_steps=4"], env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads((out / "mlflow_run.json").read_text())["run_id"] == run_id
    c = client(mlflow_server)
    run = c.get_run(run_id)
    assert [m.step for m in c.get_metric_history(run_id, "train/loss")] == [0, 1, 2, 3]   # one curve, continued
    assert run.data.params["trainer.max_steps"] == "2" and run.data.tags["resumed.trainer.max_steps"] == "4"
    assert run.info.status == "FINISHED"
    assert "samples/step=4.png" in {a.path for a in c.list_artifacts(run_id, "samples")}
    same = c.search_runs([run.info.experiment_id], filter_string=f"tags.`mlflow.runName` = '{run.info.run_name}'")
    assert len(same) == 1

    from toolkit.tracking import MLflowLogger, TrackingError

    (out / "mlflow_run.json").write_text(json.dumps({"run_id": "0" * 32}))   # a run this server does not hold
    with pytest.raises(TrackingError, match="does not hold"):
        MLflowLogger(tracking_uri=mlflow_server, run_dir=str(out), resume="last")


def refusal(node) -> str:
    """The tracker's refusal when the logger is made (at the start of a task), as the user reads it."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    from toolkit.tracking import TrackingError

    with pytest.raises(InstantiationException) as err:
        instantiate(node)
    assert isinstance(err.value.__cause__, TrackingError)
    return str(err.value.__cause__)


def test_an_unreachable_server_or_a_credential_in_the_config_is_refused(tmp_path, monkeypatch):
    from toolkit.tracking import redact

    pytest.importorskip("mlflow")
    dead = f"http://127.0.0.1:{free_port()}"   # nothing listens there
    cfg = compose_cfg(["task=train", "logger=mlflow"], tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", dead)
    t0 = time.time()
    assert f"{dead} does not answer" in refusal(cfg.logger.mlflow)
    assert time.time() - t0 < 10
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert "set MLFLOW_TRACKING_URI" in refusal(cfg.logger.mlflow)
    for uri in ("https://ann:hunter2@mlflow.lab", "https://mlflow.lab/?access_token=hunter2"):
        why = refusal(compose_cfg(["task=train", "logger=mlflow", f"logger.mlflow.tracking_uri='{uri}'"],
                                  tmp_path).logger.mlflow)
        assert "holds a credential" in why and "hunter2" not in why
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://ann:hunter2@127.0.0.1:5000")   # the environment's, too
    why = refusal(cfg.logger.mlflow)
    assert "hunter2" not in why and "MLFLOW_TRACKING_URI=http://***@127.0.0.1:5000 holds a credential" in why
    assert redact("https://a:b@h:5000/p?token=t&x=1") == "https://***@h:5000/p?token=***&x=1"
