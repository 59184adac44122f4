"""MLflow behind four methods that never stop a run.

The run folder is the record; MLflow mirrors it. If the tracking store is unreachable at start, or fails mid-run,
the tracker warns once on stderr, stops talking to MLflow, and the run goes on: every number is still in the run
folder's ``metrics.jsonl``.

Store: ``MLFLOW_TRACKING_URI`` if set (e.g. a shared ``mlflow server``), else ``sqlite:///mlflow.db`` in the current
directory, which ``sslt ui`` and a plain ``mlflow ui`` started from the same directory both show.
"""
from __future__ import annotations

import numbers
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable

DEFAULT_URI = "sqlite:///mlflow.db"
_BAD_NAME_CHARACTER = re.compile(r"[^/\w.\- ]")
_MAX_NAME_LENGTH = 250  # MLflow's limit on metric, parameter and tag keys


def tracking_uri() -> str:
    """The store MLflow is pointed at."""
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


def metric_name(name: str) -> str:
    """A metric, parameter or tag name MLflow accepts: ``P@1`` -> ``P_at_1``, other characters outside
    ``[/\\w.\\- ]`` -> ``_``.

    MLflow also refuses a name that ``posixpath.normpath`` would change or that starts with ``/`` or ``..``
    (``test/``, ``a//b``, ``./a``, ``a/../b``): one refused name would end tracking for the whole run, so empty and
    ``.`` segments are dropped and a ``..`` segment or prefix becomes ``__``.
    """
    text = _BAD_NAME_CHARACTER.sub("_", name.replace("@", "_at_"))[:_MAX_NAME_LENGTH]
    cleaned = "/".join("__" if part == ".." else part for part in text.split("/") if part not in ("", "."))
    if cleaned.startswith(".."):
        cleaned = "__" + cleaned[2:]
    return cleaned or "_"


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


