"""MLflow tracking: safe names, a real sqlite store, an unreachable store, a store failing mid-run, a real server."""
from __future__ import annotations

import math
import os
import posixpath
import random
import re
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import requests

from sslt_cli.runs import Run
from sslt_cli.tracking import DEFAULT_URI, MetricsSink, Tracker, metric_name, tracking_uri

MLFLOW_NAME = re.compile(r"^[/\w.\- ]*$")


def mlflow_accepts(name: str) -> bool:
    """MLflow's rules for metric, parameter and tag names: its characters, and a path that normalises to itself."""
    normalised = posixpath.normpath(name)
    return (bool(MLFLOW_NAME.fullmatch(name)) and normalised == name and normalised != "."
            and not normalised.startswith(("..", "/")))


class Warnings(list):
    """Collects the tracker's warnings (used as its ``warn`` callback)."""

    def __call__(self, message: str) -> None:
        self.append(message)


# --- names ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("raw", "clean"), [
    ("P@1", "P_at_1"), ("test/a2i_P@10", "test/a2i_P_at_10"), ("val/ciou", "val/ciou"),
    ("loss (total)", "loss _total_"),
    ("mAP%", "mAP_"), ("test/", "test"), ("a//b", "a/b"), ("./a", "a"), ("a/../b", "a/__/b"), ("/abs", "abs"),
    ("..x", "__x"), ("", "_"), (".", "_"), ("a:b", "a_b"), ("line\nbreak", "line_break"),
])
def test_metric_name(raw: str, clean: str) -> None:
    assert metric_name(raw) == clean
    assert mlflow_accepts(clean)


def test_metric_names_are_always_accepted() -> None:
    rng = random.Random(0)
    alphabet = "ab/.@ -_:%\n\té1"
    for _ in range(2000):
        raw = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))
        assert mlflow_accepts(metric_name(raw)), (raw, metric_name(raw))
    assert len(metric_name("x" * 400)) == 250


