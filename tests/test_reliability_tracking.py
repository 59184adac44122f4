"""The MLflow store under concurrent starts, a broken store, a store turning read-only mid-run, and `sslt sync`."""
from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sslt_cli.tracking import Tracker, TrackingStoreError, root_cause

STARTER = textwrap.dedent("""
    import json, os, sys, time
    import mlflow.tracking  # the slow import first, so the processes reach the store together
    from sslt_cli.tracking import Tracker
    go = sys.argv[2]
    while not os.path.exists(go):
        time.sleep(0.01)
    warnings = []
    tracker = Tracker(uri=sys.argv[1], experiment="together", warn=warnings.append)
    run_id = tracker.start(f"run-{os.getpid()}", params={"a": 1})
    tracker.log_metrics({"loss": 1.0}, step=1)
    tracker.end()
    print(json.dumps({"run_id": run_id, "warnings": warnings}))
""")


SECOND_START = textwrap.dedent("""
    import sys
    from sslt_cli.tracking import Tracker, TrackingStoreError
    try:
        Tracker(uri=sys.argv[1], warn=print).start("second")
    except TrackingStoreError as exc:
        print(exc.render())
""")


@pytest.mark.timeout(240)
def test_four_processes_starting_at_once_on_a_fresh_store_all_arrive(tmp_path: Path) -> None:
    import json

    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'fresh' / 'mlflow.db'}"
    go = tmp_path / "go"
    processes = [subprocess.Popen([sys.executable, "-c", STARTER, uri, str(go)], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(4)]
    time.sleep(0.5)
    go.touch()
    results = []
    for process in processes:
        stdout, stderr = process.communicate(timeout=200)
        assert process.returncode == 0, stderr
        results.append(json.loads(stdout.strip().splitlines()[-1]))
    assert [r["warnings"] for r in results] == [[]] * 4
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("together").experiment_id])
    assert sorted(r.info.run_id for r in runs) == sorted(r["run_id"] for r in results)
    assert all(r.data.metrics == {"loss": 1.0} and r.info.status == "FINISHED" for r in runs)
    assert (tmp_path / "fresh" / "mlflow.db.lock").exists()


def test_a_broken_store_is_one_clear_error(tmp_path: Path) -> None:
    db = tmp_path / "mlflow.db"
    uri = f"sqlite:///{db}"
    assert Tracker(uri=uri, warn=pytest.fail).start("first") is not None
    # what a migration cut short by a concurrent one leaves: the schema of today, the revision of an older store
    with sqlite3.connect(db) as connection:
        connection.execute("UPDATE alembic_version SET version_num = '451aebb31d03'")
    # a new process, as every later run is (MLflow keeps a store it opened once per process)
    second = subprocess.run([sys.executable, "-c", SECOND_START, uri], capture_output=True, text=True, timeout=120)
    assert second.returncode == 0, second.stderr
    assert second.stderr == ""
    lines = second.stdout.splitlines()
    assert lines[0].startswith(f"the MLflow store {db.resolve()} cannot be opened (MlflowException: Detected "
                               "out-of-date database schema (found version 451aebb31d03")
    assert lines[0].endswith("...); it is half-migrated (runs started together by an older sslt) or was made by "
                             "another MLflow version")
    assert lines[1:] == [
        f"  - made by an older MLflow: back it up, then upgrade it in place: mlflow db upgrade {uri}",
        f"  - half-migrated: move it aside (mv {db} {db}.broken) and run again: a new store is created; the run "
        "folders keep every number, and `sslt sync RUN_DIR` sends a run's numbers to the new store",
        "  - or train without tracking: tracking.enabled=false"]


