"""MLflow as a tracker (``logger=mlflow``; ``pip install -e ".[mlflow]"``): the self-hosted dashboard
most labs run where results may not go to wandb's cloud.

    MLFLOW_TRACKING_URI=http://mlflow.lab:5000 python run.py logger=mlflow
    MLFLOW_TRACKING_URI=http://mlflow.lab:5000 python run.py -m task=eval logger=mlflow eval.lora_scale=0,0.5,1

- Training curves go through Lightning's ``MLFlowLogger`` (``MLflowLogger`` below adds what a run dir
  needs): the run's id is recorded in ``<run dir>/mlflow_run.json``, and a resumed run
  (``ckpt_path=...``) continues that MLflow run, its curves included; the resolved config is logged
  as params once (a setting a resume may change is tagged ``resumed.<key>``, MLflow refuses new
  values for a param).
- Every evaluation row is an MLflow run of its own (``MLflowLogger.log_row``): its metrics with their
  interval bounds (``fid``, ``fid_ci_low``, ``fid_ci_high``, ...), its settings flattened as params,
  its sample grid, the row itself (``row.json``) and the job's report as artifacts, tagged with the
  row's key. A sweep is one experiment (``<task>/<sweep dir name>``), so its cells compare in the
  MLflow UI; a row already in the experiment (same key: a sweep run again, the base model shared by
  the cells of a train-and-evaluate sweep) is not logged twice.
- The tracking URI is ``logger.mlflow.tracking_uri`` or else ``MLFLOW_TRACKING_URI``; an http(s)
  server is checked reachable when the logger is made (at the start of a task: a wrong URI fails
  within seconds, naming it). Credentials never go in a URI: one with ``user:pass@`` or a token in
  its query is refused (config or environment: the config is saved with the run, and MLflow prints
  run links made from the URI); MLflow's client reads them from ``MLFLOW_TRACKING_USERNAME`` /
  ``MLFLOW_TRACKING_PASSWORD`` or ``MLFLOW_TRACKING_TOKEN``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit, urlunsplit

from lightning.pytorch.loggers import MLFlowLogger

log = logging.getLogger(__name__)

RUN_FILE = "mlflow_run.json"           # in the run dir: the training's MLflow run, continued on resume
DEFAULT_EXPERIMENT = "lora-diffusion"   # outside a sweep (wandb's project name)
KEY_TAG = "toolkit.row_key"             # an evaluation row's key: the run that holds it
SECRET_QUERY = re.compile(r"token|secret|password|passwd|key|auth|credential", re.I)
PROBE_TIMEOUT_S = 5.0


class TrackingError(RuntimeError):
    """The tracker cannot be used as configured; the message says what to set."""


def secrets_in(uri: str) -> list[str]:
    """What in ``uri`` is a credential: a user name / password, or query parameters named like one."""
    parts = urlsplit(uri)
    found = ["user:password@" if parts.password is not None else "user@"] if parts.username is not None else []
    return found + [f"?{k}=" for k, _ in parse_qsl(parts.query) if SECRET_QUERY.search(k)]


def redact(uri: str) -> str:
    """``uri`` with its credentials replaced by ``***`` (for logs)."""
    parts = urlsplit(uri)
    netloc = parts.netloc
    if parts.username is not None:
        netloc = "***@" + netloc.rsplit("@", 1)[1]
    query = "&".join(f"{k}={'***' if SECRET_QUERY.search(k) else v}" for k, v in parse_qsl(parts.query))
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def resolve_uri(configured: str | None) -> str:
    """The URI to log to: the config's, else ``MLFLOW_TRACKING_URI``; refused if it holds a credential
    (the config is saved with the run and logged to the dashboards, and MLflow prints run links
    made from the URI)."""
    uri, where = (configured, "logger.mlflow.tracking_uri") if configured else \
        (os.environ.get("MLFLOW_TRACKING_URI"), "MLFLOW_TRACKING_URI")
    if not uri:
        raise TrackingError("logger=mlflow needs a tracking server: set MLFLOW_TRACKING_URI=http://<host>:5000 (or "
                            "logger.mlflow.tracking_uri=...; a local store: sqlite:///<folder>/mlflow.db)")
    if found := secrets_in(uri):
        raise TrackingError(
            f"{where}={redact(uri)} holds a credential ({', '.join(found)}), which would reach the run's saved config, "
            "its logs or the dashboards: give the URI without it and the credential in the environment "
            "(MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, or MLFLOW_TRACKING_TOKEN)")
    return uri


def check_reachable(uri: str, timeout: float = PROBE_TIMEOUT_S) -> None:
    """An http(s) tracking server must answer (any HTTP status: authentication is MLflow's to check)
    within ``timeout`` seconds; a local store's folder must exist. Other schemes are left to MLflow."""
    parts = urlsplit(uri)
    if parts.scheme in ("http", "https"):
        probe = urlunsplit((parts.scheme, parts.netloc.rsplit("@", 1)[-1], parts.path.rstrip("/") + "/health", "",
                            ""))
        try:
            urllib.request.urlopen(probe, timeout=timeout).close()
        except urllib.error.HTTPError:
            pass   # it answered
        except (urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise TrackingError(f"the MLflow tracking server {redact(uri)} does not answer ({reason}; probed "
                                f"{redact(probe)} for {timeout:.0f} s): start it, or point MLFLOW_TRACKING_URI "
                                "(or logger.mlflow.tracking_uri) at a running one") from None
    elif parts.scheme == "sqlite":
        folder = Path(uri[len("sqlite:///"):]).parent   # sqlite:///relative.db, sqlite:////absolute.db
        if not folder.is_dir():
            raise TrackingError(f"the MLflow store {uri} lies in {folder}, which does not exist: create it first")


def check_run(uri: str, run_id: str, record: Path) -> None:
    """A resume continues the MLflow run its run dir records: that run must be on this server."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        run = MlflowClient(uri).get_run(run_id)
    except MlflowException as err:
        raise TrackingError(f"{record} records MLflow run {run_id}, which {redact(uri)} does not hold "
                            f"({err.error_code}): point MLFLOW_TRACKING_URI at the server the run was logged to, or "
                            "remove the file to continue in a new MLflow run") from None
    if run.info.lifecycle_stage == "deleted":
        raise TrackingError(f"{record} records MLflow run {run_id}, which was deleted on {redact(uri)}: restore it "
                            "(mlflow runs restore), or remove the file to continue in a new MLflow run")


def flat(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict) and node:
        out: dict[str, Any] = {}
        for k, v in node.items():
            out.update(flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: node}


def param_key(key: str) -> str:
    """MLflow's key alphabet (letters, digits, ``_ - . / `` and space), at most 250 characters."""
    return re.sub(r"[^A-Za-z0-9_\-./ ]", "_", key)[:250]


def params_of(settings: dict[str, Any]) -> dict[str, str]:
    """A row's settings as MLflow params: flattened dotted keys, values as JSON text (≤ 6000 characters)."""
    return {param_key(k): (v if isinstance(v, str) else json.dumps(v, default=str))[:6000]
            for k, v in flat(settings).items()}


def metrics_of(metrics: dict[str, Any]) -> dict[str, float]:
    """A row's finite numbers (values, interval bounds, counts, seconds)."""
    return {param_key(k): float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


class MLflowLogger(MLFlowLogger):
    """Lightning's ``MLFlowLogger`` for a run dir, and the writer of evaluation rows.

    Args:
        tracking_uri: the server (or store); None: ``MLFLOW_TRACKING_URI``. Never with a credential.
        experiment_name: the MLflow experiment; None: ``DEFAULT_EXPERIMENT`` (a sweep passes its group).
        run_name: the training run's name (a sweep cell's overrides); None: MLflow's.
        run_dir: where ``mlflow_run.json`` records the training's run id.
        resume: the run's ``ckpt_path``: when set, the run recorded in ``run_dir`` is continued.
        task: the task (``finetune_eval`` names its rows base / fine-tuned).
        tags: extra tags of every run.
    """

    def __init__(self, tracking_uri: str | None = None, experiment_name: str | None = None,
                 run_name: str | None = None, run_dir: str | None = None, resume: str | None = None,
                 task: str | None = None, tags: dict[str, str] | None = None) -> None:
        import importlib.util

        if importlib.util.find_spec("mlflow") is None:
            raise TrackingError("logger=mlflow needs MLflow's client: pip install -e \".[mlflow]\" (mlflow-skinny)")
        uri = resolve_uri(tracking_uri)
        check_reachable(uri)
        self.run_dir = Path(run_dir) if run_dir else None
        self.cell, self.task = run_name, task
        self.extra_tags = dict(tags or {})
        recorded = self.recorded_run() if resume else None
        if recorded is not None:
            check_run(uri, recorded, self.run_dir / RUN_FILE)
        super().__init__(experiment_name=experiment_name or DEFAULT_EXPERIMENT, run_name=run_name,
                         tracking_uri=uri, tags={**self.extra_tags, "toolkit.kind": "train"}, save_dir=None,
                         log_model=False, run_id=recorded)
        self._continued = recorded is not None
        self._written = False
        log.info("mlflow: %s, experiment %s%s", redact(uri), self._experiment_name,
                 f", continuing run {recorded}" if recorded else "")

    # ---- the training run --------------------------------------------------------------------------

    def recorded_run(self) -> str | None:
        f = self.run_dir / RUN_FILE if self.run_dir else None
        if f is None or not f.is_file():
            return None
        try:
            run_id = str(json.loads(f.read_text())["run_id"])
        except (ValueError, KeyError, TypeError) as err:
            raise TrackingError(f"{f} is not a run record ({err}): remove it to start a new MLflow run") from None
        if not re.fullmatch(r"[0-9a-f]{32}", run_id):
            raise TrackingError(f"{f} names run {run_id!r}, which is not an MLflow run id: remove the file to start "
                                "a new MLflow run")
        return run_id

    @property
    def experiment(self) -> Any:
        client = MLFlowLogger.experiment.fget(self)
        if self._run_id is not None and not self._written and self.run_dir is not None:
            self._written = True
            if self._continued:
                client.update_run(self._run_id, status="RUNNING")
            else:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                (self.run_dir / RUN_FILE).write_text(json.dumps(
                    {"run_id": self._run_id, "experiment_id": self._experiment_id,
                     "experiment": self._experiment_name, "tracking_uri": redact(self._tracking_uri)}, indent=1))
        return client

    def log_hyperparams(self, params: Any) -> None:
        """Each config key once per run: a continued run logs only new keys, and tags a changed
        value ``resumed.<key>`` (MLflow refuses a new value for a param)."""
        from argparse import Namespace

        from lightning.pytorch.utilities.rank_zero import rank_zero_only
        from mlflow.entities import Param, RunTag

        if rank_zero_only.rank != 0:
            return
        params = vars(params) if isinstance(params, Namespace) else dict(params)
        new = {param_key(k): str(v)[:6000] for k, v in flat(params).items()}
        client = self.experiment
        have = client.get_run(self.run_id).data.params if self._continued else {}
        fresh = [Param(k, v) for k, v in new.items() if k not in have]
        changed = [RunTag(f"resumed.{k}"[:250], v) for k, v in new.items() if k in have and have[k] != v]
        for i in range(0, max(len(fresh), len(changed)), 100):
            client.log_batch(self.run_id, params=fresh[i: i + 100], tags=changed[i: i + 100])

    # ---- evaluation rows ---------------------------------------------------------------------------

    def row_name(self, row: dict[str, Any]) -> str:
        """A row's run name: the sweep cell's overrides; in the default job ``base (no adapter)`` (one
        row for all cells of a sweep) and ``<cell>: fine-tuned``."""
        if "train" in row:
            return f"{self.cell}: fine-tuned" if self.cell else "fine-tuned"
        if self.task == "finetune_eval" or not self.cell:
            return "base (no adapter)" if not row["settings"].get("adapters") else "evaluation"
        return self.cell

    def log_row(self, row: dict[str, Any], artifacts: list[Path], lock: str | Path | None = None) -> str:
        """The evaluation ``row`` as a run of its own in the experiment, with ``artifacts``; returns its
        id. A row whose key is already in the experiment is not logged again (its run's id is returned).
        ``lock``: a lock file held from the look-up to the new run (the results table's: cells of a
        sweep that finish together, or share the base model's row, make one run per key)."""
        import contextlib

        from filelock import FileLock

        with FileLock(str(lock), timeout=600) if lock else contextlib.nullcontext():
            return self._log_row(row, artifacts)

    def _log_row(self, row: dict[str, Any], artifacts: list[Path]) -> str:
        from mlflow.entities import Metric, Param, RunTag
        from mlflow.tracking import MlflowClient

        client = MlflowClient(self._tracking_uri)
        exp = client.get_experiment_by_name(self._experiment_name)
        exp_id = exp.experiment_id if exp is not None and exp.lifecycle_stage != "deleted" else \
            client.create_experiment(self._experiment_name)
        found = client.search_runs([exp_id], filter_string=f"tags.`{KEY_TAG}` = '{row['key']}'", max_results=1)
        if found:
            log.info("mlflow: row %s is already run %s of experiment %s: not logged again", row["key"],
                     found[0].info.run_id, self._experiment_name)
            return found[0].info.run_id
        tags = {**self.extra_tags, KEY_TAG: row["key"], "toolkit.kind": "eval",
                "toolkit.run_dir": str(row.get("run_dir", ""))}
        run = client.create_run(exp_id, run_name=self.row_name(row), tags=tags)
        run_id = run.info.run_id
        try:
            params = [Param(k, v) for k, v in params_of(row["settings"]).items()]
            metrics = [Metric(k, v, 0, 0) for k, v in metrics_of(row["metrics"]).items()]
            for i in range(0, max(len(params), len(metrics)), 100):
                client.log_batch(run_id, metrics=metrics[i: i + 100], params=params[i: i + 100])
            client.log_batch(run_id, tags=[RunTag("toolkit.time", str(row.get("time", "")))])
            for f in artifacts:
                if Path(f).is_file():
                    client.log_artifact(run_id, str(f))
            client.log_text(run_id, json.dumps(row, indent=1, default=str), "row.json")
        except Exception:
            client.set_terminated(run_id, "FAILED")
            raise
        client.set_terminated(run_id, "FINISHED")
        log.info("mlflow: row %s logged as run %s/#/experiments/%s/runs/%s", row["key"], self._tracking_uri, exp_id,
                 run_id)
        return run_id

    def attach(self, row_key: str, files: list[Path]) -> None:
        """The job's report (and its other files) as artifacts of the run holding ``row_key`` and of the
        training run recorded in the run dir, once they are written."""
        from mlflow.tracking import MlflowClient

        client = MlflowClient(self._tracking_uri)
        exp = client.get_experiment_by_name(self._experiment_name)
        runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`{KEY_TAG}` = '{row_key}'",
                                  max_results=1) if exp is not None else []
        targets = [r.info.run_id for r in runs] + [r for r in [self.recorded_run()] if r]
        for run_id in targets:
            for f in files:
                if Path(f).is_file():
                    client.log_artifact(run_id, str(f))