def test_tracking_uri(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://example:5000")
    assert tracking_uri() == "http://example:5000"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert tracking_uri() == DEFAULT_URI == "sqlite:///mlflow.db"


# --- a real sqlite store --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def store_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One sqlite store for the module (creating its tables takes seconds); each test uses its own experiment."""
    return f"sqlite:///{tmp_path_factory.mktemp('store') / 'store.db'}"


def test_params_metrics_and_artifacts_arrive(store_uri: str, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    uri = store_uri
    warnings = Warnings()
    tracker = Tracker(experiment="arrive", uri=uri, warn=warnings)
    params = {"optim.lr": 1e-4, "optim.batch_size": 32, "data.holdout_classes": ["dog", "cat"],
              "data.test.vgg@ss": "a"}
    run_id = tracker.start("run-1", params=params, tags={"sslt.run_dir": "/x/run-1"})
    assert run_id is not None and tracker.run_id == run_id
    tracker.log_metrics({"train/loss": 1.5, "val/cIoU@0.5": np.float32(0.25), "test/": 2, "nan": math.nan,
                         "text": "x"}, step=3)
    tracker.log_metrics({"train/loss": 1.25}, step=4)
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "a.txt").write_text("a")
    (tmp_path / "config.yaml").write_text("name: t\n")
    tracker.log_artifacts(tmp_path / "config.yaml")
    tracker.log_artifacts(tmp_path / "folder", "eval")
    tracker.set_tags({"sslt.status": "done"})
    tracker.end()
    assert warnings == []

    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(run_id)
    assert run.data.params == {"optim.lr": "0.0001", "optim.batch_size": "32", "data.holdout_classes": "['dog', 'cat']",
                               "data.test.vgg_at_ss": "a"}
    assert run.data.metrics == {"train/loss": 1.25, "val/cIoU_at_0.5": 0.25, "test": 2.0}
    history = client.get_metric_history(run_id, "train/loss")
    assert sorted((m.step, m.value) for m in history) == [(3, 1.5), (4, 1.25)]
    assert (run.info.status, run.info.run_name) == ("FINISHED", "run-1")
    assert run.data.tags["sslt.run_dir"] == "/x/run-1" and run.data.tags["sslt.status"] == "done"
    assert client.get_experiment(run.info.experiment_id).name == "arrive"
    assert sorted(f.path for f in client.list_artifacts(run_id)) == ["config.yaml", "eval"]
    assert [f.path for f in client.list_artifacts(run_id, "eval")] == ["eval/a.txt"]

    resumed = Tracker(experiment="arrive", uri=uri, warn=warnings)
    assert resumed.start("run-1", run_id=run_id) == run_id
    resumed.log_metrics({"train/loss": 1.0}, step=5)
    resumed.end("KILLED")
    assert sorted(m.step for m in client.get_metric_history(run_id, "train/loss")) == [3, 4, 5]
    assert client.get_run(run_id).info.status == "KILLED"
    assert warnings == []


def test_a_disabled_tracker_does_nothing(tmp_path: Path) -> None:
    warnings = Warnings()
    tracker = Tracker(enabled=False, warn=warnings)
    assert tracker.start("run", params={"a": 1}) is None
    tracker.log_metrics({"a": 1.0}, step=1)
    tracker.end()
    assert warnings == [] and not (tmp_path / "mlflow.db").exists()


# --- failures -------------------------------------------------------------------------------------------------------

@pytest.fixture
def no_retry_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Unset MLflow's HTTP retry settings (the tracker sets its own) and restore them after the test."""
    for name in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("port", ["closed", "9"])
def test_an_unreachable_store_warns_once_and_does_not_hang(port: str, free_port: int, no_retry_settings,
                                                           capsys: pytest.CaptureFixture) -> None:
    uri = f"http://127.0.0.1:{free_port if port == 'closed' else port}"
    tracker = Tracker(uri=uri)
    began = time.monotonic()
    assert tracker.start("run", params={"optim.lr": 1e-4}) is None
    # MLflow's default (7 retries with exponential backoff) would take minutes.
    assert time.monotonic() - began < 30
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "0"
    tracker.log_params({"a": 1})
    tracker.log_metrics({"loss": 1.0}, step=1)
    tracker.log_artifacts(Path(__file__))
    tracker.set_tags({"a": "b"})
    tracker.end("FAILED")
    assert tracker.run_id is None and not tracker.enabled
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"warning: MLflow tracking at {uri} failed while starting the run (")
    assert lines[0].endswith("); the run goes on and keeps every number in its run folder (send them to the store "
                             "later with: sslt sync RUN_DIR)")