class Tracker:
    """start / log_metrics / log_artifacts / end, on one MLflow run; a no-op once disabled."""

    def __init__(self, enabled: bool = True, experiment: str = "sslt", uri: str | None = None,
                 warn: Callable[[str], None] = _warn):
        self.enabled = enabled
        self.experiment = experiment
        self.uri = uri or tracking_uri()
        self.run_id: str | None = None
        self._client: Any = None
        self._warn = warn

    def _fail(self, what: str, exc: BaseException) -> None:
        if self.enabled:
            self._warn(f"MLflow tracking at {self.uri} failed while {what} ({type(exc).__name__}: "
                       f"{str(exc).splitlines()[0][:200] if str(exc) else ''}); the run goes on and keeps every "
                       "number in its run folder")
        self.enabled = False

    def start(self, run_name: str, params: dict[str, Any] | None = None, tags: dict[str, str] | None = None,
              parent_run_id: str | None = None, run_id: str | None = None) -> str | None:
        """Start (or with ``run_id``, reopen) an MLflow run; returns its id or None if tracking is off/failed."""
        if not self.enabled:
            return None
        try:
            if self.uri.startswith(("http://", "https://")):
                os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
                os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
            import logging

            from mlflow.tracking import MlflowClient

            # the store's own INFO lines (table creation, migrations) are noise on the user's console; set after the
            # import, which configures mlflow's logger itself
            logging.getLogger("mlflow").setLevel(logging.WARNING)

            self._client = MlflowClient(tracking_uri=self.uri)
            if run_id is not None:
                self._client.update_run(run_id, status="RUNNING")
                self.run_id = run_id
                return run_id
            exp = self._client.get_experiment_by_name(self.experiment)
            exp_id = exp.experiment_id if exp is not None else self._client.create_experiment(self.experiment)
            all_tags = {metric_name(k): str(v) for k, v in (tags or {}).items()}
            all_tags["mlflow.runName"] = run_name
            if parent_run_id:
                all_tags["mlflow.parentRunId"] = parent_run_id
            run = self._client.create_run(exp_id, tags=all_tags, run_name=run_name)
            self.run_id = run.info.run_id
            if params:
                self.log_params(params)
            return self.run_id if self.enabled else None
        except Exception as exc:  # any store failure must not stop training
            self._fail("starting the run", exc)
            return None

    def log_params(self, params: dict[str, Any]) -> None:
        """Log parameters in batches: names made MLflow-safe, values as text truncated to MLflow's limit."""
        if not self.enabled or self.run_id is None:
            return
        try:
            from mlflow.entities import Param

            # A dict, so two names that clean to the same key do not make MLflow refuse the whole batch.
            cleaned = {metric_name(str(k)): str(v)[:6000] for k, v in params.items()}
            items = [Param(k, v) for k, v in cleaned.items()]
            for i in range(0, len(items), 100):
                self._client.log_batch(self.run_id, params=items[i:i + 100])
        except Exception as exc:
            self._fail("logging parameters", exc)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Log the finite real values at ``step`` in batches; names are made MLflow-safe.

        Python and numpy scalars count; anything else (a tensor: pass ``.item()``, a string, NaN, inf) is left out.
        """
        if not self.enabled or self.run_id is None:
            return
        try:
            import math
            import time

            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            items = [Metric(metric_name(k), float(v), now, int(step)) for k, v in metrics.items()
                     if isinstance(v, numbers.Real) and math.isfinite(float(v))]
            for i in range(0, len(items), 500):
                self._client.log_batch(self.run_id, metrics=items[i:i + 500])
        except Exception as exc:
            self._fail("logging metrics", exc)

    def log_artifacts(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Upload a file or a folder's files."""
        if not self.enabled or self.run_id is None:
            return
        path = Path(path)
        try:
            if path.is_dir():
                self._client.log_artifacts(self.run_id, str(path), artifact_path)
            elif path.is_file():
                self._client.log_artifact(self.run_id, str(path), artifact_path)
        except Exception as exc:
            self._fail(f"uploading {path}", exc)

    def set_tags(self, tags: dict[str, str]) -> None:
        """Set tags on the run (names made MLflow-safe, values as text)."""
        if not self.enabled or self.run_id is None:
            return
        try:
            for k, v in tags.items():
                self._client.set_tag(self.run_id, metric_name(str(k)), str(v))
        except Exception as exc:
            self._fail("setting tags", exc)

    def end(self, status: str = "FINISHED") -> None:
        """Close the run with ``FINISHED``, ``FAILED`` or ``KILLED``."""
        if not self.enabled or self.run_id is None:
            return
        try:
            self._client.set_terminated(self.run_id, status=status)
        except Exception as exc:
            self._fail("closing the run", exc)


class MetricsSink:
    """The one place a number is recorded: each call appends a record to the run's ``metrics.jsonl`` and logs the
    same numbers to MLflow. ``MetricsSink.null()`` (ranks other than 0 of a distributed run) does nothing, so the
    code that produces numbers never asks which process it is in. With ``run=None`` (``sslt eval`` of a bare
    checkpoint) only MLflow is written."""

    def __init__(self, run: Any, tracker: Tracker | None):
        self.run, self.tracker = run, tracker

    @classmethod
    def null(cls) -> "MetricsSink":
        return cls(None, None)

    def log(self, kind: str, step: int, values: dict[str, Any], *, fields: dict[str, Any] | None = None,
            mlflow: dict[str, float] | None = None) -> None:
        """Record ``{"kind": kind, "step": step, **fields, **values}`` in metrics.jsonl and log ``mlflow`` (default:
        ``values`` named ``<kind>/<name>``) to MLflow at ``step``."""
        if self.run is not None:
            self.run.append_metrics({"kind": kind, "step": step, **(fields or {}), **values})
        if self.tracker is not None:
            self.tracker.log_metrics(mlflow if mlflow is not None else {f"{kind}/{k}": v for k, v in values.items()},
                                     step)

    def artifact(self, path: str | Path, folder: str | None = None) -> None:
        """Upload a file or folder to the MLflow run, when it exists."""
        if self.tracker is not None and Path(path).exists():
            self.tracker.log_artifacts(path, folder)