def test_sslt_train_on_a_broken_store_stops_before_making_a_run_folder(isolated_workdir: Path) -> None:
    db = isolated_workdir / "mlflow.db"
    assert Tracker(uri=os.environ["MLFLOW_TRACKING_URI"], warn=pytest.fail).start("first") is not None
    with sqlite3.connect(db) as connection:
        connection.execute("UPDATE alembic_version SET version_num = '451aebb31d03'")
    Path("recipe.yaml").write_text(f"name: t\nruns_dir: {isolated_workdir / 'runs'}\n")
    result = subprocess.run([sys.executable, "-m", "sslt_cli", "train", "recipe.yaml"], capture_output=True,
                            text=True, timeout=120, env={**os.environ, "NO_COLOR": "1", "COLUMNS": "400"})
    assert result.returncode == 1
    assert result.stderr.startswith(f"error: the MLflow store {db} cannot be opened (MlflowException: ")
    assert f"  - half-migrated: move it aside (mv {db} {db}.broken) and run again" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (isolated_workdir / "runs").exists()


def test_root_cause_is_the_innermost_exception() -> None:
    try:
        try:
            raise sqlite3.OperationalError("attempt to write a readonly database")
        except sqlite3.OperationalError as exc:
            raise RuntimeError("Query-invoked autoflush") from exc
    except RuntimeError as outer:
        assert isinstance(root_cause(outer), sqlite3.OperationalError)


def make_read_only(path: Path) -> None:
    """Make ``path`` unwritable, for root too (chattr +i) where the file system allows it."""
    if os.geteuid() != 0:
        path.chmod(0o444)
        return
    if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode != 0:
        pytest.skip("running as root on a file system without chattr +i: cannot make the store read-only")


def make_writable(path: Path) -> None:
    if os.geteuid() == 0:
        subprocess.run(["chattr", "-i", str(path)], check=True)
    else:
        path.chmod(0o644)


def test_a_store_turning_read_only_mid_run_warns_once_then_sync_sends_the_rest(
        isolated_workdir: Path, capfd: pytest.CaptureFixture) -> None:
    from mlflow.tracking import MlflowClient

    from sslt_cli.cli import app
    from sslt_cli.config import Recipe
    from sslt_cli.runs import Run

    db = isolated_workdir / "mlflow.db"
    run = Run.create(Recipe(name="ro"), runs_dir=isolated_workdir / "runs")
    warnings: list[str] = []
    tracker = Tracker(uri=os.environ["MLFLOW_TRACKING_URI"], warn=warnings.append)
    run_id = tracker.start(run.dir.name)
    run.update_meta(mlflow_run_id=run_id, mlflow_uri=tracker.uri, status="running")
    for step in (1, 2, 3):
        run.append_metrics({"kind": "train", "step": step, "epoch": 0, "loss": 1.0 / step})
        if step == 2:
            make_read_only(db)
        tracker.log_metrics({"train/loss": 1.0 / step}, step)
    tracker.end()
    captured = capfd.readouterr()
    make_writable(db)
    assert len(warnings) == 1
    assert warnings[0].startswith(f"MLflow tracking at {tracker.uri} failed while logging metrics (OperationalError: ")
    assert "readonly database" in warnings[0] or "disk I/O error" in warnings[0]
    assert warnings[0].endswith("(send them to the store later with: sslt sync RUN_DIR)")
    assert "ERROR" not in captured.err + captured.out and "Traceback" not in captured.err
    assert len(run.metrics()) == 3
    client = MlflowClient(tracking_uri=tracker.uri)
    assert client.get_run(run_id).info.status == "RUNNING"
    assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == [1]

    run.update_meta(status="finished")
    result = CliRunner().invoke(app, ["sync", str(run.dir)])
    assert result.exit_code == 0, result.output
    history = client.get_metric_history(run_id, "train/loss")
    assert sorted((m.step, m.value) for m in history) == [(1, 1.0), (2, 0.5), (3, 1 / 3)]
    assert client.get_run(run_id).info.status == "FINISHED"
    assert CliRunner().invoke(app, ["sync", str(run.dir)]).exit_code == 0
    assert len(client.get_metric_history(run_id, "train/loss")) == 3  # nothing sent twice


