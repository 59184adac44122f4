"""MLflow behind four methods that never stop a run.

The run folder is the record; MLflow mirrors it. If the tracking store is unreachable at start, or fails mid-run,
the tracker warns once on stderr (one line, naming the root cause; MLflow's own error log is silenced), stops talking
to MLflow, and the run goes on: every number is still in the run folder's ``metrics.jsonl``, and ``sslt sync RUN``
(:func:`sync_run`) sends what the store is missing once it works again: every metric record (training, validation,
evaluations with their baselines, retrieval), the parameters, the tags and the artifacts (:func:`run_artifacts`).

A run folder records its MLflow run per store, under the store's absolute URI (``meta.json``: ``stores: {uri:
run_id}``; :func:`recorded_run_id`, :func:`record_store`), so one run folder can be mirrored in several stores and is
found again from any working folder.

A local sqlite store is created and migrated under a file lock beside it (``mlflow.db.lock``), so runs started at
the same moment in a fresh folder do not race MLflow's schema migration; a store that is already broken (a
half-finished migration) stops the command with :class:`TrackingStoreError`, which names it and says how to recover.

Store: ``MLFLOW_TRACKING_URI`` if set (e.g. a shared ``mlflow server``), else ``sqlite:///mlflow.db`` in the current
directory, which ``sslt ui`` and a plain ``mlflow ui`` started from the same directory both show.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import logging
import numbers
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

from sslt_cli.errors import SsltError

DEFAULT_URI = "sqlite:///mlflow.db"
_BAD_NAME_CHARACTER = re.compile(r"[^/\w.\- ]")
_MAX_NAME_LENGTH = 250  # MLflow's limit on metric, parameter and tag keys
STORE_LOCK_TIMEOUT_S = 300.0
SYNC_HINT = "send them to the store later with: sslt sync RUN_DIR"


class TrackingStoreError(SsltError):
    """The local MLflow store exists but cannot be opened or upgraded (e.g. a migration that was cut short)."""


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


def absolute_uri(uri: str) -> str:
    """``uri`` made independent of the folder sslt runs in: a sqlite database or a plain local path (a file store)
    resolved against the current folder (``sqlite:///mlflow.db`` -> ``sqlite:////home/me/project/mlflow.db``);
    other URIs (a server, ``file:///...``) as they are."""
    path = sqlite_path(uri)
    if path is not None:
        query = uri.split("?", 1)[1] if "?" in uri else ""
        return f"sqlite:///{path.expanduser().resolve()}" + (f"?{query}" if query else "")
    if "://" not in uri and not uri.startswith("file:") and uri:
        return Path(uri).expanduser().resolve().as_uri()
    return uri


def recorded_run_id(meta: dict, uri: str) -> str | None:
    """The MLflow run a run folder's ``meta.json`` records in store ``uri``: ``stores[<absolute uri>]``; a run folder
    of sslt before ``stores`` recorded one store (``mlflow_uri``, then relative to the folder sslt ran in, resolved
    against the current one) and its ``mlflow_run_id``."""
    uri = absolute_uri(uri)
    stores = meta.get("stores") or {}
    if stores:
        return stores.get(uri)
    legacy = meta.get("mlflow_uri")
    if meta.get("mlflow_run_id") and (legacy is None or absolute_uri(str(legacy)) == uri):
        return str(meta["mlflow_run_id"])
    return None


def record_store(run: Any, uri: str, run_id: str) -> None:
    """Record in ``run``'s ``meta.json`` that store ``uri`` holds it as ``run_id`` (``stores``, by absolute URI;
    ``mlflow_run_id`` / ``mlflow_uri`` name the store recorded last, as sslt before ``stores`` read them)."""
    meta = run.meta()
    stores = dict(meta.get("stores") or {})
    legacy = meta.get("mlflow_uri")
    if not stores and legacy and meta.get("mlflow_run_id"):
        stores[absolute_uri(str(legacy))] = meta["mlflow_run_id"]
    uri = absolute_uri(uri)
    stores[uri] = run_id
    run.update_meta(stores=stores, mlflow_run_id=run_id, mlflow_uri=uri)


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (relative to the current folder, or ``sqlite:////abs``), else None."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///"):].split("?", 1)[0]
    return Path(path) if path and path != ":memory:" else None


def unwritable_store(uri: str) -> str | None:
    """Why a local sqlite store cannot be written (its folder, or the database file, is not writable: a read-only
    working directory with the default ``sqlite:///mlflow.db``), or None. Checked before MLflow opens it, because
    MLflow retries a store it cannot create for about 100 s, with a warning line each time, before it gives up."""
    import errno
    import tempfile

    path = sqlite_path(uri)
    if path is None:
        return None
    folder = path.absolute().parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder, prefix=".sslt-probe-"):
            pass
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        if exc.errno == errno.EEXIST:
            reason = "a file is in the way"
        return f"cannot write into {folder}: {reason}"
    if path.exists() and not os.access(path, os.R_OK | os.W_OK):
        return f"cannot write to {path.absolute()}: permission denied, or the file is read-only"
    return None


def root_cause(exc: BaseException) -> BaseException:
    """The innermost exception of ``exc``'s cause/context chain (``sqlite3.OperationalError: attempt to write a
    readonly database`` rather than SQLAlchemy's "Query-invoked autoflush" wrapper around it)."""
    seen = {id(exc)}
    while True:
        inner = exc.__cause__ or exc.__context__
        if inner is None or id(inner) in seen:
            return exc
        seen.add(id(inner))
        exc = inner


def describe(exc: BaseException) -> str:
    """``Type: first line of the message`` of the root cause, at most 200 characters."""
    cause = root_cause(exc)
    text = str(cause).strip()
    first = text.splitlines()[0][:200] if text else ""
    return f"{type(cause).__name__}: {first}" if first else type(cause).__name__


_QUIET_LOGGERS = ("mlflow", "alembic")


@contextlib.contextmanager
def quiet_mlflow() -> Iterator[None]:
    """Hold MLflow's own log while sslt calls it: its ERROR lines with tracebacks on a store failure (the tracker
    reports a failure itself, once) and the INFO lines of a fresh store's creation (``Creating initial MLflow
    database tables...``, alembic's migration steps). MLflow sets its logger's level when it is first imported, so
    it is imported before the levels are raised."""
    importlib.import_module("mlflow")  # its import configures the "mlflow" logger: raise the levels after it
    loggers = [logging.getLogger(name) for name in _QUIET_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


@contextlib.contextmanager
def store_lock(uri: str) -> Iterator[None]:
    """For a sqlite store, an exclusive file lock beside the database (``<db>.lock``) while it is created, migrated
    or given its experiment: MLflow's migrations are not safe when several processes open a fresh store at once.
    Other stores (a server) need none. A folder where the lock cannot be created goes on without it (the store
    itself then fails to open and the tracker warns)."""
    path = sqlite_path(uri)
    if path is None:
        yield
        return
    from filelock import FileLock, Timeout

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(path) + ".lock", timeout=STORE_LOCK_TIMEOUT_S)
        lock.acquire()
    except Timeout:
        raise TimeoutError(f"another process held {path}.lock for {STORE_LOCK_TIMEOUT_S:.0f} s") from None
    except OSError:
        yield
        return
    try:
        yield
    finally:
        lock.release()


def open_client(uri: str) -> Any:
    """An ``MlflowClient`` whose store is open (created, migrated) now, inside :func:`store_lock`; an existing sqlite
    store that cannot be opened raises :class:`TrackingStoreError`."""
    from mlflow.tracking import MlflowClient

    path = sqlite_path(uri)
    existed = path is not None and path.is_file() and path.stat().st_size > 0
    try:
        client = MlflowClient(tracking_uri=uri)
        client.search_experiments(max_results=1)
        return client
    except Exception as exc:
        if not existed:
            raise
        cause = describe(exc)
        raise TrackingStoreError(
            f"the MLflow store {path.resolve()} cannot be opened ({cause[:150]}{'...' if len(cause) > 150 else ''}); "
            "it is half-migrated (runs started together by an older sslt) or was made by another MLflow version",
            [f"made by an older MLflow: back it up, then upgrade it in place: mlflow db upgrade {uri}",
             f"half-migrated: move it aside (mv {path} {path}.broken) and run again: a new store is created; the run "
             "folders keep every number, and `sslt sync RUN_DIR` sends a run's numbers to the new store",
             "or train without tracking: tracking.enabled=false"]) from None


def check_store(uri: str | None = None) -> None:
    """Open (create, migrate) a local sqlite store now, under its lock, before any work: a broken store raises
    :class:`TrackingStoreError` before a run folder is made. Any other failure is left to the tracker, which warns
    and lets the run go on; a server store is not contacted here."""
    uri = uri or tracking_uri()
    if sqlite_path(uri) is None or unwritable_store(uri):  # an unwritable store: the tracker says so at start
        return
    try:
        with quiet_mlflow(), store_lock(uri):
            open_client(uri)
    except TrackingStoreError:
        raise
    except Exception:  # noqa: BLE001 - reported by the tracker when the run starts
        return


_RECORD_FIELDS = ("kind", "step", "epoch", "set", "checkpoint", "protocol", "classes", "folder")


def record_metrics(record: dict) -> dict[str, float]:
    """The MLflow metrics a ``metrics.jsonl`` record was logged as (the names train, eval and retrieve use):
    ``eval/<set>-<checkpoint>-<protocol>/<k>`` for an evaluation (``test``: training's final one, ``eval``:
    ``sslt eval``'s; :func:`runs.eval_name`), retrieval's names as they are, and ``<kind>/<k>`` for every other kind
    (``train``, ``val``, ``learning_check``: :meth:`MetricsSink.log`'s default names)."""
    from sslt_cli.runs import eval_name

    kind = record.get("kind")
    values = {k: v for k, v in record.items() if k not in _RECORD_FIELDS and isinstance(v, numbers.Real)
              and not isinstance(v, bool)}
    if kind in ("test", "eval"):
        name = eval_name(str(record.get("set")), str(record.get("checkpoint")), str(record.get("protocol")))
        return {f"eval/{metric_name(name)}/{k}": v for k, v in values.items()}
    if kind == "retrieve":
        return values
    return {f"{kind}/{k}": v for k, v in values.items()} if isinstance(kind, str) and kind else {}


class Tracker:
    """start / log_metrics / log_artifacts / end, on one MLflow run; a no-op once disabled."""

    def __init__(self, enabled: bool = True, experiment: str = "sslt", uri: str | None = None,
                 warn: Callable[[str], None] = _warn):
        self.enabled = enabled
        self.experiment = experiment
        self.uri = absolute_uri(uri or tracking_uri())
        self.run_id: str | None = None
        self._client: Any = None
        self._warn = warn

    def _fail(self, what: str, exc: BaseException) -> None:
        if self.enabled:
            self._warn(f"MLflow tracking at {self.uri} failed while {what} ({describe(exc)}); the run goes on "
                       f"and keeps every number in its run folder ({SYNC_HINT})")
        self.enabled = False

    def start(self, run_name: str, params: dict[str, Any] | None = None, tags: dict[str, str] | None = None,
              parent_run_id: str | None = None, run_id: str | None = None) -> str | None:
        """Start (or with ``run_id``, reopen) an MLflow run; returns its id or None if tracking is off/failed."""
        if not self.enabled:
            return None
        unwritable = unwritable_store(self.uri)
        if unwritable:
            self._warn(f"MLflow tracking is off: the store {self.uri} is not writable ({unwritable}); the run goes on "
                       f"and keeps every number in its run folder (set MLFLOW_TRACKING_URI to a writable place, then "
                       f"{SYNC_HINT})")
            self.enabled = False
            return None
        try:
            if self.uri.startswith(("http://", "https://")):
                os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
                os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
            with quiet_mlflow(), store_lock(self.uri):
                self._client = open_client(self.uri)
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
        except TrackingStoreError:
            raise
        except Exception as exc:  # any other store failure must not stop training
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
            with quiet_mlflow():
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
            with quiet_mlflow():
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
            with quiet_mlflow():
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
            with quiet_mlflow():
                for k, v in tags.items():
                    self._client.set_tag(self.run_id, metric_name(str(k)), str(v))
        except Exception as exc:
            self._fail("setting tags", exc)

    def tag_run(self, run_id: str, tags: dict[str, str]) -> None:
        """Set tags on another run of this store without reopening it (an ablation's new parent run adopting the
        runs an earlier parent had: ``mlflow.parentRunId``)."""
        if not self.enabled or self._client is None:
            return
        try:
            with quiet_mlflow():
                for k, v in tags.items():
                    self._client.set_tag(run_id, metric_name(str(k)), str(v))
        except Exception as exc:
            self._fail(f"tagging run {run_id}", exc)

    def push_missing(self, records: list[dict]) -> int:
        """Log every number of ``records`` (``metrics.jsonl``'s objects) that the MLflow run does not hold yet at
        its step; returns how many were sent. Raises on a store failure (``sslt sync`` reports it)."""
        import math
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        wanted: dict[str, dict[int, float]] = {}
        for record in records:
            for name, value in record_metrics(record).items():
                wanted.setdefault(metric_name(name), {})[int(record.get("step", 0))] = float(value)
        missing = []
        with quiet_mlflow():
            for name, by_step in wanted.items():
                held = {m.step for m in self._client.get_metric_history(self.run_id, name)}
                missing += [Metric(name, v, now, step) for step, v in by_step.items()
                            if step not in held and math.isfinite(v)]
            for i in range(0, len(missing), 500):
                self._client.log_batch(self.run_id, metrics=missing[i:i + 500])
        return len(missing)

    def push_missing_params(self, params: dict[str, Any]) -> int:
        """Log the parameters of ``params`` the MLflow run does not hold (named and cut as :meth:`log_params`
        names them); returns how many. Raises on a store failure."""
        from mlflow.entities import Param

        with quiet_mlflow():
            held = set(self._client.get_run(self.run_id).data.params)
            items = [Param(k, v) for k, v in {metric_name(str(k)): str(v)[:6000] for k, v in params.items()}.items()
                     if k not in held]
            for i in range(0, len(items), 100):
                self._client.log_batch(self.run_id, params=items[i:i + 100])
        return len(items)

    def push_missing_tags(self, tags: dict[str, str]) -> int:
        """Set the tags of ``tags`` the MLflow run lacks or holds with another value; returns how many. Raises on a
        store failure."""
        with quiet_mlflow():
            held = self._client.get_run(self.run_id).data.tags
            missing = {metric_name(str(k)): str(v) for k, v in tags.items() if held.get(metric_name(str(k))) != str(v)}
            for k, v in missing.items():
                self._client.set_tag(self.run_id, k, v)
        return len(missing)

    def push_missing_artifacts(self, files: list[tuple[Path, str | None]]) -> int:
        """Upload each (file, artifact folder) of ``files`` that the MLflow run does not hold at that place with that
        size; returns how many. Raises on a store failure."""
        held: dict[str | None, dict[str, int | None]] = {}
        sent = 0
        with quiet_mlflow():
            for path, folder in files:
                if folder not in held:
                    held[folder] = {info.path: info.file_size for info in self._client.list_artifacts(self.run_id,
                                                                                                      folder)}
                key = f"{folder}/{path.name}" if folder else path.name
                if held[folder].get(key) != path.stat().st_size:
                    self._client.log_artifact(self.run_id, str(path), folder)
                    sent += 1
        return sent

    def catch_up(self, records: list[dict]) -> None:
        """On ``--resume``: send the numbers of ``records`` the MLflow run lacks (a store that failed during the
        earlier part of the run); a failure now warns like any other."""
        if not self.enabled or self.run_id is None:
            return
        try:
            self.push_missing(records)
        except Exception as exc:
            self._fail("sending the numbers it missed", exc)

    def end(self, status: str = "FINISHED") -> None:
        """Close the run with ``FINISHED``, ``FAILED`` or ``KILLED``."""
        if not self.enabled or self.run_id is None:
            return
        try:
            with quiet_mlflow():
                self._client.set_terminated(self.run_id, status=status)
        except Exception as exc:
            self._fail("closing the run", exc)


RUN_RECORD_FILES = ("config.yaml", "metrics.jsonl", "train.log", "meta.json", "skipped.csv")


def run_artifacts(run: Any) -> list[tuple[Path, str | None]]:
    """(file, artifact folder) of every file a run folder's MLflow run holds when its store never failed, as
    training, ``sslt eval`` and ``sslt retrieve`` upload them: the record files at the top (``config.yaml``,
    ``metrics.jsonl``, ``train.log``, ``meta.json``, ``skipped.csv``), validation's heatmaps under ``val``, each
    evaluation's folder under ``eval/<set>-<checkpoint>-<protocol>`` (named by its metrics.jsonl record), and the
    retrieval outputs under ``retrieve/...`` as they lie in the run's ``retrieve/`` (its embedding cache left out)."""
    from sslt_cli.runs import eval_name

    files: list[tuple[Path, str | None]] = [(run.dir / name, None) for name in RUN_RECORD_FILES
                                            if (run.dir / name).is_file()]
    files += [(path, "val") for path in sorted((run.dir / "val").glob("*.png"))]
    seen: set[Path] = set()
    for record in run.metrics():
        folder = Path(str(record.get("folder") or ""))
        if record.get("kind") not in ("test", "eval") or not record.get("folder") or not folder.is_dir() \
                or folder in seen:
            continue
        seen.add(folder)
        name = metric_name(eval_name(str(record.get("set")), str(record.get("checkpoint")),
                                     str(record.get("protocol"))))
        files += _folder_files(folder, f"eval/{name}")
    retrieved = run.dir / "retrieve"
    files += [(path, where) for path, where in _folder_files(retrieved, "retrieve")
              if not (path.suffix == ".pt" and path.parent == retrieved)]
    return files


def _folder_files(folder: Path, base: str) -> list[tuple[Path, str | None]]:
    """(file, ``base``/its folder relative to ``folder``) for every file under ``folder``, as MLflow's
    ``log_artifacts(folder, base)`` places them."""
    if not folder.is_dir():
        return []
    return [(path, "/".join([base, *path.parent.relative_to(folder).parts]))
            for path in sorted(folder.rglob("*")) if path.is_file()]


def run_tags(run: Any, recipe: Any) -> dict[str, str]:
    """The tags every run folder's MLflow run carries from its creation."""
    return {"sslt.run_dir": str(run.dir.resolve()), "sslt.recipe": recipe.name}


class MetricsSink:
    """The one place a number is recorded, and the handle of one MLflow run: each :meth:`log` appends a record to the
    run folder's ``metrics.jsonl`` and logs the same numbers to MLflow. ``MetricsSink.null()`` (ranks other than 0
    of a distributed run) does nothing, so the code that produces numbers never asks which process it is in. With
    ``run=None`` (``sslt eval`` of precomputed maps or of a checkpoint outside a run folder) only MLflow is written.

    Whoever opened the MLflow run (:func:`run_tracking`, :func:`standalone_tracking`) closes it with :meth:`end`;
    the code it hands the sink to (training, evaluation, retrieval) only records through it."""

    def __init__(self, run: Any, tracker: Tracker | None):
        self.run, self.tracker = run, tracker
        self.ended = False

    @classmethod
    def null(cls) -> "MetricsSink":
        return cls(None, None)

    @property
    def run_id(self) -> str | None:
        """The MLflow run's id (None: no tracking, or the store failed)."""
        return self.tracker.run_id if self.tracker is not None and self.tracker.enabled else None

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

    def tag(self, tags: dict[str, str]) -> None:
        """Set tags on the MLflow run (the run folder keeps the same facts in meta.json)."""
        if self.tracker is not None:
            self.tracker.set_tags(tags)

    def catch_up(self) -> None:
        """Send the numbers of the run folder's metrics.jsonl that the MLflow run lacks (a store that failed earlier
        in the run); training calls it on resume, once the replayed steps are cut from the file."""
        if self.run is not None and self.tracker is not None:
            self.tracker.catch_up(self.run.metrics())

    def end(self, status: str = "FINISHED") -> None:
        """Close the MLflow run with ``FINISHED``, ``FAILED`` or ``KILLED`` (once; later calls do nothing)."""
        if not self.ended and self.tracker is not None:
            self.tracker.end(status)
        self.ended = True


def start_tracking(name: str, *, enabled: bool = True, experiment: str = "sslt", params: dict[str, Any] | None = None,
                   tags: dict[str, str] | None = None, parent_run_id: str | None = None, run_id: str | None = None,
                   warn: Callable[[str], None] = _warn) -> Tracker:
    """The one place a :class:`Tracker` is made: its MLflow run created (``name``, ``params``, ``tags`` and
    ``parent_run_id`` at creation) or, with ``run_id``, reopened (``tags`` then set on it). A store that fails warns
    once through ``warn`` and leaves a disabled tracker."""
    tracker = Tracker(enabled=enabled, experiment=experiment, warn=warn)
    started = tracker.start(name, params=params, tags=None if run_id else tags, parent_run_id=parent_run_id,
                            run_id=run_id)
    if run_id is not None and started is not None and tags:
        tracker.set_tags(tags)
    return tracker


def open_run_tracking(run: Any, recipe: Any, *, parent_run_id: str | None = None, tags: dict[str, str] | None = None,
                      warn: Callable[[str], None] | None = None) -> MetricsSink:
    """The MLflow run of a run folder, opened by whoever created the folder or works in it (``sslt train``,
    ``sslt ablate``, ``sslt eval RUN``, ``sslt retrieve RUN``), and the sink that records into both.

    The run that ``meta.json`` names in this store (:func:`recorded_run_id`) is reopened (``tags`` set on it); else one is created, named after
    the folder, with the recipe's parameters, the tags ``sslt.run_dir``, ``sslt.recipe`` and ``tags``, a child of
    ``parent_run_id`` from its creation, and its id recorded in meta.json with ``config.yaml`` uploaded. A store
    failure warns through ``warn`` (default: stderr and the run's train.log) and the sink records metrics.jsonl only.
    """
    from sslt_cli.config import flatten, recipe_dict

    warn = warn or (lambda message: (_warn(message), run.log(f"warning: {message}")))
    meta = run.meta()
    run_id = recorded_run_id(meta, tracking_uri())
    all_tags = {**run_tags(run, recipe), **(tags or {})}
    tracker = start_tracking(run.dir.name, enabled=recipe.tracking.enabled, experiment=recipe.tracking.experiment,
                             params=None if run_id else flatten(recipe_dict(recipe)),
                             tags=all_tags if run_id is None else tags, parent_run_id=parent_run_id, run_id=run_id,
                             warn=warn)
    sink = MetricsSink(run, tracker)
    if sink.run_id is not None and run_id is None:
        record_store(run, tracker.uri, sink.run_id)
        sink.artifact(run.dir / "config.yaml")
    return sink


@contextlib.contextmanager
def _closing(sink: MetricsSink) -> Iterator[MetricsSink]:
    """Yield ``sink``; close its MLflow run on the way out: ``KILLED`` on an interrupt, ``FAILED`` on another
    exception, else ``FINISHED`` unless the caller ended it with its own status."""
    try:
        yield sink
    except KeyboardInterrupt:
        sink.end("KILLED")
        raise
    except BaseException:
        sink.end("FAILED")
        raise
    sink.end("FINISHED")


@contextlib.contextmanager
def run_tracking(run: Any, recipe: Any, *, main: bool = True, parent_run_id: str | None = None,
                 tags: dict[str, str] | None = None, warn: Callable[[str], None] | None = None
                 ) -> Iterator[MetricsSink]:
    """:func:`open_run_tracking` as a context (closed as :func:`_closing` says); a null sink when not ``main`` (ranks
    other than 0 under torchrun: only rank 0 tracks)."""
    with _closing(open_run_tracking(run, recipe, parent_run_id=parent_run_id, tags=tags, warn=warn) if main
                  else MetricsSink.null()) as sink:
        yield sink


@contextlib.contextmanager
def standalone_tracking(name: str, *, enabled: bool = True, experiment: str = "sslt",
                        params: dict[str, Any] | None = None, tags: dict[str, str] | None = None
                        ) -> Iterator[MetricsSink]:
    """An MLflow run of its own for numbers that belong to no run folder (``sslt eval`` of precomputed maps or of a
    checkpoint file, ``sslt retrieve CHECKPOINT``); the sink writes MLflow only."""
    tracker = start_tracking(name, enabled=enabled, experiment=experiment, params=params, tags=tags)
    with _closing(MetricsSink(None, tracker)) as sink:
        yield sink


@dataclasses.dataclass(frozen=True)
class SyncReport:
    """What :func:`sync_run` sent to one store: metric values, parameters, tags, artifact files; the run's id there,
    the store's absolute URI, whether the run was created there now, and the status it was closed with (or None)."""

    run_id: str
    uri: str
    created: bool
    metrics: int
    params: int
    tags: int
    artifacts: int
    status: str | None


def sync_run(run: Any) -> SyncReport:
    """``sslt sync``: make the current store hold all of ``run``: its MLflow run there (the one ``meta.json``
    records for this store, else a new one, recorded under the store's absolute URI), every metric record of
    ``metrics.jsonl`` (training, validation, evaluations with their baselines, retrieval), the recipe's parameters,
    the run's tags and artifacts (:func:`run_artifacts`), each sent only when the store lacks it, so a second sync
    sends nothing and a sync to another store and back duplicates nothing; the run closed with the folder's status.
    An SsltError when the store cannot be reached or fails on the way (sending again later sends only the rest)."""
    from sslt_cli.config import flatten, recipe_dict

    meta, recipe = run.meta(), run.recipe()
    problems: list[str] = []
    uri = absolute_uri(tracking_uri())
    run_id = recorded_run_id(meta, uri)
    params, tags = flatten(recipe_dict(recipe)), run_tags(run, recipe)
    tracker = start_tracking(run.dir.name, experiment=recipe.tracking.experiment,
                             params=None if run_id else params, run_id=run_id, tags=None if run_id else tags,
                             warn=problems.append)
    if tracker.run_id is None or problems:
        raise SsltError(f"{run.dir}: could not reach the MLflow store {uri}", problems)
    if run_id is None:
        record_store(run, uri, tracker.run_id)
    try:
        counts = (tracker.push_missing(run.metrics()), tracker.push_missing_params(params),
                  tracker.push_missing_tags(tags), tracker.push_missing_artifacts(run_artifacts(run)))
    except Exception as exc:
        raise SsltError(f"{run.dir}: the MLflow store {uri} failed while receiving the run ({describe(exc)})",
                        ["run `sslt sync` again once the store works: only what it lacks is sent"]) from None
    status = {"finished": "FINISHED", "failed": "FAILED", "interrupted": "KILLED"}.get(str(meta.get("status")))
    if status:
        tracker.end(status)
    if problems:
        raise SsltError(f"{run.dir}: {counts[0]} values sent, then the MLflow store {uri} failed", problems)
    return SyncReport(tracker.run_id, uri, run_id is None, *counts, status)
@contextlib.contextmanager
def child_tracking(name: str, *, parent_run_id: str | None, tags: dict[str, str] | None = None,
                   enabled: bool = True, experiment: str = "sslt") -> Iterator[MetricsSink]:
    """An MLflow run of its own, a child of ``parent_run_id`` from its creation, for numbers of no run folder
    (``sslt compare``: one per model under the comparison's run); the sink writes MLflow only."""
    tracker = start_tracking(name, enabled=enabled, experiment=experiment, tags=tags, parent_run_id=parent_run_id)
    with _closing(MetricsSink(None, tracker)) as sink:
        yield sink