def test_a_store_failing_mid_run_warns_once_and_the_run_goes_on(store_uri: str,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow.tracking import MlflowClient

    uri = store_uri
    warnings = Warnings()
    tracker = Tracker(experiment="mid-run", uri=uri, warn=warnings)
    run_id = tracker.start("run", params={"a": 1})
    tracker.log_metrics({"loss": 2.0}, step=1)

    calls = []

    def store_gone(*args, **kwargs):
        calls.append(args)
        raise ConnectionError("store went away\nsecond line")

    for method in ("log_batch", "log_artifact", "log_artifacts", "set_tag", "set_terminated"):
        monkeypatch.setattr(tracker._client, method, store_gone)
    tracker.log_metrics({"loss": 1.0}, step=2)
    tracker.log_metrics({"loss": 0.5}, step=3)
    tracker.log_params({"b": 2})
    tracker.log_artifacts(Path(__file__))
    tracker.set_tags({"a": "b"})
    tracker.end()
    assert len(calls) == 1
    assert warnings == [f"MLflow tracking at {uri} failed while logging metrics (ConnectionError: store went away); "
                        "the run goes on and keeps every number in its run folder (send them to the store later with: "
                        "sslt sync RUN_DIR)"]
    history = MlflowClient(tracking_uri=uri).get_metric_history(run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(1, 2.0)]


def test_a_failure_while_logging_start_params_returns_none(store_uri: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow.tracking

    def refuse(self, *args, **kwargs):
        raise RuntimeError("refused")

    monkeypatch.setattr(mlflow.tracking.MlflowClient, "log_batch", refuse)
    warnings = Warnings()
    tracker = Tracker(experiment="start-params", uri=store_uri, warn=warnings)
    assert tracker.start("run", params={"a": 1}) is None
    assert len(warnings) == 1 and "failed while logging parameters (RuntimeError: refused)" in warnings[0]


# --- a real MLflow server on loopback -------------------------------------------------------------------------------

@pytest.fixture
def mlflow_server(serve, tmp_path: Path, free_port: int) -> str:
    """``mlflow server`` on 127.0.0.1 with a sqlite store in tmp_path; its base URL (stopped at teardown)."""
    base = f"http://127.0.0.1:{free_port}"
    serve([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(free_port), "--workers", "1",
           "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
           "--default-artifact-root", str(tmp_path / "artifacts")], f"{base}/health")
    return base


@pytest.mark.timeout(240)
def test_a_run_arrives_at_a_real_mlflow_server(mlflow_server: str, tmp_path: Path) -> None:
    warnings = Warnings()
    tracker = Tracker(experiment="server-test", uri=mlflow_server, warn=warnings)
    run_id = tracker.start("served", params={"optim.lr": 1e-4, "seed": 4})
    assert run_id is not None, warnings
    tracker.log_metrics({"train/loss": 2.0, "test/a2i_P@1": 0.5}, step=1)
    tracker.log_metrics({"train/loss": 1.5}, step=2)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    tracker.log_artifacts(tmp_path / "metrics.jsonl")
    tracker.end()
    assert warnings == []

    run = requests.get(f"{mlflow_server}/api/2.0/mlflow/runs/get", params={"run_id": run_id}, timeout=10).json()["run"]
    assert {p["key"]: p["value"] for p in run["data"]["params"]} == {"optim.lr": "0.0001", "seed": "4"}
    assert {m["key"]: (m["value"], m["step"]) for m in run["data"]["metrics"]} == {
        "train/loss": (1.5, 2), "test/a2i_P_at_1": (0.5, 1)}
    assert run["info"]["status"] == "FINISHED"
    history = requests.get(f"{mlflow_server}/api/2.0/mlflow/metrics/get-history",
                           params={"run_id": run_id, "metric_key": "train/loss"}, timeout=10).json()["metrics"]
    assert sorted((m["step"], m["value"]) for m in history) == [(1, 2.0), (2, 1.5)]
    files = requests.get(f"{mlflow_server}/api/2.0/mlflow/artifacts/list", params={"run_id": run_id},
                         timeout=10).json()["files"]
    assert [f["path"] for f in files] == ["metrics.jsonl"]


# --- the metrics sink ---------------------------------------------------------------------------------------------

def test_the_sink_writes_the_run_file_and_mlflow_in_one_call(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    from sslt_cli.config import Recipe

    run = Run.create(Recipe(), runs_dir=tmp_path / "runs", argv=[])
    tracker = Tracker(experiment="sink")
    run_id = tracker.start("sink")
    sink = MetricsSink(run, tracker)
    sink.log("train", 3, {"loss": 1.5, "lr": 0.001}, fields={"epoch": 0})
    sink.log("test", 3, {"ciou": 0.25}, fields={"set": "vggss"}, mlflow={"test_vggss/last/ciou": 0.25})
    sink.artifact(run.dir / "config.yaml")
    sink.artifact(run.dir / "no-such-file.png")  # a missing artifact is left out, not an error
    tracker.end()

    assert run.metrics() == [{"kind": "train", "step": 3, "epoch": 0, "loss": 1.5, "lr": 0.001},
                             {"kind": "test", "step": 3, "set": "vggss", "ciou": 0.25}]
    client = MlflowClient(tracking_uri=os.environ["MLFLOW_TRACKING_URI"])
    logged = client.get_run(run_id).data.metrics
    assert logged == {"train/loss": 1.5, "train/lr": 0.001, "test_vggss/last/ciou": 0.25}
    assert [a.path for a in client.list_artifacts(run_id)] == ["config.yaml"]


def test_the_null_sink_writes_nothing(tmp_path: Path) -> None:
    sink = MetricsSink.null()
    sink.log("train", 1, {"loss": 1.0})
    sink.artifact(tmp_path)
    assert list(tmp_path.iterdir()) == []


# --- a quiet store ----------------------------------------------------------------------------------------------------

def test_a_fresh_store_is_created_without_mlflows_info_lines(tmp_path: Path) -> None:
    """MLflow (and alembic) print INFO lines while they create and migrate a new sqlite store; sslt keeps them off
    the console: a command on a fresh store prints its own lines only."""
    import json
    import subprocess

    from sslt_cli.catalog import RESOURCES_DIR

    ids = [record["file"] for record in json.loads((RESOURCES_DIR / "vggss.json").read_text())[:6]]
    (tmp_path / "six.txt").write_text("\n".join(ids) + "\n")
    store = tmp_path / "fresh" / "mlflow.db"
    result = subprocess.run([sys.executable, "-m", "sslt_cli", "eval", "--baselines-only", "--vggss-json", "vggss",
                             "--list", "six.txt"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{store}"})
    assert result.returncode == 0, result.stderr
    assert store.is_file() and store.stat().st_size > 0  # the store was created by this command
    for line in ("Creating initial MLflow database tables", "Updating database tables", "alembic",
                 "Context impl SQLiteImpl", " INFO "):
        assert line not in result.stderr, result.stderr
    assert "6 requested = 6 scored" in result.stderr


# --- who opens a run ------------------------------------------------------------------------------------------------

def test_evaluation_records_are_named_as_their_folders_in_mlflow() -> None:
    from sslt_cli.tracking import record_metrics

    record = {"kind": "test", "step": 4, "set": "vggss", "checkpoint": "best", "protocol": "ssltie",
              "folder": "/runs/r/eval/vggss-best-ssltie", "n": 8, "ciou": 0.25, "baseline_centre/auc": 0.4}
    assert record_metrics(record) == {"eval/vggss-best-ssltie/n": 8, "eval/vggss-best-ssltie/ciou": 0.25,
                                      "eval/vggss-best-ssltie/baseline_centre/auc": 0.4}
    assert record_metrics({**record, "kind": "eval", "protocol": "lvs"})["eval/vggss-best-lvs/ciou"] == 0.25


def test_the_run_folders_tracking_is_opened_once_with_its_parent_and_tags_and_closed_with_the_outcome(
        tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    from sslt_cli.config import Recipe
    from sslt_cli.tracking import run_tracking, start_tracking

    recipe = Recipe(name="owned", runs_dir=str(tmp_path / "runs"))
    run = Run.create(recipe)
    parent = start_tracking("parent").run_id
    with run_tracking(run, recipe, parent_run_id=parent, tags={"sslt.cell": "A-seed4"}) as sink:
        sink.log("train", 1, {"loss": 1.5})
        sink.end("KILLED")  # the caller's status wins over the default
    client = MlflowClient(tracking_uri=tracking_uri())
    created = client.get_run(run.meta()["mlflow_run_id"])
    assert (created.info.status, created.data.tags["mlflow.parentRunId"]) == ("KILLED", parent)
    assert created.data.tags["sslt.cell"] == "A-seed4" and created.data.params["optim.lr"] == "0.0001"
    assert created.data.metrics["train/loss"] == 1.5 and run.metrics() == [{"kind": "train", "step": 1, "loss": 1.5}]
    # a second opening (resume, sslt eval RUN) reopens the same MLflow run; an exception closes it FAILED
    with pytest.raises(RuntimeError), run_tracking(run, recipe) as again:
        assert again.run_id == created.info.run_id
        raise RuntimeError("boom")
    assert client.get_run(created.info.run_id).info.status == "FAILED"
    assert len(client.search_runs([created.info.experiment_id])) == 2  # the parent and this run, nothing more
    with run_tracking(run, recipe, main=False) as null:  # ranks other than 0: nothing recorded anywhere
        null.log("train", 2, {"loss": 1.0})
    assert len(run.metrics()) == 1