@pytest.mark.parametrize("where", ["read-only working directory", "a file where its folder should be"])
def test_an_unwritable_store_is_said_at_once_and_the_run_goes_on_untracked(
        isolated_workdir: Path, monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    """MLflow retries a sqlite store it cannot create for about 100 s (40 warning lines): sslt checks first and says
    it in one line (issue 22)."""
    from sslt_cli import tracking

    def no_mlflow(uri: str):
        raise AssertionError("MLflow was asked to open a store that cannot be written")

    monkeypatch.setattr(tracking, "open_client", no_mlflow)
    if where == "read-only working directory":
        folder = isolated_workdir / "read-only"
        folder.mkdir()
        monkeypatch.chdir(folder)
        monkeypatch.delenv("MLFLOW_TRACKING_URI")  # the default store, sqlite:///mlflow.db in the working directory
        make_read_only(folder)
        reason = f"cannot write into {folder}: {os.strerror(1 if os.geteuid() == 0 else 13)}"
    else:
        (isolated_workdir / "store").write_text("a file, not a folder\n")
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{isolated_workdir / 'store' / 'mlflow.db'}")
        folder = None
        reason = f"cannot write into {isolated_workdir / 'store'}: a file is in the way"
    try:
        tracking.check_store()  # the checks before a run: nothing to open, nothing to wait for
        warnings: list[str] = []
        tracker = Tracker(warn=warnings.append)
        assert tracker.start("run") is None and not tracker.enabled
        tracker.log_metrics({"train/loss": 1.0}, 1)
        tracker.end()
    finally:
        if folder is not None:
            make_writable(folder)
    assert warnings == [f"MLflow tracking is off: the store {tracking.absolute_uri(tracking.tracking_uri())} is not writable ({reason}); the "
                        "run goes on and keeps every number in its run folder (set MLFLOW_TRACKING_URI to a writable "
                        "place, then send them to the store later with: sslt sync RUN_DIR)"]
# --------------------------------------- issue 22, item 9: `sslt sync` sends all of a run, once per store, from anywhere

@pytest.fixture(scope="module")
def sync_bench(tmp_path_factory) -> Path:
    """16 training, 4 validation, 4 VGG-SS-style and 2 Flickr-style clips at 64 px."""
    from sslt_cli.data.synthetic import generate

    root = tmp_path_factory.mktemp("sync-bench") / "bench"
    generate(root, n_train=16, n_val=4, n_test=4, n_flickr=2, image_size=64, workers=1, progress=False)
    return root


def _train_tracked(folder: Path, bench: Path, experiment: str):
    """A two-step run (one epoch, validation, final evaluation of both checkpoints on both test sets) tracked in the
    current store; returns its Run."""
    import io

    import torch
    import yaml
    from rich.console import Console

    from callers import train_in
    from sslt_cli.config import load_recipe
    from sslt_cli.runs import Run

    tree = {"name": "tiny", "runs_dir": str(folder / "runs"),
            "data": {"root": str(bench), "image_size": 64, "num_workers": 0}, "audio": {"clip_seconds": 3, "n_mels": 32},
            "optim": {"batch_size": 8, "max_steps": 2}, "train": {"log_every": 1}, "eval": {"batch_size": 4},
            "transforms": {"views": "code", **{t: {"enabled": False} for t in ("app", "geo", "mask", "mix",
                                                                                "equivariance")}},
            "tracking": {"enabled": True, "experiment": experiment}}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tiny.yaml").write_text(yaml.safe_dump(tree))
    recipe = load_recipe(folder / "tiny.yaml")
    quiet = Console(file=io.StringIO())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train_in(recipe, Run.create(recipe), console=quiet, out=quiet).run
    finally:
        torch.set_num_threads(threads)


def _held(client, run_id: str) -> tuple[dict[str, int], set[str], set[str]]:
    """(metric name -> number of values, parameter names, artifact paths) an MLflow run holds."""
    def artifacts(path=None):
        found = set()
        for info in client.list_artifacts(run_id, path):
            found |= artifacts(info.path) if info.is_dir else {info.path}
        return found

    data = client.get_run(run_id).data
    return ({name: len(client.get_metric_history(run_id, name)) for name in data.metrics}, set(data.params),
            artifacts())


def test_sync_after_a_store_failure_leaves_the_run_as_a_store_that_never_failed(
        isolated_workdir: Path, sync_bench: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: sync sent metrics.jsonl's numbers only, so the evaluations' baselines, the oracle, N requested and
    every artifact but config.yaml stayed missing (here 80 of 118 metric names and 28 of 29 artifact files)."""
    from mlflow.tracking import MlflowClient

    from sslt_cli.cli import app

    client = MlflowClient(tracking_uri=os.environ["MLFLOW_TRACKING_URI"])
    whole = _train_tracked(isolated_workdir / "whole", sync_bench, "sync")
    real_log_batch = MlflowClient.log_batch
    calls = []

    def fails_after_the_first_metrics(self, run_id, *args, **kwargs):
        if kwargs.get("metrics"):
            calls.append(run_id)
            if len(calls) > 1:
                raise sqlite3.OperationalError("attempt to write a readonly database")
        return real_log_batch(self, run_id, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(MlflowClient, "log_batch", fails_after_the_first_metrics)
        broken = _train_tracked(isolated_workdir / "broken", sync_bench, "sync")
    broken_id = broken.meta()["mlflow_run_id"]
    expected = _held(client, whole.meta()["mlflow_run_id"])
    before = _held(client, broken_id)
    assert set(before[0]) < set(expected[0]) and not before[2] - {"config.yaml"}
    assert client.get_run(broken_id).info.status == "RUNNING"

    result = CliRunner().invoke(app, ["sync", str(broken.dir)])
    assert result.exit_code == 0, result.output
    assert _held(client, broken_id) == expected
    assert any(name.endswith("/baseline_random/ciou") for name in expected[0])
    assert any(path.startswith("eval/") for path in expected[2]) and "val" in {p.split("/")[0] for p in expected[2]}
    assert client.get_run(broken_id).info.status == "FINISHED"

    again = CliRunner().invoke(app, ["sync", str(broken.dir)])
    assert again.exit_code == 0, again.output
    assert ":0values,0parameters,0tagsand0artifactfilessenttoMLflowrun" in "".join(again.output.split())
    assert _held(client, broken_id) == expected


def test_sync_to_another_store_and_back_from_another_folder_duplicates_nothing(
        isolated_workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: meta.json kept one store, by the URI as given (``sqlite:///mlflow.db``, relative): syncing from another
    folder, or back from a second store, made the run a second time in the first."""
    from mlflow.tracking import MlflowClient

    from sslt_cli.cli import app
    from sslt_cli.config import Recipe
    from sslt_cli.runs import Run
    from sslt_cli.tracking import open_run_tracking

    monkeypatch.delenv("MLFLOW_TRACKING_URI")  # the default store, sqlite:///mlflow.db in the current folder
    run = Run.create(Recipe(name="moved"), runs_dir=isolated_workdir / "runs")
    sink = open_run_tracking(run, run.recipe())
    for step in (1, 2):
        sink.log("train", step, {"loss": 1.0 / step}, fields={"epoch": 0})
    sink.end()
    run.update_meta(status="finished")
    store_a = f"sqlite:///{isolated_workdir / 'mlflow.db'}"
    assert run.meta()["stores"] == {store_a: sink.run_id}

    elsewhere = isolated_workdir / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    store_b = f"sqlite:///{isolated_workdir / 'b' / 'mlflow.db'}"
    for uri in (store_b, "sqlite:///../mlflow.db", store_a, store_b):
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        result = CliRunner().invoke(app, ["sync", str(run.dir)])
        assert result.exit_code == 0, result.output
    stores = run.meta()["stores"]
    assert set(stores) == {store_a, store_b}
    for uri in (store_a, store_b):
        client = MlflowClient(tracking_uri=uri)
        runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
        assert [r.info.run_id for r in runs] == [stores[uri]]
        assert sorted(m.step for m in client.get_metric_history(stores[uri], "train/loss")) == [1, 2]
    assert ":0values,0parameters,0tagsand0artifactfilessenttoMLflowrun" in "".join(result.output.split())
