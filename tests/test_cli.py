"""The ``sslt`` command line: fast help with examples, --dry-run, user errors without traceback, runs, ui."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import requests
import typer.main
from typer.testing import CliRunner

from sslt_cli.cli import app
from sslt_cli.config import load_recipe, parse_yaml, recipe_dict, validate_tree
from sslt_cli.runs import Run

REPO_ROOT = Path(__file__).resolve().parents[1]
WIDE = {"COLUMNS": "200", "TERMINAL_WIDTH": "200"}


def command_paths(group=None, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every registered command and group as its argument path; () is ``sslt`` itself."""
    group = group or typer.main.get_command(app)
    paths = [prefix]
    for name, command in sorted(getattr(group, "commands", {}).items()):
        paths += command_paths(command, prefix + (name,))
    return paths


def help_example(path: tuple[str, ...]) -> str:
    """The last non-empty line of ``sslt <path> --help``."""
    result = CliRunner().invoke(app, [*path, "--help"], env=WIDE)
    assert result.exit_code == 0, result.output
    return [line.strip() for line in result.stdout.splitlines() if line.strip()][-1]


def sslt(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``python -m sslt_cli`` (the console entry point ``sslt_cli.cli.main``) in the working folder."""
    full_env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "COLUMNS")}
    full_env.update({"NO_COLOR": "1", **(env or {})})
    return subprocess.run([sys.executable, "-m", "sslt_cli", *args], capture_output=True, text=True, env=full_env,
                          timeout=timeout)


# --- help -----------------------------------------------------------------------------------------------------------

def test_help_is_instant_and_imports_neither_torch_nor_mlflow() -> None:
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "sslt_cli", "--help"], capture_output=True,
                            text=True, timeout=120, env={**os.environ, **WIDE})
    assert result.returncode == 0, result.stderr
    assert "Usage:" in result.stdout and "train" in result.stdout
    # -X importtime writes "import time: self | cumulative | package.module" per imported module.
    imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines()
                if line.startswith("import time:")}
    assert "typer" in imported
    heavy = {m for m in imported if m.split(".")[0] in ("torch", "mlflow", "cv2", "av", "torchvision", "pandas")}
    assert heavy == set()


@pytest.mark.parametrize("path", command_paths(), ids=lambda p: " ".join(("sslt",) + p))
def test_every_help_ends_with_an_example(path: tuple[str, ...]) -> None:
    assert help_example(path).startswith("Example: " + " ".join(("sslt",) + path))


def test_every_command_of_the_issue_exists() -> None:
    assert {p[0] for p in command_paths() if p} >= {"prepare", "train", "eval", "retrieve", "ablate", "runs", "ui"}


def test_the_train_example_runs() -> None:
    example = help_example(("train",)).removeprefix("Example: sslt ").split()
    args = [str(REPO_ROOT / a) if a.startswith("recipes/") else a for a in example]
    assert "--dry-run" in args
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, f"{result.exception!r} {result.output}"


# --- train --dry-run ------------------------------------------------------------------------------------------------

def test_dry_run_prints_the_resolved_recipe() -> None:
    Path("recipe.yaml").write_text("name: t\noptim:\n  lr: 2e-5\n  epochs: 3\n")
    result = CliRunner().invoke(app, ["train", "recipe.yaml", "optim.lr=3e-4", "data.test={vggss: a}", "--dry-run"])
    assert result.exit_code == 0, result.output
    expected = load_recipe("recipe.yaml", ["optim.lr=3e-4", "data.test={vggss: a}"])
    printed = parse_yaml(result.stdout)
    assert printed == recipe_dict(expected)
    assert validate_tree(printed, "stdout") == expected
    assert (printed["optim"]["lr"], printed["optim"]["epochs"], printed["optim"]["batch_size"]) == (3e-4, 3, 32)
    assert result.stderr == "would create a run folder under runs/t-<timestamp>\n"
    assert not Path("runs").exists()


def test_dry_run_output_survives_long_values() -> None:
    root = "/data/" + "x" * 100 + "/vggsound"
    Path("recipe.yaml").write_text("name: t\n")
    result = CliRunner().invoke(app, ["train", "recipe.yaml", f"data.root={root}", "--dry-run"], env={"COLUMNS": "80"})
    assert parse_yaml(result.stdout)["data"]["root"] == root


def test_resume_dry_run_prints_the_saved_recipe() -> None:
    Path("recipe.yaml").write_text("name: t\n")
    recipe = load_recipe("recipe.yaml", ["data.holdout_classes=[dog, cat]"])
    run = Run.create(recipe, argv=[])
    result = CliRunner().invoke(app, ["train", "recipe.yaml", "--resume", str(run.dir), "--dry-run"], env=WIDE)
    assert result.exit_code == 0, result.output
    assert parse_yaml(result.stdout) == recipe_dict(recipe)


# --- user errors: exit 1, message on stderr, no traceback -----------------------------------------------------------

@pytest.mark.parametrize(("recipe", "overrides", "message"), [
    ("optim:\n  lrr: 1e-4\n", [],
     "error: recipe.yaml: 1 problem(s) in the recipe\n"
     "  - recipe.yaml: unknown key 'optim.lrr' (did you mean 'optim.lr'?)\n"),
    ("optim:\n  batch_size: abc\n", [],
     "error: recipe.yaml: 1 problem(s) in the recipe\n"
     "  - recipe.yaml: key 'optim.batch_size': expected an integer, got 'abc'\n"),
    ("name: t\n", ["bad", "optim.lrr=3e-4"],
     "error: recipe.yaml: 2 problem(s) in the recipe\n"
     "  - override 'bad' is not of the form key=value: write overrides as dotted.key=value, "
     "e.g. optim.lr=3e-4 data.root=/data/vggsound\n"
     "  - recipe.yaml: unknown key 'optim.lrr' (did you mean 'optim.lr'?) (from override 'optim.lrr=3e-4')\n"),
], ids=["typo", "wrong-type", "bad-override"])
def test_a_bad_recipe_exits_1_with_the_message_on_stderr(recipe: str, overrides: list[str], message: str) -> None:
    Path("recipe.yaml").write_text(recipe)
    result = sslt("train", "recipe.yaml", *overrides, "--dry-run")
    assert (result.returncode, result.stdout, result.stderr) == (1, "", message)


def test_other_user_errors_exit_1_without_traceback() -> None:
    result = sslt("train", "missing.yaml")
    assert (result.returncode, result.stderr) == (1, "error: missing.yaml: recipe file not found\n")
    Path("recipe.yaml").write_text("name: t\n")
    run = Run.create(load_recipe("recipe.yaml"), argv=[])
    result = sslt("train", "recipe.yaml", "--resume", str(run.dir), "optim.lr=1")
    assert (result.returncode, result.stderr) == (
        1, "error: --resume continues a run with its saved recipe; overrides are not allowed\n"
           "  - got optim.lr=1; start a new run to change the recipe\n")
    assert "Traceback" not in result.stderr


# --- sslt runs ------------------------------------------------------------------------------------------------------

def test_runs_table() -> None:
    Path("recipe.yaml").write_text("name: t\n")
    run = Run.create(load_recipe("recipe.yaml"), argv=[])
    for record in ({"kind": "train", "step": 10, "loss": 1.0}, {"kind": "val", "step": 10, "ciou": 0.3},
                   {"kind": "train", "step": 20, "loss": 0.5}, {"kind": "val", "step": 20, "ciou": 0.25},
                   {"kind": "test", "step": 20, "set": "vggss", "checkpoint": "last", "ciou": 0.375, "auc": 0.4},
                   {"kind": "test", "step": 10, "set": "vggss", "checkpoint": "best", "ciou": 0.5, "auc": 0.45},
                   {"kind": "test", "step": 10, "set": "flickr", "checkpoint": "best", "ciou": 0.7, "auc": 0.6}):
        run.append_metrics(record)
    run.update_meta(status="finished")
    result = CliRunner().invoke(app, ["runs", "--runs-dir", "runs"], env=WIDE)
    assert result.exit_code == 0, result.output
    row = next(line for line in result.stdout.splitlines() if run.dir.name in line)
    # the best checkpoint (chosen on validation) on the first test set
    assert [cell.strip() for cell in row.strip("│┃| ").split("│")] == [
        run.dir.name, "t", "finished", "20", "0.3000", "vggss (best)", "0.5000", "0.4500"]

    result = CliRunner().invoke(app, ["runs", "--runs-dir", "nothing-here"])
    assert (result.exit_code, result.stdout, result.stderr) == (0, "", "no runs under nothing-here\n")


# --- sslt ui --------------------------------------------------------------------------------------------------------

def test_ui_with_a_server_uri_starts_nothing() -> None:
    result = CliRunner().invoke(app, ["ui"], env={"MLFLOW_TRACKING_URI": "http://127.0.0.1:1", **WIDE})
    assert result.exit_code == 0
    assert result.stdout == ("MLFLOW_TRACKING_URI points at a server (http://127.0.0.1:1): open it in a browser; "
                             "nothing to start.\n")


def test_ui_runs_mlflow_ui_on_the_store(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kwargs: calls.append((cmd, kwargs.get("env") or {})))
    result = CliRunner().invoke(app, ["ui", "--port", "5123"], env={"MLFLOW_TRACKING_URI": "sqlite:///x.db", **WIDE})
    assert result.exit_code == 0, result.output
    assert [cmd for cmd, _ in calls] == [[sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", "sqlite:///x.db",
                                          "--host", "127.0.0.1", "--port", "5123", "--workers", "1"]]
    assert calls[0][1]["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    assert result.stderr == "MLflow UI on sqlite:///x.db: http://127.0.0.1:5123  (Ctrl-C stops it)\n"


def test_ui_prints_its_url_on_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kwargs: None)
    uri = "sqlite:///" + "/very/long/project/folder" * 3 + "/mlflow.db"
    result = CliRunner().invoke(app, ["ui"], env={"MLFLOW_TRACKING_URI": uri, "COLUMNS": "80"})
    assert result.stderr == f"MLflow UI on {uri}: http://127.0.0.1:5000  (Ctrl-C stops it)\n"


@pytest.mark.timeout(240)
def test_ui_serves_the_runs_of_the_store(serve, tmp_path: Path, free_port: int) -> None:
    from sslt_cli.tracking import Tracker

    uri = f"sqlite:///{tmp_path / 'ui.db'}"
    tracker = Tracker(experiment="ui-test", uri=uri)
    run_id = tracker.start("shown-run", params={"optim.lr": 1e-4})
    tracker.log_metrics({"val/ciou": 0.5}, step=1)
    tracker.end()
    assert run_id is not None

    env = {k: v for k, v in os.environ.items() if k != "FORCE_COLOR"}
    env.update({"MLFLOW_TRACKING_URI": uri, "NO_COLOR": "1"})
    base = f"http://127.0.0.1:{free_port}"
    _, log = serve([sys.executable, "-m", "sslt_cli", "ui", "--port", str(free_port)], f"{base}/", env=env)
    assert "<html" in requests.get(f"{base}/", timeout=10).text.lower()
    found = requests.post(f"{base}/api/2.0/mlflow/experiments/search", json={"max_results": 100},
                          timeout=10).json()["experiments"]
    experiment_id = next(e["experiment_id"] for e in found if e["name"] == "ui-test")
    runs = requests.post(f"{base}/api/2.0/mlflow/runs/search", json={"experiment_ids": [experiment_id]},
                         timeout=10).json()["runs"]
    assert [(r["info"]["run_id"], r["info"]["run_name"]) for r in runs] == [(run_id, "shown-run")]
    assert f"http://127.0.0.1:{free_port}" in log.read_text().split()
